//! `cusa-pipe bench engine`: the engine's speed against peers, measured in the same run.
//!
//! Figures (best of `--repeat` runs, page cache warm for every contender alike):
//! * (a) cold hashing — no stat cache — of a many-file folder (default 100,000 × 4 KiB) and of
//!   one large file (default 2 GiB), against `sha256sum` over the same files;
//! * (b) a no-op `cusa-pipe status` whose pipeline has that folder as an input (warm stat cache);
//! * (c) `dvc status` on the same data and the same one-stage pipeline, if `dvc` is installed
//!   (`pip install dvc`), after one `dvc repro`.
//!
//! Every figure is printed with its ratio to the peer; nothing is asserted: speed targets are
//! read from this output, never from timed tests.

mod dataset;
mod eval;
mod gpu;
mod remote;
mod teacher;
mod train;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};

use crate::fingerprint::content::{ContentHasher, Walk, sha256_file};

#[derive(Clone, Copy, ValueEnum)]
pub enum Suite {
    /// Hashing, no-op status, DVC comparison
    Engine,
    /// Importing a COCO-sized Karpathy file (vs pandas + pyarrow); image verification speed
    Dataset,
    /// The quickstart's teachers vs Python onnxruntime + tokenizers + PIL/numpy
    Teacher,
    /// Step time of +CSA/+USA/+CUSA vs the base loss; training pairs/s; vs PyTorch on the CPU
    Train,
    /// Retrieval metrics on 5K × 25K embeddings vs numpy + eccv-caption
    Eval,
    /// Team cache push/pull (10,000 small objects, one large) vs the AWS CLI on a local S3
    Remote,
    /// The CUDA path: parity with the float64 fixtures, a short training, CLIP step time
    /// (`--device cpu` is the dry run; scripts/gpu/check.sh runs every part)
    Gpu,
}

#[derive(Args)]
pub struct BenchArgs {
    #[arg(value_enum)]
    suite: Suite,
    /// Where the generated data lives (kept between runs; reused if present)
    #[arg(long, default_value = "/tmp/cusa-pipe-bench")]
    dir: PathBuf,
    /// Files in the many-file folder
    #[arg(long, default_value_t = 100_000)]
    files: usize,
    /// Size of each of those files in bytes
    #[arg(long, default_value_t = 4096)]
    file_size: usize,
    /// Size of the large file in MiB
    #[arg(long, default_value_t = 2048)]
    big_mib: usize,
    /// Repetitions of each timing (the best is kept)
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// The DVC executable [default: `dvc` on PATH]
    #[arg(long)]
    dvc: Option<PathBuf>,
    /// Batch size of the train suite
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Timed steps per variant in the train suite
    #[arg(long, default_value_t = 40)]
    steps: usize,
    /// Images of the eval suite (5 captions each)
    #[arg(long, default_value_t = 5000)]
    images: usize,
    /// Embedding dimension of the eval suite
    #[arg(long, default_value_t = 512)]
    dim: usize,
    /// The Python of the peers (pandas + pyarrow for dataset, numpy + eccv-caption for eval,
    /// onnxruntime + onnx + tokenizers + pillow for teacher, torch for train, moto[server] +
    /// boto3 for remote)
    #[arg(long, default_value = "python3")]
    python: PathBuf,
    /// Small objects of the remote suite
    #[arg(long, default_value_t = 10_000)]
    objects: usize,
    /// Size of each small object of the remote suite in bytes
    #[arg(long, default_value_t = 4096)]
    object_size: usize,
    /// The AWS CLI (`pip install awscli`) for the remote suite
    #[arg(long, default_value = "aws")]
    aws: PathBuf,
    /// An S3 server with a bucket `cache` for the remote suite [default: moto started here]
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    #[command(flatten)]
    gpu: gpu::GpuArgs,
}

/// `p` made absolute when it names a file by a path (`dir/prog`), as is when it is a bare
/// name looked up on PATH (`dvc`).
fn program_path(p: &Path) -> PathBuf {
    if p.components().count() > 1 {
        std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
    } else {
        p.to_path_buf()
    }
}

pub fn bench(mut args: BenchArgs) -> anyhow::Result<i32> {
    // Some peers run from inside the bench folder: a program given by a relative path
    // (`target/bench-venv/bin/dvc`) is resolved against where the command was typed.
    for program in [&mut args.python, &mut args.aws] {
        *program = program_path(program);
    }
    args.dvc = args.dvc.as_deref().map(program_path);
    match args.suite {
        Suite::Engine => engine(args),
        Suite::Dataset => dataset::dataset(&args.dir, &args.python, args.repeat),
        Suite::Teacher => teacher::teacher(&args.dir, &args.python),
        Suite::Train => train::train(args.batch, args.steps, &args.python),
        Suite::Gpu => gpu::gpu(&args.gpu, &args.dir, args.batch, args.steps),
        Suite::Remote => {
            let big = args.dir.join("data/big.bin");
            generate_big(&big, args.big_mib)?;
            remote::remote(
                &args.dir,
                &args.python,
                &args.aws,
                args.objects,
                args.object_size,
                &big,
                args.big_mib,
                args.repeat,
                args.s3_endpoint.as_deref(),
            )
        }
        Suite::Eval => eval::eval(
            &args.dir,
            &args.python,
            args.images,
            5,
            args.dim,
            args.repeat,
        ),
    }
}

fn engine(args: BenchArgs) -> anyhow::Result<i32> {
    let root = &args.dir;
    let many = root.join("data/many");
    let big = root.join("data/big.bin");
    generate(&many, &big, &args)?;
    let files = list_files(&many)?;
    println!(
        "data: {} files × {} B in {}, one {} MiB file; {} cores",
        files.len(),
        args.file_size,
        many.display(),
        args.big_mib,
        cores()
    );

    // Warm the page cache for everyone.
    run_quiet(Command::new("sha256sum").arg(&big))?;
    sha256sum_files(&files)?;

    println!(
        "\n(a) cold hashing (no stat cache), best of {}",
        args.repeat
    );
    let ours_many = best(args.repeat, || {
        ContentHasher::new(None)
            .manifest(&many, Walk { follow_links: true })
            .map(drop)
            .map_err(anyhow::Error::from)
    })?;
    let peer_many = best(args.repeat, || sha256sum_files(&files))?;
    report(
        "many files",
        ours_many,
        "sha256sum (xargs)",
        peer_many,
        "goal ≥ 1.8×",
    );
    let ours_big = best(args.repeat, || {
        sha256_file(&big).map(drop).map_err(anyhow::Error::from)
    })?;
    let peer_big = best(args.repeat, || {
        run_quiet(Command::new("sha256sum").arg(&big))
    })?;
    report(
        "one large file",
        ours_big,
        "sha256sum",
        peer_big,
        "single stream: parity expected",
    );

    println!("\n(b) no-op status with the many-file folder as an input (warm)");
    let project = root.join("cusa");
    std::fs::create_dir_all(&project)?;
    std::fs::write(
        project.join("pipeline.yaml"),
        "version: 1\nstages:\n  consume:\n    kind: command\n    inputs:\n      data: ../data/many\n    with:\n      run: ls ${inputs.data} | wc -l > ${out}/count.txt\n",
    )?;
    let exe = std::env::current_exe().context("locating the cusa-pipe binary")?;
    let cusa = |verb: &str| {
        run_quiet(
            Command::new(&exe)
                .current_dir(&project)
                .args([verb, "pipeline.yaml"]),
        )
    };
    // Start from nothing, like DVC below.
    let _ = std::fs::remove_dir_all(project.join("cache"));
    let t = Instant::now();
    cusa("run")?;
    let cusa_first = t.elapsed();
    cusa("status")?;
    let status = best(args.repeat, || cusa("status"))?;
    let verdict = if status.as_secs_f64() < 0.15 {
        "met"
    } else {
        "NOT met"
    };
    println!(
        "  cusa-pipe status          {:>9}   goal < 0.15 s: {verdict}",
        secs(status)
    );

    println!("\n(c) the same pipeline under DVC");
    let dvc = args.dvc.clone().unwrap_or_else(|| PathBuf::from("dvc"));
    let found = Command::new(&dvc)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if found.is_err() {
        println!("  dvc not found: `pip install dvc` (or pass --dvc PATH) to measure it");
        return Ok(0);
    }
    // DVC starts from nothing too: its state database and lock file are removed.
    let repo = root.clone();
    for stale in [".dvc", "dvc.lock", "count.txt"] {
        let p = repo.join(stale);
        let _ = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
    }
    let dvc_in = |args: &[&str]| run_quiet(Command::new(&dvc).current_dir(&repo).args(args));
    dvc_in(&["init", "--no-scm", "-q"])?;
    std::fs::write(
        repo.join("dvc.yaml"),
        "stages:\n  consume:\n    cmd: ls data/many | wc -l > count.txt\n    deps:\n    - data/many\n    outs:\n    - count.txt\n",
    )?;
    let t = Instant::now();
    dvc_in(&["repro", "-q"])?;
    let dvc_first = t.elapsed();
    dvc_in(&["status", "-q"])?;
    let dvc_status = best(args.repeat, || dvc_in(&["status", "-q"]))?;
    report(
        "first run (cold)",
        cusa_first,
        "dvc repro",
        dvc_first,
        "both hash every file",
    );
    report(
        "no-op status",
        status,
        "dvc status",
        dvc_status,
        "goal < 0.15 s and ≥ 20×",
    );
    Ok(0)
}

fn generate(many: &Path, big: &Path, args: &BenchArgs) -> anyhow::Result<()> {
    let per_dir = 1000;
    let marker = many.join(format!(".complete-{}x{}", args.files, args.file_size));
    if !marker.exists() {
        eprintln!("generating {} files of {} B…", args.files, args.file_size);
        let _ = std::fs::remove_dir_all(many);
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let mut buf = vec![0u8; args.file_size];
        for i in 0..args.files {
            let dir = many.join(format!("d{:04}", i / per_dir));
            if i % per_dir == 0 {
                std::fs::create_dir_all(&dir)?;
            }
            rng.fill(&mut buf);
            std::fs::write(dir.join(format!("f{i:06}.bin")), &buf)?;
        }
        std::fs::write(&marker, b"")?;
    }
    generate_big(big, args.big_mib)
}

/// The large file of the engine and remote suites (kept between runs).
pub(crate) fn generate_big(big: &Path, mib: usize) -> anyhow::Result<()> {
    let want = (mib as u64) << 20;
    if std::fs::metadata(big).map(|m| m.len()).ok() != Some(want) {
        eprintln!("generating a {mib} MiB file…");
        if let Some(parent) = big.parent() {
            std::fs::create_dir_all(parent)?;
        }
        // A fresh inode: the remote suite hard-links the old one into a store (read-only).
        let _ = std::fs::remove_file(big);
        let mut f = std::io::BufWriter::new(std::fs::File::create(big)?);
        let mut rng = XorShift(0xD1B5_4A32_D192_ED03);
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..mib {
            rng.fill(&mut buf);
            f.write_all(&buf)?;
        }
        f.flush()?;
    }
    Ok(())
}

pub(crate) struct XorShift(pub(crate) u64);

impl XorShift {
    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let bytes = self.0.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

fn list_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file() && !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.into_path())
        .collect();
    out.sort();
    Ok(out)
}

/// `sha256sum` over many files, as `xargs` would batch them.
fn sha256sum_files(files: &[PathBuf]) -> anyhow::Result<()> {
    let mut child = Command::new("xargs")
        .args(["-0", "sha256sum"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("starting xargs sha256sum")?;
    {
        let mut stdin = child.stdin.take().expect("piped");
        for f in files {
            stdin.write_all(f.as_os_str().as_encoded_bytes())?;
            stdin.write_all(b"\0")?;
        }
    }
    if !child.wait()?.success() {
        bail!("sha256sum failed");
    }
    Ok(())
}

pub(crate) fn run_quiet(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

pub(crate) fn best(
    n: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Duration> {
    let mut best = Duration::MAX;
    for _ in 0..n.max(1) {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed());
    }
    Ok(best)
}

pub(crate) fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

pub(crate) fn report(what: &str, ours: Duration, peer_name: &str, peer: Duration, goal: &str) {
    let ratio = peer.as_secs_f64() / ours.as_secs_f64().max(1e-9);
    println!(
        "  {what:<24} cusa-pipe {:>9}   {peer_name} {:>9}   {ratio:.2}× faster   ({goal})",
        secs(ours),
        secs(peer)
    );
}

pub(crate) fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
