//! Relative paths that come from untrusted data, checked before anything is materialised.
//!
//! A tree manifest or run record fetched from a team remote (or read from a cache folder shared
//! on a disk), an image path in a dataset table, a member name in an archive: each is a string
//! somebody else wrote, later joined onto a folder of ours. [`relative`] is the one check every
//! such string passes before it is joined:
//!
//! * not empty, no NUL byte, at most [`MAX_LEN`] bytes;
//! * not absolute (`/…`);
//! * `/`-separated components, none empty (`a//b`, a trailing `/`), `.` or `..`.
//!
//! A path that passes names a place strictly below the folder it is joined to, **as long as
//! that folder holds no symbolic link on the way**: the writers that materialise such paths
//! (the store's trees, the remote's restore) only create plain folders and files in a fresh
//! folder of their own, so there is none to follow. Readers of user folders (a dataset's
//! `images:` root) follow links the user made there; their content is hashed through them, so a
//! change is seen.

/// The longest relative path accepted (Linux's `PATH_MAX`).
pub const MAX_LEN: usize = 4096;

/// Why a relative path from untrusted data was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnsafePath {
    #[error("the path is empty")]
    Empty,
    #[error("`{0}` contains a NUL byte")]
    Nul(String),
    #[error("`{0}…` is longer than {MAX_LEN} bytes")]
    TooLong(String),
    #[error("`{0}` is absolute")]
    Absolute(String),
    #[error("`{0}` has an empty component")]
    EmptyComponent(String),
    #[error("`{0}` has a `.` or `..` component")]
    DotComponent(String),
}

/// Checks that `path` stays below whatever folder it is joined to; returns it unchanged.
pub fn relative(path: &str) -> Result<&str, UnsafePath> {
    if path.is_empty() {
        return Err(UnsafePath::Empty);
    }
    if path.len() > MAX_LEN {
        let mut cut = 60;
        while !path.is_char_boundary(cut) {
            cut -= 1;
        }
        return Err(UnsafePath::TooLong(path[..cut].to_string()));
    }
    if path.contains('\0') {
        return Err(UnsafePath::Nul(path.replace('\0', "\\0")));
    }
    if path.starts_with('/') {
        return Err(UnsafePath::Absolute(path.to_string()));
    }
    for component in path.split('/') {
        match component {
            "" => return Err(UnsafePath::EmptyComponent(path.to_string())),
            "." | ".." => return Err(UnsafePath::DotComponent(path.to_string())),
            _ => {}
        }
    }
    Ok(path)
}

/// Whether `s` is a lowercase hex sha256 (64 characters): the only thing that may name an
/// object, a tree or a record.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_below_the_root_pass() {
        for ok in [
            "a",
            "a/b.jpg",
            "train2014/COCO_1.jpg",
            "..a/b..",
            "a/.hidden",
            "a b/ c",
        ] {
            assert_eq!(relative(ok), Ok(ok), "{ok}");
        }
    }

    #[test]
    fn paths_that_leave_the_root_are_refused() {
        assert_eq!(relative(""), Err(UnsafePath::Empty));
        assert!(matches!(
            relative("/etc/passwd"),
            Err(UnsafePath::Absolute(_))
        ));
        for dots in ["..", "../x", "a/../../x", "a/./b", ".", "a/.."] {
            assert!(
                matches!(relative(dots), Err(UnsafePath::DotComponent(_))),
                "{dots}"
            );
        }
        for empty in ["a//b", "a/", "a/b/"] {
            assert!(
                matches!(relative(empty), Err(UnsafePath::EmptyComponent(_))),
                "{empty}"
            );
        }
        assert!(matches!(relative("a\0b"), Err(UnsafePath::Nul(_))));
        let long = "é".repeat(MAX_LEN);
        assert!(matches!(relative(&long), Err(UnsafePath::TooLong(_))));
    }

    #[test]
    fn digests_are_64_lowercase_hex() {
        assert!(is_sha256(&"ab".repeat(32)));
        assert!(!is_sha256(&"AB".repeat(32)));
        assert!(!is_sha256("ab"));
        assert!(!is_sha256(&format!("{}/x", "a".repeat(62))));
        assert!(!is_sha256(&"é".repeat(32)));
    }
}
