//! The one place that prints what a run does: one outcome vocabulary, one reporter.
//!
//! Human lines go to stderr (with progress bars when stderr is a terminal); `--json` prints a
//! single document on stdout at the end. Stage kinds never print: they log and report
//! progress through [`StageProgress`].

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::fingerprint::{Fingerprint, MissReason};

/// What happened to a stage in a run (the fixed vocabulary of `--json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ran,
    Cached,
    Restored,
    Failed,
    Skipped,
    /// `--dry-run`: would execute.
    WouldRun,
}

impl Outcome {
    /// The `--json` and history spelling (`would_run`).
    pub fn key(self) -> &'static str {
        match self {
            Outcome::WouldRun => "would_run",
            other => other.word(),
        }
    }

    pub fn word(self) -> &'static str {
        match self {
            Outcome::Ran => "ran",
            Outcome::Cached => "cached",
            Outcome::Restored => "restored",
            Outcome::Failed => "failed",
            Outcome::Skipped => "skipped",
            Outcome::WouldRun => "would run",
        }
    }
}

/// The result of one stage in one run.
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    pub name: String,
    /// For an element of a matrix stage: the stage as written and its labels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matrix: Option<crate::spec::Element>,
    pub outcome: Outcome,
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<Fingerprint>,
    #[serde(serialize_with = "reasons_as_words")]
    pub reasons: Vec<MissReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<PathBuf>,
    /// Where it executed, when not in this process (`slurm job 1234 (node)`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ran_on: Option<crate::executor::Placement>,
    #[serde(skip)]
    pub log_tail: Vec<String>,
}

fn reasons_as_words<S: serde::Serializer>(r: &[MissReason], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(r.iter().map(ToString::to_string))
}

impl StageReport {
    pub fn new(name: &str, outcome: Outcome) -> Self {
        StageReport {
            name: name.to_string(),
            matrix: None,
            outcome,
            seconds: 0.0,
            fingerprint: None,
            reasons: Vec::new(),
            error: None,
            hint: None,
            notes: Vec::new(),
            log: None,
            ran_on: None,
            log_tail: Vec::new(),
        }
    }
}

/// Joins reasons for one line.
pub fn reasons_text(reasons: &[MissReason]) -> String {
    reasons
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

pub struct Reporter {
    multi: Option<MultiProgress>,
    width: usize,
    started: Instant,
    bars: Mutex<Vec<(String, ProgressBar)>>,
}

impl Reporter {
    /// `width`: the longest stage name, for alignment.
    pub fn new(width: usize) -> Self {
        let multi = std::io::stderr()
            .is_terminal()
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Reporter {
            multi,
            width,
            started: Instant::now(),
            bars: Mutex::new(Vec::new()),
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Prints a line above any progress bars.
    pub fn line(&self, text: &str) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(text);
            }
            None => eprintln!("{text}"),
        }
    }

    /// `word  name  rest`, aligned with every stage line of the run.
    pub fn stage_line(&self, word: &str, name: &str, rest: &str) -> String {
        let line = format!("{word:>9}  {name:w$}  {rest}", w = self.width);
        line.trim_end().to_string()
    }

    /// A stage starts executing.
    pub fn started(&self, name: &str, reasons: &[MissReason]) -> StageProgress {
        self.line(&self.stage_line("run", name, &reasons_text(reasons)));
        let bar = self.multi.as_ref().map(|m| {
            let bar = m.add(ProgressBar::new_spinner());
            bar.set_style(spinner_style());
            bar.set_prefix(name.to_string());
            bar.enable_steady_tick(Duration::from_millis(120));
            self.bars
                .lock()
                .expect("bars")
                .push((name.to_string(), bar.clone()));
            bar
        });
        StageProgress { bar }
    }

    /// Another process holds something this run needs.
    pub fn waiting(&self, what: &str) {
        self.line(&format!("  waiting  {what}"));
    }

    /// A stage finished (any outcome).
    pub fn finished(&self, r: &StageReport) {
        if let Some(m) = &self.multi {
            let mut bars = self.bars.lock().expect("bars");
            if let Some(i) = bars.iter().position(|(n, _)| n == &r.name) {
                let (_, bar) = bars.remove(i);
                bar.finish_and_clear();
                m.remove(&bar);
            }
        }
        let short = r
            .fingerprint
            .as_ref()
            .map(|f| f.short().to_string())
            .unwrap_or_default();
        let rest = match r.outcome {
            Outcome::Ran => format!("{}  {short}", seconds(r.seconds)),
            Outcome::Cached => short,
            Outcome::Restored => format!("saved {}  {short}", seconds(r.seconds)),
            Outcome::WouldRun => reasons_text(&r.reasons),
            Outcome::Failed | Outcome::Skipped => r.error.clone().unwrap_or_default(),
        };
        let mut text = self.stage_line(r.outcome.word(), &r.name, &rest);
        let pad = " ".repeat(11);
        for note in &r.notes {
            text.push_str(&format!("\n{pad}note: {note}"));
        }
        if r.outcome == Outcome::Failed {
            for l in &r.log_tail {
                text.push_str(&format!("\n{pad}│ {l}"));
            }
            if let Some(h) = &r.hint {
                text.push_str(&format!("\n{pad}help: {h}"));
            }
            if let Some(log) = &r.log {
                text.push_str(&format!("\n{pad}log: {}", log.display()));
            }
        }
        self.line(&text);
    }

    /// The closing line.
    pub fn summary(&self, reports: &[StageReport], interrupted: bool) {
        let count = |o: Outcome| reports.iter().filter(|r| r.outcome == o).count();
        let mut parts = Vec::new();
        for o in [
            Outcome::Ran,
            Outcome::Cached,
            Outcome::Restored,
            Outcome::WouldRun,
            Outcome::Failed,
            Outcome::Skipped,
        ] {
            let n = count(o);
            if n > 0 {
                parts.push(format!("{n} {}", o.word()));
            }
        }
        let head = if interrupted { "interrupted" } else { "done" };
        self.line(&format!(
            "{head}: {} in {}",
            parts.join(", "),
            seconds(self.elapsed().as_secs_f64())
        ));
    }
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {prefix} {elapsed:>4} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {prefix} {elapsed:>4} {msg} {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}

fn items_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{spinner} {prefix} {elapsed:>4} {msg} {wide_bar} {pos}/{len} {per_sec} eta {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
}

pub fn seconds(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1}s")
    } else {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    }
}

/// A stage's progress bar (invisible when stderr is not a terminal).
pub struct StageProgress {
    bar: Option<ProgressBar>,
}

impl cusa_stages::api::Progress for StageProgress {
    fn set_length(&self, len: Option<u64>) {
        if let Some(b) = &self.bar {
            match len {
                Some(l) => {
                    b.set_style(bar_style());
                    b.set_length(l);
                }
                None => {
                    b.set_style(spinner_style());
                    b.unset_length();
                }
            }
        }
    }
    fn set_items(&self, total: Option<u64>) {
        if let Some(b) = &self.bar {
            match total {
                Some(n) => {
                    b.set_style(items_style());
                    b.set_length(n);
                }
                None => b.set_style(spinner_style()),
            }
        }
    }
    fn set_position(&self, pos: u64) {
        if let Some(b) = &self.bar {
            b.set_position(pos);
        }
    }
    fn set_message(&self, msg: &str) {
        if let Some(b) = &self.bar {
            b.set_message(msg.to_string());
        }
    }
}

/// Bytes for people: `512 B`, `1.5 KiB`, `3.2 GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
