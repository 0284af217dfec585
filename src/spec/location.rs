//! Where each key of the pipeline file is, so that any later error can point at it.
//!
//! serde reports positions only for syntax and type errors during deserialisation; errors found
//! afterwards (a dangling reference, a cycle, an unknown stage kind, a missing input file) know
//! only a key path such as `stages.total.inputs.numbers`. This index maps every key path of
//! the document to the line and column of its key and of its value, from the YAML event stream.
//! Paths use the same syntax as `serde_path_to_error`: `a.b`, `a[0].c`.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser};

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// Positions of one key path.
#[derive(Debug, Clone, Copy)]
pub struct Located {
    /// Where the key itself is (for sequence items, the item).
    pub key: Position,
    /// Where its value starts.
    pub value: Position,
}

/// Key path → position, plus keys that occur twice in one mapping.
#[derive(Debug, Default)]
pub struct LocationIndex {
    paths: HashMap<String, Located>,
    /// (path, first position, second position) of each duplicated key.
    pub duplicates: Vec<(String, Position, Position)>,
}

enum Frame {
    Map {
        path: String,
        pending_key: Option<(String, Position)>,
    },
    Seq {
        path: String,
        next: usize,
    },
}

impl LocationIndex {
    /// Builds the index; a document the event parser cannot read yields an empty index (the
    /// deserialiser reports the syntax error itself, with its position).
    pub fn build(text: &str) -> Self {
        let mut index = LocationIndex::default();
        let mut stack: Vec<Frame> = Vec::new();
        for item in Parser::new_from_str(text) {
            let Ok((event, span)) = item else {
                return index;
            };
            let pos = Position {
                line: span.start.line(),
                column: span.start.col() + 1,
            };
            match event {
                Event::Scalar(value, ..) => {
                    if let Some(Frame::Map {
                        pending_key: pending @ None,
                        ..
                    }) = stack.last_mut()
                    {
                        *pending = Some((value.to_string(), pos));
                        continue;
                    }
                    index.value_here(&mut stack, pos);
                }
                Event::MappingStart(..) => {
                    let path = index.value_here(&mut stack, pos);
                    stack.push(Frame::Map {
                        path,
                        pending_key: None,
                    });
                }
                Event::SequenceStart(..) => {
                    let path = index.value_here(&mut stack, pos);
                    stack.push(Frame::Seq { path, next: 0 });
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    stack.pop();
                }
                Event::Alias(_) => {
                    index.value_here(&mut stack, pos);
                }
                _ => {}
            }
        }
        index
    }

    /// Records a value starting at `pos` in the current container; returns its path.
    fn value_here(&mut self, stack: &mut [Frame], pos: Position) -> String {
        match stack.last_mut() {
            None => String::new(),
            Some(Frame::Map { path, pending_key }) => {
                let (key, key_pos) = pending_key.take().unwrap_or_default_key(pos);
                let full = join(path, &key);
                let located = Located {
                    key: key_pos,
                    value: pos,
                };
                if let Some(first) = self.paths.insert(full.clone(), located) {
                    // Keys under a duplicated key repeat too; report only the outermost.
                    let nested = self.duplicates.iter().any(|(d, ..)| {
                        full.starts_with(&format!("{d}.")) || full.starts_with(&format!("{d}["))
                    });
                    if !nested {
                        self.duplicates.push((full.clone(), first.key, key_pos));
                    }
                    // Keep the first occurrence as the canonical position.
                    self.paths.insert(full.clone(), first);
                }
                full
            }
            Some(Frame::Seq { path, next }) => {
                let full = format!("{path}[{next}]");
                *next += 1;
                self.paths.insert(
                    full.clone(),
                    Located {
                        key: pos,
                        value: pos,
                    },
                );
                full
            }
        }
    }

    /// The position of `path`, or of its nearest located ancestor.
    pub fn find(&self, path: &str) -> Option<Located> {
        let mut p = path.to_string();
        loop {
            if let Some(l) = self.paths.get(&p) {
                return Some(*l);
            }
            let cut = p.rfind(['.', '['])?;
            p.truncate(cut);
        }
    }

    /// The keys directly under `path` (for suggestions), in no particular order.
    pub fn children(&self, path: &str) -> Vec<String> {
        let prefix = if path.is_empty() {
            String::new()
        } else {
            format!("{path}.")
        };
        self.paths
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix))
            .filter(|rest| !rest.contains(['.', '[']))
            .map(str::to_string)
            .collect()
    }
}

trait DefaultKey {
    fn unwrap_or_default_key(self, pos: Position) -> (String, Position);
}

impl DefaultKey for Option<(String, Position)> {
    fn unwrap_or_default_key(self, pos: Position) -> (String, Position) {
        // A complex (non-scalar) key: index it under an empty name.
        self.unwrap_or((String::new(), pos))
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "version: 1\nstages:\n  numbers:\n    kind: command\n    with:\n      run: echo hi\n      member: [a, b]\n  total:\n    kind: command\n";

    #[test]
    fn keys_and_values_are_located() {
        let idx = LocationIndex::build(DOC);
        let run = idx.find("stages.numbers.with.run").unwrap();
        assert_eq!(run.key, Position { line: 6, column: 7 });
        assert_eq!(
            run.value,
            Position {
                line: 6,
                column: 12
            }
        );
        assert_eq!(
            idx.find("stages.numbers.with.member[1]").unwrap().key,
            Position {
                line: 7,
                column: 19
            }
        );
        assert_eq!(idx.find("stages.total.kind").unwrap().key.line, 9);
    }

    #[test]
    fn unknown_paths_fall_back_to_the_nearest_ancestor() {
        let idx = LocationIndex::build(DOC);
        assert_eq!(
            idx.find("stages.numbers.with.nope.deeper")
                .unwrap()
                .key
                .line,
            5
        );
    }

    #[test]
    fn duplicate_keys_are_reported_with_both_positions() {
        let idx = LocationIndex::build("stages:\n  a:\n    kind: x\n  a:\n    kind: y\n");
        assert_eq!(idx.duplicates.len(), 1);
        let (path, first, second) = &idx.duplicates[0];
        assert_eq!(path, "stages.a");
        assert_eq!((first.line, second.line), (2, 4));
    }

    #[test]
    fn children_lists_direct_keys() {
        let idx = LocationIndex::build(DOC);
        let mut kids = idx.children("stages");
        kids.sort();
        assert_eq!(kids, vec!["numbers", "total"]);
    }
}
