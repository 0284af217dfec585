//! CLIP's tokenizer: OpenAI's `simple_tokenizer.py`, id for id.
//!
//! The vocabulary is built the way CLIP builds it from a merges file (OpenAI's
//! `bpe_simple_vocab_16e6.txt.gz`, a Hugging Face `merges.txt`, or the merges inside a Hugging
//! Face `tokenizer.json`): the 256 byte symbols of GPT-2's byte-to-unicode table, the same with
//! `</w>`, one token per merge (at most 48,894, as CLIP reads them), then `<|startoftext|>` and
//! `<|endoftext|>`. A `vocab.json` beside a `merges.txt`, or the vocabulary inside a
//! `tokenizer.json`, must agree with that (it is checked, not trusted). Of a `tokenizer.json`
//! only the BPE model is read: the text pipeline is CLIP's own, below, as for every source.
//!
//! Text goes through CLIP's cleaning — ftfy's `fix_text` (the steps that apply to captions:
//! HTML unescaping when there is no `<`, terminal escapes and control characters removed, Latin
//! ligatures and full-width forms expanded, curly quotes straightened, NFC; ftfy's mojibake repair
//! is not reproduced), HTML unescaping twice, whitespace collapsed, lower-case — then CLIP's
//! regex, byte-level symbols, and byte-pair merges by rank (the `tokenizers` crate's BPE model with
//! the `</w>` end-of-word suffix). `encode` wraps the ids in start/end of text and truncates to
//! the context with the end-of-text token last; the reference code raises instead, so callers
//! count what was truncated.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use regex::Regex;
use tokenizers::Model;
use tokenizers::models::bpe::BPE;
use unicode_normalization::UnicodeNormalization;

/// How many merges CLIP reads from its merges file (`49152 - 256 - 2`).
pub const MAX_MERGES: usize = 48_894;
pub const START_OF_TEXT: &str = "<|startoftext|>";
pub const END_OF_TEXT: &str = "<|endoftext|>";

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Format { path: String, why: String },
}

/// CLIP's byte-level BPE tokenizer.
pub struct ClipTokenizer {
    bpe: BPE,
    vocab: HashMap<String, u32>,
    merges: Vec<(String, String)>,
    byte_symbol: [char; 256],
    pattern: Regex,
    terminal_escape: Regex,
    whitespace: Regex,
    pub start_of_text: u32,
    pub end_of_text: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab", &self.vocab.len())
            .finish()
    }
}

/// GPT-2's table from bytes to printable characters (CLIP's `bytes_to_unicode`).
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut extra = 0u32;
    for b in 0..256u32 {
        table[b as usize] = if printable(b) {
            char::from_u32(b).expect("a Latin-1 character")
        } else {
            extra += 1;
            char::from_u32(255 + extra).expect("a Latin Extended character")
        };
    }
    table
}

impl ClipTokenizer {
    /// Reads merges from `path`: OpenAI's `bpe_simple_vocab_16e6.txt[.gz]`, a Hugging Face
    /// `merges.txt` or `tokenizer.json`, or a folder holding `merges.txt` (and maybe
    /// `vocab.json`, then checked) or else `tokenizer.json`.
    pub fn from_path(path: &Path) -> Result<Self, TokenizerError> {
        let (file, vocab_json) = if path.is_dir() {
            let merges = path.join("merges.txt");
            let tokenizer_json = path.join("tokenizer.json");
            if !merges.is_file() && tokenizer_json.is_file() {
                (tokenizer_json, None)
            } else {
                (merges, Some(path.join("vocab.json")))
            }
        } else {
            (path.to_path_buf(), None)
        };
        let shown = file.display().to_string();
        let format_err = |why| TokenizerError::Format {
            path: shown.clone(),
            why,
        };
        let bytes = std::fs::read(&file).map_err(|e| TokenizerError::Read {
            path: shown.clone(),
            source: e,
        })?;
        let text = if bytes.starts_with(&[0x1f, 0x8b]) {
            let mut s = String::new();
            flate2::read::GzDecoder::new(&bytes[..])
                .read_to_string(&mut s)
                .map_err(|e| TokenizerError::Read {
                    path: shown.clone(),
                    source: e,
                })?;
            s
        } else {
            String::from_utf8(bytes).map_err(|e| format_err(format!("not UTF-8 text: {e}")))?
        };
        if text.trim_start().starts_with('{') {
            let (tokenizer, theirs) = Self::from_tokenizer_json(&text).map_err(format_err)?;
            tokenizer
                .check_vocab(&theirs, "the vocabulary of its BPE model")
                .map_err(format_err)?;
            return Ok(tokenizer);
        }
        let tokenizer = Self::from_merges_text(&text).map_err(format_err)?;
        if let Some(v) = vocab_json.filter(|v| v.is_file()) {
            let err = |why| TokenizerError::Format {
                path: v.display().to_string(),
                why,
            };
            let theirs: HashMap<String, u32> = std::fs::read(&v)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or_else(|| err("not a JSON object of token → id".into()))?;
            tokenizer.check_vocab(&theirs, "it").map_err(err)?;
        }
        Ok(tokenizer)
    }

    /// `theirs` (a vocabulary shipped beside or with the merges) must be the one CLIP builds.
    fn check_vocab(&self, theirs: &HashMap<String, u32>, what: &str) -> Result<(), String> {
        if *theirs == self.vocab {
            return Ok(());
        }
        let first = self
            .vocab
            .iter()
            .find(|(k, id)| theirs.get(*k) != Some(id))
            .map(|(k, id)| format!("`{k}` is {id} by the merges, {:?} in {what}", theirs.get(k)))
            .unwrap_or_else(|| format!("{} tokens in {what}", theirs.len()));
        Err(format!(
            "disagrees with the vocabulary CLIP builds from the merges ({first})"
        ))
    }

    /// The tokenizer of a Hugging Face `tokenizer.json`'s BPE model (merges as `"a b"` strings or
    /// `["a", "b"]` pairs, as `tokenizers` ≥ 0.20 writes them), and the vocabulary it lists.
    pub fn from_tokenizer_json(text: &str) -> Result<(Self, HashMap<String, u32>), String> {
        let json: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let model = &json["model"];
        if model["type"] != "BPE" || model["end_of_word_suffix"] != "</w>" {
            return Err(format!(
                "not CLIP's tokenizer: its model is {} with end-of-word suffix {} (CLIP's is BPE with `</w>`)",
                model["type"], model["end_of_word_suffix"]
            ));
        }
        let listed = model["merges"]
            .as_array()
            .ok_or("`model.merges` is not a list")?;
        let mut merges = Vec::with_capacity(listed.len().min(MAX_MERGES));
        for (k, m) in listed.iter().take(MAX_MERGES).enumerate() {
            let pair = match m {
                serde_json::Value::String(s) => s
                    .split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string())),
                serde_json::Value::Array(v) => match v.as_slice() {
                    [serde_json::Value::String(a), serde_json::Value::String(b)] => {
                        Some((a.clone(), b.clone()))
                    }
                    _ => None,
                },
                _ => None,
            };
            match pair {
                Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => {
                    merges.push((a, b))
                }
                _ => return Err(format!("`model.merges[{k}]` is not a merge: {m}")),
            }
        }
        let vocab: HashMap<String, u32> = serde_json::from_value(model["vocab"].clone())
            .map_err(|e| format!("`model.vocab` is not an object of token → id: {e}"))?;
        Ok((Self::from_merges(merges)?, vocab))
    }

    /// The tokenizer of a merges file's text (the first line is a `#version` header).
    pub fn from_merges_text(text: &str) -> Result<Self, String> {
        let mut lines = text.split('\n');
        let header = lines.next().unwrap_or_default();
        if !header.contains("#version") {
            return Err(format!(
                "the first line should be a `#version: …` header, not `{}`",
                header.chars().take(60).collect::<String>()
            ));
        }
        let mut merges = Vec::new();
        for (k, line) in lines.take(MAX_MERGES).enumerate() {
            if line.is_empty() {
                // Only at the end (the trailing newline).
                continue;
            }
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                    merges.push((a.to_string(), b.to_string()))
                }
                _ => return Err(format!("line {}: `{line}` is not a merge `a b`", k + 2)),
            }
        }
        Self::from_merges(merges)
    }

    /// The tokenizer of CLIP's merges, in rank order.
    fn from_merges(merges: Vec<(String, String)>) -> Result<Self, String> {
        if merges.is_empty() {
            return Err("no merges".into());
        }
        let byte_symbol = bytes_to_unicode();
        // CLIP lists the symbols in its table's insertion order: the printable bytes first (they
        // map to themselves), then the others.
        let mut symbols: Vec<char> = byte_symbol.to_vec();
        symbols.sort_by_key(|&c| (c as u32 > 255, c as u32));
        let mut order: Vec<String> = symbols.iter().map(|c| c.to_string()).collect();
        order.extend(symbols.iter().map(|c| format!("{c}</w>")));
        order.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        order.push(START_OF_TEXT.into());
        order.push(END_OF_TEXT.into());
        // CLIP builds a dict: a repeated token keeps its last id.
        let vocab: HashMap<String, u32> = order
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(
                vocab
                    .iter()
                    .map(|(k, v)| (k.clone(), *v))
                    .collect::<tokenizers::models::bpe::Vocab>(),
                merges.clone(),
            )
            .end_of_word_suffix("</w>".into())
            .build()
            .map_err(|e| format!("cannot build the BPE model: {e}"))?;
        Ok(Self {
            start_of_text: vocab[START_OF_TEXT],
            end_of_text: vocab[END_OF_TEXT],
            bpe,
            vocab,
            merges,
            byte_symbol,
            pattern: Regex::new(
                r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
            )
            .expect("a valid pattern"),
            terminal_escape: Regex::new(r"\x1b\[[0-9;]*[a-zA-Z]").expect("a valid pattern"),
            whitespace: Regex::new(r"\s+").expect("a valid pattern"),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// token → id (what a Hugging Face `vocab.json` holds).
    pub fn vocab(&self) -> &HashMap<String, u32> {
        &self.vocab
    }

    /// The merges in rank order.
    pub fn merges(&self) -> &[(String, String)] {
        &self.merges
    }

    /// Writes the Hugging Face `CLIPTokenizer` files (`merges.txt`, `vocab.json`) into `dir`.
    pub fn write_hf(&self, dir: &Path) -> std::io::Result<()> {
        let mut merges = String::from("#version: 0.2\n");
        for (a, b) in &self.merges {
            merges.push_str(a);
            merges.push(' ');
            merges.push_str(b);
            merges.push('\n');
        }
        std::fs::write(dir.join("merges.txt"), merges)?;
        let ordered: std::collections::BTreeMap<u32, &String> =
            self.vocab.iter().map(|(k, v)| (*v, k)).collect();
        let mut map = serde_json::Map::new();
        for (id, token) in ordered {
            map.insert(token.clone(), serde_json::Value::from(id));
        }
        std::fs::write(
            dir.join("vocab.json"),
            serde_json::to_vec(&serde_json::Value::Object(map)).unwrap_or_default(),
        )
    }

    /// The text as CLIP's tokenizer sees it: ftfy's fixes, HTML unescaped twice, whitespace
    /// collapsed and trimmed, lower-cased.
    pub fn clean(&self, text: &str) -> String {
        let mut s = if text.contains('<') {
            text.to_string()
        } else {
            htmlize::unescape(text).into_owned()
        };
        s = self.terminal_escape.replace_all(&s, "").into_owned();
        let mut fixed = String::with_capacity(s.len());
        for c in s.chars() {
            match c {
                // Latin ligatures (ftfy's table) and full-width forms: their compatibility forms.
                'Ĳ'
                | 'ĳ'
                | 'ŉ'
                | '\u{01C4}'..='\u{01CC}'
                | '\u{01F1}'..='\u{01F3}'
                | 'ﬀ'..='ﬆ'
                | '\u{FF01}'..='\u{FFEF}' => fixed.extend(c.to_string().nfkc()),
                '\u{3000}' => fixed.push(' '),
                // Curly quotes.
                '\u{02BC}' | '\u{2018}'..='\u{201B}' => fixed.push('\''),
                '\u{201C}'..='\u{201F}' => fixed.push('"'),
                // Control characters ftfy removes.
                '\u{0}'..='\u{8}'
                | '\u{B}'
                | '\u{E}'..='\u{1F}'
                | '\u{7F}'
                | '\u{206A}'..='\u{206F}'
                | '\u{FEFF}'
                | '\u{FFF9}'..='\u{FFFC}'
                | '\u{1D173}'..='\u{1D17A}'
                | '\u{E0000}'..='\u{E007F}' => {}
                _ => fixed.push(c),
            }
        }
        // ŉ becomes ʼn, whose apostrophe is straightened too.
        let fixed: String = fixed.replace('\u{02BC}', "'").nfc().collect::<String>();
        let unescaped = htmlize::unescape(htmlize::unescape(fixed.trim()).into_owned());
        self.whitespace
            .replace_all(&unescaped, " ")
            .trim()
            .to_lowercase()
    }

    /// The BPE ids of `text` (no start/end of text).
    pub fn encode_words(&self, text: &str) -> Vec<u32> {
        let cleaned = self.clean(text);
        let mut ids = Vec::new();
        for piece in self.pattern.find_iter(&cleaned) {
            let piece = piece.as_str();
            // CLIP's BPE cache maps the two special tokens to themselves.
            if piece == START_OF_TEXT || piece == END_OF_TEXT {
                ids.push(self.vocab[piece]);
                continue;
            }
            let symbols: String = piece
                .bytes()
                .map(|b| self.byte_symbol[b as usize])
                .collect();
            // Every byte symbol is in the vocabulary, so tokenizing cannot fail.
            if let Ok(tokens) = self.bpe.tokenize(&symbols) {
                ids.extend(tokens.iter().map(|t| t.id));
            }
        }
        ids
    }

    /// `[start] + ids + [end]`, cut to `context` tokens with the end-of-text token last; the
    /// flag says whether it was cut.
    pub fn encode(&self, text: &str, context: usize) -> (Vec<u32>, bool) {
        let mut ids = Vec::with_capacity(context);
        ids.push(self.start_of_text);
        ids.extend(self.encode_words(text));
        ids.push(self.end_of_text);
        let truncated = ids.len() > context;
        if truncated {
            ids.truncate(context.max(2));
            *ids.last_mut().expect("at least two ids") = self.end_of_text;
        }
        (ids, truncated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_gpt2s() {
        let t = bytes_to_unicode();
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[0], 'Ā');
        assert_eq!(t[0xAD], 'Ń');
        let distinct: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn a_merges_file_without_header_or_with_bad_lines_is_refused() {
        assert!(
            ClipTokenizer::from_merges_text("a b\n")
                .unwrap_err()
                .contains("#version")
        );
        assert!(
            ClipTokenizer::from_merges_text("#version: 0.2\na b c\n")
                .unwrap_err()
                .contains("line 2")
        );
    }
}
