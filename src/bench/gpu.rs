//! `cusa-pipe bench gpu`: one part of the CUDA check per run (scripts/gpu/check.sh runs them
//! all, each under its own timeout, next to the PyTorch peer `scripts/bench/clip_step_torch.py`).
//!
//! * `--part parity`: the tiny CLIP's forward, the losses and SelfAlign's terms with their
//!   gradients against the float64 fixtures, on the device, bounded for its arithmetic (f32,
//!   or f32 with TF32 products on CUDA);
//! * `--part parity-f64`: the same in f64, where no product is rounded (the formulas and the
//!   kernels);
//! * `--part train`: a few steps of the tiny CLIP on one batch (the loss must fall) and a reload
//!   of the saved weights (same embeddings);
//! * `--part step`: the step time of a CLIP (`--clip ViT-B-32`, random init, `--batch` pairs of
//!   224 px pictures and `--text-len` tokens, AdamW) with the base loss or +CUSA, fp32 or
//!   bf16-mixed.
//!
//! Each run prints its table and, with `--json`, writes one object
//! `{suite, part, device, backend, precision, loss, passed, outcome}`. The exit status is 0 when
//! the part passed, 1 when a figure is outside its bound, 2 when the part could not run.
//! `--device cpu` is the dry run: the same code on burn's ndarray backend.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use cusa_stages::device::{Device, Placement, place};
use cusa_stages::ml::clip::shape::ClipShape;
use cusa_stages::ml::precision::Precision;
use cusa_stages::train::device_check::{Outcome, Parity, Part, Plan, run_cpu};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GpuDevice {
    Cuda,
    Cpu,
}

/// A value of one of the check's serde enums (`Part`, `Precision`), by its serde name.
fn by_name<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(s.into())).map_err(|e| e.to_string())
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GpuLoss {
    Base,
    Cusa,
}

#[derive(Args)]
pub struct GpuArgs {
    /// gpu suite: where it computes (`cpu` is the dry run)
    #[arg(long, value_enum, default_value = "cuda")]
    device: GpuDevice,
    /// gpu suite: which part: parity, parity-f64, train or step
    #[arg(long, value_parser = by_name::<Part>, default_value = "parity")]
    part: Part,
    /// gpu suite: precision of train and step, fp32 or bf16-mixed (parity checks fp32, and
    /// bf16-mixed too when given)
    #[arg(long, value_parser = by_name::<Precision>, default_value = "fp32")]
    precision: Precision,
    /// gpu suite: the loss of the step part
    #[arg(long, value_enum, default_value = "base")]
    loss: GpuLoss,
    /// gpu suite: the CLIP of the step part, an OpenAI shape (ViT-B-32, ViT-B-16, ViT-L-14) or
    /// `tiny` (tests/fixtures/clip-tiny's)
    #[arg(long, default_value = "ViT-B-32")]
    clip: String,
    /// gpu suite: tokens per caption in the step part (start and end included)
    #[arg(long, default_value_t = 77)]
    text_len: usize,
    /// gpu suite: untimed steps after the first
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// gpu suite: steps of the train part
    #[arg(long, default_value_t = 12)]
    train_steps: usize,
    /// gpu suite: the repository's `tests/fixtures` (clip-tiny, clip_tiny.json) [default: found
    /// from the current directory]
    #[arg(long)]
    fixtures: Option<PathBuf>,
    /// gpu suite: write the part's outcome here as JSON
    #[arg(long)]
    json: Option<PathBuf>,
}

/// `tests/fixtures` and `stages/tests/fixtures/{losses,selfalign}.json` of the repository at or above the
/// current directory.
fn fixtures(given: Option<&Path>) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let root = match given {
        Some(f) => f
            .parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default(),
        None => {
            let cwd = std::env::current_dir()?;
            cwd.ancestors()
                .find(|d| d.join("tests/fixtures/clip_tiny.json").is_file())
                .map(Path::to_path_buf)
                .with_context(|| {
                    format!(
                        "no tests/fixtures/clip_tiny.json at or above {}: run from the cusa-pipe repository or pass --fixtures",
                        cwd.display()
                    )
                })?
        }
    };
    let fixtures = given.map_or_else(|| root.join("tests/fixtures"), Path::to_path_buf);
    let losses = root.join("stages/tests/fixtures/losses.json");
    let selfalign = root.join("stages/tests/fixtures/selfalign.json");
    for needed in [
        fixtures.join("clip_tiny.json"),
        losses.clone(),
        selfalign.clone(),
    ] {
        if !needed.is_file() {
            bail!(
                "{} is missing: the check needs the repository's fixtures",
                needed.display()
            );
        }
    }
    Ok((fixtures, losses, selfalign))
}

fn shape(name: &str) -> anyhow::Result<ClipShape> {
    if name == "tiny" {
        return Ok(super::train::tiny_clip());
    }
    ClipShape::preset(name).with_context(|| {
        format!(
            "--clip {name}: not a known shape; use tiny or one of {}",
            cusa_stages::ml::clip::shape::PRESETS.join(", ")
        )
    })
}

/// What `nvidia-smi` says about the GPUs (name, driver, memory), if it is installed.
fn driver() -> Option<String> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,driver_version,memory.total,memory.used",
            "--format=csv,noheader",
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// One parity row, printed (and flushed) as soon as it is known.
fn print_parity(p: &Parity) {
    println!(
        "{:<60} {:>11.3e} {:>9.1e}..{:<9.1e}  {}",
        p.check,
        p.value,
        p.low,
        p.high,
        match (p.judged, p.within_bounds()) {
            (true, true) => "yes",
            (true, false) => "NO",
            (false, true) => "(reported) yes",
            (false, false) => "(reported) no",
        }
    );
    let _ = std::io::stdout().flush();
}

fn print(outcome: &Outcome) {
    match outcome {
        // Printed row by row as they came.
        Outcome::Parity(_) => {}
        Outcome::Train(t) => {
            let losses: Vec<String> = t.losses.iter().map(|l| format!("{l:.4}")).collect();
            println!("losses by step: {}", losses.join(" "));
            println!(
                "reloaded weights: largest embedding difference {:e}; {:.1} s",
                t.reload_difference, t.seconds
            );
        }
        Outcome::Step(s) => {
            println!(
                "{:<8} {:<11} {:>6} {:>11} {:>13} {:>10}",
                "loss", "precision", "batch", "first (s)", "median (ms)", "images/s"
            );
            println!(
                "{:<8} {:<11} {:>6} {:>11.2} {:>13.1} {:>10.1}",
                s.loss,
                s.precision,
                s.batch,
                s.first_step_s,
                s.median_step_s * 1e3,
                s.images_per_s
            );
        }
    }
}

/// Runs one part; an error (no CUDA, missing fixtures, a failed step) is printed and gives
/// exit status 2, kept apart from 1 (a figure out of bounds).
pub fn gpu(args: &GpuArgs, dir: &Path, batch: usize, steps: usize) -> anyhow::Result<i32> {
    match run_part(args, dir, batch, steps) {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            Ok(2)
        }
    }
}

fn run_part(args: &GpuArgs, dir: &Path, batch: usize, steps: usize) -> anyhow::Result<i32> {
    let (fixtures, losses, selfalign) = fixtures(args.fixtures.as_deref())?;
    let plan = Plan {
        part: args.part,
        fixtures,
        losses,
        selfalign,
        scratch: dir.join("gpu"),
        precision: args.precision,
        cusa: args.loss == GpuLoss::Cusa,
        shape: shape(&args.clip)?,
        batch,
        text_len: args.text_len,
        steps,
        warmup: args.warmup,
        train_steps: args.train_steps,
    };
    let driver = driver();
    if let Some(d) = &driver {
        println!("nvidia-smi: {d}");
    }
    if matches!(plan.part, Part::Parity | Part::ParityF64) {
        println!("{:<60} {:>11} {:>21}  ok", "check", "value", "bound");
    }
    let each = &mut print_parity;
    let result = match args.device {
        GpuDevice::Cpu => run_cpu(&plan, each),
        GpuDevice::Cuda => match place(Device::Cuda, &[0]).map_err(|e| anyhow::anyhow!("{e}"))? {
            #[cfg(feature = "cuda")]
            Placement::Cuda(gpu) => cusa_stages::train::device_check::run_cuda(&plan, gpu, each),
            Placement::Cpu(why) => bail!("no CUDA: {why}"),
        },
    };
    let (backend, outcome) = result.map_err(|e| anyhow::anyhow!("bench gpu: {e}"))?;
    println!("backend: {backend}");
    print(&outcome);
    let passed = outcome.passed();
    if let Some(path) = &args.json {
        let record = serde_json::json!({
            "suite": "gpu",
            "part": plan.part,
            "device": match args.device { GpuDevice::Cuda => "cuda", GpuDevice::Cpu => "cpu" },
            "driver": driver,
            "backend": backend,
            "precision": plan.precision.to_string(),
            "loss": if plan.cusa { "+cusa" } else { "base" },
            "clip": args.clip,
            "passed": passed,
            "outcome": outcome,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&record)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(if passed { 0 } else { 1 })
}
