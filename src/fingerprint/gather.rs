//! Gathering a stage's ingredients: what goes into its fingerprint, computed from the
//! pipeline, the project's files and what its upstream stages committed.
//!
//! [`gather`] hashes each project input (a file or folder, through the stat cache, links
//! followed) and takes each upstream input's committed output digest (or the digest of the
//! sub-path read); an upstream that has not produced its output yet leaves the input *pending*
//! and the key unknown. [`pending_reasons`] and [`miss_reasons`] explain, against the last
//! result committed for the stage, why it must run. The runner decides freshness from these;
//! nothing here reads or writes the store.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::content::{ContentHasher, Manifest, Walk};
use super::{
    Fingerprint, Ingredients, InputIngredient, MissReason, Origin, SCHEMA_VERSION, explain,
};
use crate::spec::{Input, Pipeline, Stage};

/// An upstream stage's committed output, as a dependent reads it.
pub struct UpstreamOutput<'a> {
    pub digest: &'a str,
    pub manifest: &'a Manifest,
    pub dir: &'a Path,
}

/// A stage's ingredients and where its inputs are.
pub struct Gathered {
    pub ingredients: Ingredients,
    /// Resolved input paths (upstream ones only when done).
    pub paths: BTreeMap<String, PathBuf>,
    /// Inputs whose upstream has not committed yet: (input name, upstream stage).
    pub pending: Vec<(String, String)>,
}

/// An input that cannot be read (a missing file, a sub-path the upstream did not write).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatherError {
    pub message: String,
    pub hint: Option<String>,
}

/// Gathers `stage`'s ingredients; `upstream(name)` is the committed output of an upstream
/// stage, `None` while it is pending.
pub fn gather<'a>(
    pipeline: &Pipeline,
    stage: &Stage,
    hasher: &ContentHasher,
    upstream: impl Fn(&str) -> Option<UpstreamOutput<'a>>,
) -> Result<Gathered, GatherError> {
    let mut inputs = BTreeMap::new();
    let mut paths = BTreeMap::new();
    let mut pending: Vec<(String, String)> = Vec::new();
    for (name, input) in &stage.inputs {
        match input {
            Input::Project { path, key } => {
                let abs = if Path::new(path).is_absolute() {
                    PathBuf::from(path)
                } else {
                    pipeline.dir.join(path)
                };
                let digest = hasher.digest_path(&abs, Walk { follow_links: true }).map_err(|e| {
                    let d = pipeline.source.diagnostic_at_value(key, "");
                    let what = match &e {
                        crate::fingerprint::content::HashError::Io { source, path: at }
                            if source.kind() == std::io::ErrorKind::NotFound =>
                        {
                            let inside = at.strip_prefix(&abs).ok().filter(|r| !r.as_os_str().is_empty());
                            match inside {
                                Some(rel) if std::fs::symlink_metadata(at).is_ok() => format!(
                                    "`{}` inside {path} is a symbolic link whose target does not exist",
                                    rel.display()
                                ),
                                Some(rel) => format!("`{}` inside {path} disappeared while it was hashed", rel.display()),
                                None => format!("{path} does not exist"),
                            }
                        }
                        other => other.to_string(),
                    };
                    GatherError {
                        message: format!("input `{name}`: {what} ({})", d.location()),
                        hint: Some("create it, or fix the path in the pipeline file (paths are relative to it)".into()),
                    }
                })?;
                inputs.insert(
                    name.clone(),
                    InputIngredient {
                        digest: digest.digest,
                        origin: Origin::Project { path: path.clone() },
                    },
                );
                paths.insert(name.clone(), abs);
            }
            Input::Stage { stage: up, sub } => {
                let origin = Origin::Stage {
                    stage: up.clone(),
                    sub: sub.clone(),
                };
                match upstream(up) {
                    Some(c) => {
                        let digest = match sub {
                            None => c.digest.to_string(),
                            Some(s) => c.manifest.sub_digest(s).ok_or_else(|| {
                                let top: BTreeSet<&str> = c
                                    .manifest
                                    .entries
                                    .iter()
                                    .map(|e| e.path.split('/').next().unwrap_or(""))
                                    .collect();
                                GatherError {
                                    message: format!(
                                        "{}: `{s}` is not in the output of `{up}`",
                                        Input::label(name, input)
                                    ),
                                    hint: Some(format!(
                                        "`{up}` wrote: {}",
                                        if top.is_empty() {
                                            "nothing".to_string()
                                        } else {
                                            top.into_iter().collect::<Vec<_>>().join(", ")
                                        }
                                    )),
                                }
                            })?,
                        };
                        inputs.insert(name.clone(), InputIngredient { digest, origin });
                        paths.insert(
                            name.clone(),
                            sub.as_ref()
                                .map(|s| c.dir.join(s))
                                .unwrap_or_else(|| c.dir.to_path_buf()),
                        );
                    }
                    _ => {
                        pending.push((name.clone(), up.clone()));
                        inputs.insert(
                            name.clone(),
                            InputIngredient {
                                digest: String::new(),
                                origin,
                            },
                        );
                    }
                }
            }
        }
    }
    let ingredients = Ingredients {
        schema: SCHEMA_VERSION,
        kind: stage.kind.name().to_string(),
        kind_version: stage.kind.version(),
        config: stage.config.clone(),
        written: stage.written.clone(),
        params: stage.params_used.clone(),
        inputs,
    };
    Ok(Gathered {
        ingredients,
        paths,
        pending,
    })
}

/// Why a stage whose key is still unknown (an upstream pending) must run: the pending upstream
/// stages, then its own changes against `previous` (the pending inputs take their previous
/// digests, so only what really changed is named).
pub fn pending_reasons(gathered: &mut Gathered, previous: Option<&Ingredients>) -> Vec<MissReason> {
    let mut reasons: Vec<MissReason> = Vec::new();
    for (_, up) in &gathered.pending {
        let r = MissReason::UpstreamPending { stage: up.clone() };
        if !reasons.contains(&r) {
            reasons.push(r);
        }
    }
    if let Some(prev) = previous {
        for (name, _) in &gathered.pending {
            if let (Some(old), Some(new)) = (
                prev.inputs.get(name),
                gathered.ingredients.inputs.get_mut(name),
            ) {
                new.digest = old.digest.clone();
            }
        }
        reasons.extend(
            explain(prev, &gathered.ingredients)
                .into_iter()
                .filter(|r| !matches!(r, MissReason::InputAdded { .. })),
        );
    }
    reasons
}

/// Why a stage with key `fp` and no committed result must run, given the key this pipeline
/// last committed for it (`head`) and that result's ingredients (`previous`).
pub fn miss_reasons(
    fp: &Fingerprint,
    ingredients: &Ingredients,
    head: Option<&Fingerprint>,
    previous: Option<&Ingredients>,
) -> Vec<MissReason> {
    match (head, previous) {
        (None, _) => vec![MissReason::NoRecord],
        (Some(h), _) if h == fp => vec![MissReason::RecordRemoved],
        (Some(_), Some(prev)) => {
            let r = explain(prev, ingredients);
            if r.is_empty() {
                vec![MissReason::RecordRemoved]
            } else {
                r
            }
        }
        (Some(_), None) => vec![MissReason::RecordRemoved],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(dir: &Path, text: &str) -> Pipeline {
        let file = dir.join("pipeline.yaml");
        std::fs::write(&file, text).unwrap();
        crate::spec::load(&file, &[], &cusa_stages::registry()).unwrap()
    }

    const TWO: &str = "version: 1\nstages:\n  a:\n    kind: command\n    inputs: {script: gen.sh}\n    with:\n      run: sh ${inputs.script} > ${out}/x.txt\n  b:\n    kind: command\n    inputs: {x: \"${a/x.txt}\"}\n    with:\n      run: cat ${inputs.x}\n";

    #[test]
    fn project_inputs_are_hashed_and_upstream_ones_wait_for_their_stage() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("gen.sh"), "echo 1\n").unwrap();
        let p = pipeline(dir.path(), TWO);
        let hasher = ContentHasher::new(None);
        let a = gather(&p, &p.stages[0], &hasher, |_| None).unwrap();
        assert!(a.pending.is_empty());
        let script = &a.ingredients.inputs["script"];
        assert_eq!(
            script.digest,
            hasher
                .digest_path(&dir.path().join("gen.sh"), Walk { follow_links: true })
                .unwrap()
                .digest
        );
        assert_eq!(a.paths["script"], dir.path().join("gen.sh"));
        // The same files give the same key; an edit gives another.
        let again = gather(&p, &p.stages[0], &hasher, |_| None).unwrap();
        assert_eq!(again.ingredients.fingerprint(), a.ingredients.fingerprint());
        std::fs::write(dir.path().join("gen.sh"), "echo 2\n").unwrap();
        let edited = gather(&p, &p.stages[0], &ContentHasher::new(None), |_| None).unwrap();
        assert_ne!(
            edited.ingredients.fingerprint(),
            a.ingredients.fingerprint()
        );

        let mut b = gather(&p, &p.stages[1], &hasher, |_| None).unwrap();
        // Upstream outputs are named by position.
        assert_eq!(b.pending, [("@0".to_string(), "a".to_string())]);
        assert_eq!(
            pending_reasons(&mut b, None),
            [MissReason::UpstreamPending { stage: "a".into() }]
        );
    }

    #[test]
    fn an_upstream_sub_path_is_its_digest_and_a_missing_one_names_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("gen.sh"), "echo 1\n").unwrap();
        let p = pipeline(dir.path(), TWO);
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("x.txt"), "1\n").unwrap();
        let hasher = ContentHasher::new(None);
        let manifest = hasher
            .manifest(
                &out,
                Walk {
                    follow_links: false,
                },
            )
            .unwrap();
        let digest = manifest.digest();
        let up = |_: &str| {
            Some(UpstreamOutput {
                digest: &digest,
                manifest: &manifest,
                dir: &out,
            })
        };
        let b = gather(&p, &p.stages[1], &hasher, up).unwrap();
        assert_eq!(
            b.ingredients.inputs["@0"].digest,
            manifest.sub_digest("x.txt").unwrap()
        );
        assert_eq!(b.paths["@0"], out.join("x.txt"));

        std::fs::remove_file(dir.path().join("gen.sh")).unwrap();
        let err = gather(&p, &p.stages[0], &hasher, |_| None).err().unwrap();
        assert!(err.message.contains("gen.sh does not exist"), "{err:?}");
        let other = Manifest::default();
        let err = gather(&p, &p.stages[1], &hasher, |_| {
            Some(UpstreamOutput {
                digest: "",
                manifest: &other,
                dir: &out,
            })
        })
        .err()
        .unwrap();
        assert_eq!(
            err.message,
            "`${a/x.txt}`: `x.txt` is not in the output of `a`"
        );
        assert_eq!(err.hint.as_deref(), Some("`a` wrote: nothing"));
    }

    #[test]
    fn a_miss_is_explained_against_the_head() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("gen.sh"), "echo 1\n").unwrap();
        let p = pipeline(dir.path(), TWO);
        let g = gather(&p, &p.stages[0], &ContentHasher::new(None), |_| None).unwrap();
        let fp = g.ingredients.fingerprint();
        assert_eq!(
            miss_reasons(&fp, &g.ingredients, None, None),
            [MissReason::NoRecord]
        );
        assert_eq!(
            miss_reasons(&fp, &g.ingredients, Some(&fp), Some(&g.ingredients)),
            [MissReason::RecordRemoved]
        );
    }
}
