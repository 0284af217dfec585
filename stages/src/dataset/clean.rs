//! Caption cleaning presets.
//!
//! `cusa` is exactly the reference `pre_caption` (CUSA code, inherited from X-VLM; see
//! `docs/method.md`), quirks included: only *runs* of two or more whitespace characters
//! are collapsed (a single tab survives), `split(' ')` splits on spaces only, and an empty result
//! is an error. It is checked against the Python function on tricky captions
//! (`scripts/fixtures/pre_caption.py` → `stages/tests/fixtures/pre_caption.json`).

use serde::{Deserialize, Serialize};

/// Which cleaning to apply to captions.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Clean {
    /// The reference `pre_caption`.
    #[default]
    Cusa,
    /// Keep the text as it is (an empty caption is still an error).
    None,
}

/// Python's `str.isspace()`, which is what `\s` matches in a `str` regex: Unicode White_Space
/// plus the four information separators U+001C..U+001F.
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// The reference `pre_caption(caption, max_words)`; `None` where Python raises ValueError.
pub fn pre_caption(caption: &str, max_words: usize) -> Option<String> {
    let lowered = caption.to_lowercase();
    let mut s = String::with_capacity(lowered.len());
    for c in lowered.chars() {
        if ",.'!?\"()*#:;~".contains(c) {
            s.push(' ')
        } else {
            s.push(c)
        }
    }
    let s = s.replace(['-', '/'], " ").replace("<person>", "person");
    // re.sub(r"\s{2,}", ' ', s): runs of two or more whitespace characters become one space.
    let chars: Vec<char> = s.chars().collect();
    let mut collapsed = String::with_capacity(s.len());
    let mut i = 0;
    while i < chars.len() {
        if py_isspace(chars[i]) {
            let start = i;
            while i < chars.len() && py_isspace(chars[i]) {
                i += 1;
            }
            if i - start >= 2 {
                collapsed.push(' ');
            } else {
                collapsed.push(chars[start]);
            }
        } else {
            collapsed.push(chars[i]);
            i += 1;
        }
    }
    let trimmed = collapsed.trim_end_matches('\n').trim_matches(' ');
    let words: Vec<&str> = trimmed.split(' ').collect();
    let out = if words.len() > max_words {
        words[..max_words].join(" ")
    } else {
        trimmed.to_string()
    };
    (!out.is_empty()).then_some(out)
}

impl Clean {
    /// What the preset does to a caption, in words (for the export's `training.json`).
    pub fn rule(self, max_words: usize) -> String {
        match self {
            Clean::Cusa => format!(
                "the reference pre_caption: lower-case; each of ,.'!?\"()*#:;~ becomes a space; - and / become spaces; <person> becomes person; runs of two or more whitespace characters become one space; trailing newlines and surrounding spaces stripped; at most the first {max_words} space-separated words kept"
            ),
            Clean::None => "none: the text as it is".to_string(),
        }
    }
}

/// Applies a preset; `None` when the result is empty.
pub fn clean(text: &str, preset: Clean, max_words: usize) -> Option<String> {
    match preset {
        Clean::Cusa => pre_caption(text, max_words),
        Clean::None => (!text.trim().is_empty()).then(|| text.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_python_reference_on_tricky_captions() {
        let fixture: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/pre_caption.json")).unwrap();
        let cases = fixture.as_array().unwrap();
        assert!(cases.len() >= 25);
        for case in cases {
            let input = case["input"].as_str().unwrap();
            let max_words = case["max_words"].as_u64().unwrap() as usize;
            let got = pre_caption(input, max_words);
            match case.get("output") {
                Some(want) => assert_eq!(got.as_deref(), want.as_str(), "input {input:?}"),
                None => assert_eq!(got, None, "input {input:?} must be an error"),
            }
        }
    }

    #[test]
    fn none_keeps_text_but_refuses_empty() {
        assert_eq!(
            clean(" A Dog. ", Clean::None, 64).as_deref(),
            Some(" A Dog. ")
        );
        assert_eq!(clean("  ", Clean::None, 64), None);
    }
}
