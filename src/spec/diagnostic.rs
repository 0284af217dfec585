//! One error type for everything wrong with a pipeline file, rendered like a compiler error:
//!
//! ```text
//! error: unknown key `inptus` in stage `total`
//!   --> pipeline.yaml:12:5
//!    |
//! 12 |     inptus:
//!    |     ^
//!    = help: did you mean `inputs`?
//! ```

use std::fmt;
use std::path::PathBuf;

use super::location::Position;

/// A located problem in a pipeline file (or in a `--set` override).
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub position: Option<Position>,
    /// The offending source line, for the excerpt.
    pub source_line: Option<String>,
    pub stage: Option<String>,
    /// The key path, e.g. `stages.total.inputs.numbers`.
    pub key: Option<String>,
    pub message: String,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn new(file: PathBuf, message: impl Into<String>) -> Self {
        Self {
            file,
            position: None,
            source_line: None,
            stage: None,
            key: None,
            message: message.into(),
            help: None,
        }
    }

    /// `file:line:column`, or just the file when the position is unknown.
    pub fn location(&self) -> String {
        match self.position {
            Some(p) => format!("{}:{}:{}", self.file.display(), p.line, p.column),
            None => self.file.display().to_string(),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.message)?;
        if let Some(stage) = &self.stage {
            write!(f, " (stage `{stage}`)")?;
        }
        writeln!(f)?;
        writeln!(f, "  --> {}", self.location())?;
        if let (Some(pos), Some(line)) = (self.position, &self.source_line) {
            let num = pos.line.to_string();
            let pad = " ".repeat(num.len());
            writeln!(f, "{pad} |")?;
            writeln!(f, "{num} | {line}")?;
            let caret_pad: String = line
                .chars()
                .take(pos.column.saturating_sub(1))
                .map(|c| if c == '\t' { '\t' } else { ' ' })
                .collect();
            writeln!(f, "{pad} | {caret_pad}^")?;
            if let Some(help) = &self.help {
                writeln!(f, "{pad} = help: {help}")?;
            }
        } else if let Some(help) = &self.help {
            writeln!(f, "  = help: {help}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostic {}
