//! The word-level vocabulary of students trained from scratch (`scenes-small`).
//!
//! Built from the training captions only (never validation or test text), so an evaluation
//! caption can contain unknown words: they map to `[UNK]`. Words are the maximal runs of
//! alphanumeric characters of the lower-cased caption. Id 0 is `[PAD]`, id 1 `[UNK]`, then the
//! words that occur at least `min_count` times, in byte order — so the same captions always give
//! the same ids, whatever order they come in. Saved beside the weights as `vocab.json`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const PAD: u32 = 0;
pub const UNK: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WordVocab {
    /// `words[id]`; `[PAD]` and `[UNK]` first.
    pub words: Vec<String>,
    /// Captions are cut after this many words.
    pub max_words: usize,
}

/// The words of a caption, lower-cased.
pub fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
}

impl WordVocab {
    pub fn build<'a>(
        captions: impl IntoIterator<Item = &'a str>,
        min_count: usize,
        max_words: usize,
    ) -> Self {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for c in captions {
            for w in words(c) {
                *counts.entry(w).or_default() += 1;
            }
        }
        let mut out = vec!["[PAD]".to_string(), "[UNK]".to_string()];
        out.extend(
            counts
                .into_iter()
                .filter(|(_, n)| *n >= min_count.max(1))
                .map(|(w, _)| w),
        );
        Self {
            words: out,
            max_words,
        }
    }

    pub fn len(&self) -> usize {
        self.words.len()
    }

    pub fn is_empty(&self) -> bool {
        self.words.len() <= 2
    }

    /// Ids of a caption's first `max_words` words (at least one: `[UNK]` for a caption
    /// without words).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let index: &dyn Fn(&str) -> u32 = &|w| {
            self.words[2..]
                .binary_search_by(|x| x.as_str().cmp(w))
                .map_or(UNK, |i| i as u32 + 2)
        };
        let mut ids: Vec<u32> = words(text)
            .take(self.max_words)
            .map(|w| index(&w))
            .collect();
        if ids.is_empty() {
            ids.push(UNK);
        }
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_sorted_words_with_pad_and_unk_first() {
        let v = WordVocab::build(["A red circle, a box.", "a Red box"], 1, 4);
        assert_eq!(v.words, ["[PAD]", "[UNK]", "a", "box", "circle", "red"]);
        assert_eq!(v.encode("a red triangle"), [2, 5, UNK]);
        assert_eq!(v.encode("a a a a a a"), [2, 2, 2, 2], "cut at max_words");
        assert_eq!(v.encode("!!"), [UNK]);
        let rare = WordVocab::build(["a red circle, a box.", "a red box"], 2, 4);
        assert_eq!(rare.words, ["[PAD]", "[UNK]", "a", "box", "red"]);
    }
}
