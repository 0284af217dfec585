//! `cusa-pipe bench dataset`: importing a COCO-sized Karpathy split file, against pandas +
//! pyarrow doing the same work (`scripts/bench/karpathy_import_pandas.py`), and the speed of
//! `verify_images` on the scenes images. Wall time and peak memory come from `/usr/bin/time`.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

use super::{cores, report, run_quiet, secs};

/// Karpathy COCO: 82,783 train + 30,504 restval + 5,000 val + 5,000 test images; 616,767
/// captions (five per image, 332 images with a sixth).
const SPLITS: [(&str, usize); 4] = [
    ("train", 82_783),
    ("restval", 30_504),
    ("val", 5_000),
    ("test", 5_000),
];
const EXTRA_CAPTIONS: usize = 332;

const WORDS: [&str; 24] = [
    "man",
    "woman",
    "dog",
    "cat",
    "bus",
    "street",
    "table",
    "pizza",
    "riding",
    "sitting",
    "standing",
    "holding",
    "red",
    "large",
    "small",
    "white",
    "on",
    "near",
    "with",
    "of",
    "beach",
    "kitchen",
    "train",
    "skateboard",
];

fn write_coco_like(path: &Path) -> anyhow::Result<(usize, usize)> {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut s = String::with_capacity(160 << 20);
    s.push_str("{\"images\": [");
    let (mut imgid, mut sentid) = (0usize, 0usize);
    for (split, n) in SPLITS {
        for _ in 0..n {
            if imgid > 0 {
                s.push_str(", ");
            }
            let dir = if split == "train" {
                "train2014"
            } else {
                "val2014"
            };
            let cocoid = 100_000 + imgid * 3;
            let captions = 5 + usize::from(imgid < EXTRA_CAPTIONS);
            let ids: Vec<String> = (sentid..sentid + captions).map(|i| i.to_string()).collect();
            let _ = write!(
                s,
                "{{\"filepath\": \"{dir}\", \"sentids\": [{}], \"filename\": \"COCO_{dir}_{cocoid:012}.jpg\", \"imgid\": {imgid}, \"split\": \"{split}\", \"sentences\": [",
                ids.join(", ")
            );
            for k in 0..captions {
                let len = 8 + (next() % 6) as usize;
                let words: Vec<&str> = (0..len)
                    .map(|_| WORDS[(next() % WORDS.len() as u64) as usize])
                    .collect();
                let raw = format!(
                    "A {}, {}.",
                    words[..len / 2].join(" "),
                    words[len / 2..].join(" ")
                );
                let tokens: Vec<String> = raw
                    .to_lowercase()
                    .replace([',', '.'], "")
                    .split(' ')
                    .map(|w| format!("\"{w}\""))
                    .collect();
                if k > 0 {
                    s.push_str(", ");
                }
                let _ = write!(
                    s,
                    "{{\"tokens\": [{}], \"raw\": \"{raw}\", \"imgid\": {imgid}, \"sentid\": {sentid}}}",
                    tokens.join(", ")
                );
                sentid += 1;
            }
            let _ = write!(s, "], \"cocoid\": {cocoid}}}");
            imgid += 1;
        }
    }
    s.push_str("], \"dataset\": \"coco\"}");
    std::fs::write(path, s)?;
    Ok((imgid, sentid))
}

/// Runs a command under `/usr/bin/time`; returns (wall, peak RSS in MiB).
fn timed(cmd: &mut Command) -> anyhow::Result<(Duration, f64)> {
    let program = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    let mut timed = Command::new("/usr/bin/time");
    timed.arg("-f").arg("TIME %e %M").arg(&program).args(&args);
    if let Some(dir) = cmd.get_current_dir() {
        timed.current_dir(dir);
    }
    let out = timed
        .output()
        .context("running /usr/bin/time (apt-get install time)")?;
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("{program:?} failed: {err}");
    }
    let line = err
        .lines()
        .rev()
        .find(|l| l.starts_with("TIME "))
        .context("no timing line")?;
    let mut parts = line.split_whitespace().skip(1);
    let wall: f64 = parts.next().context("wall")?.parse()?;
    let kib: f64 = parts.next().context("rss")?.parse()?;
    Ok((Duration::from_secs_f64(wall), kib / 1024.0))
}

/// The fastest of `n` timed runs (wall, peak RSS of that run).
fn best_timed(
    n: usize,
    mut f: impl FnMut() -> anyhow::Result<(Duration, f64)>,
) -> anyhow::Result<(Duration, f64)> {
    let mut best = (Duration::MAX, 0.0);
    for _ in 0..n.max(1) {
        let t = f()?;
        if t.0 < best.0 {
            best = t;
        }
    }
    Ok(best)
}

pub fn dataset(root: &Path, python: &Path, repeat: usize) -> anyhow::Result<i32> {
    let dir = root.join("dataset");
    std::fs::create_dir_all(&dir)?;
    let json = dir.join("dataset_coco.json");
    let (images, captions) = write_coco_like(&json)?;
    println!(
        "data: {images} images, {captions} captions, {:.0} MiB of Karpathy JSON; {} cores",
        std::fs::metadata(&json)?.len() as f64 / 1048576.0,
        cores()
    );
    let exe = std::env::current_exe()?;
    std::fs::write(
        dir.join("pipeline.yaml"),
        "version: 1\nstages:\n  coco:\n    kind: dataset\n    inputs: {splits: dataset_coco.json}\n    with: {format: karpathy, annotations: \"${inputs.splits}\"}\n",
    )?;
    let pandas_ok = Command::new(python)
        .args(["-c", "import pandas, pyarrow"])
        .status()
        .is_ok_and(|s| s.success());

    println!("\n(a) Karpathy import without image decoding, best of {repeat} (wall, peak RSS)");
    let ours = best_timed(repeat, || {
        timed(
            Command::new(&exe)
                .current_dir(&dir)
                .args(["run", "--force-all", "pipeline.yaml"]),
        )
    })?;
    println!(
        "  cusa-pipe run (hashing, import, commit)  {}  {:.0} MiB",
        secs(ours.0),
        ours.1
    );
    if !pandas_ok {
        println!(
            "  {} has no pandas/pyarrow: pass --python with one (pip install pandas pyarrow)",
            python.display()
        );
        return Ok(0);
    }
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench/karpathy_import_pandas.py");
    let peer = best_timed(repeat, || {
        timed(
            Command::new(python)
                .arg(&script)
                .arg(&json)
                .arg(dir.join("pandas-out")),
        )
    })?;
    println!(
        "  pandas + pyarrow                          {}  {:.0} MiB",
        secs(peer.0),
        peer.1
    );
    report(
        "Karpathy import",
        ours.0,
        "pandas + pyarrow",
        peer.0,
        "goal ≥ 3×",
    );

    println!("\n(b) verify_images on the scenes images");
    let scenes = root.join("scenes");
    std::fs::create_dir_all(&scenes)?;
    std::fs::write(
        scenes.join("pipeline.yaml"),
        "version: 1\nstages:\n  scenes:\n    kind: dataset\n    with: {format: scenes, scenes: {seed: 1, train: 5000, val: 0, test: 0, size: 96}}\n",
    )?;
    run_quiet(
        Command::new(&exe)
            .current_dir(&scenes)
            .args(["run", "pipeline.yaml"]),
    )?;
    let out = String::from_utf8(
        Command::new(&exe)
            .current_dir(&scenes)
            .args(["path", "scenes"])
            .output()?
            .stdout,
    )?;
    let tree = Path::new(out.trim());
    let mut csv = String::from("image,caption\n");
    for i in 0..5000 {
        let _ = writeln!(csv, "images/train/train-{i:05}.png,a scene");
    }
    std::fs::write(scenes.join("list.csv"), csv)?;
    for verify in [false, true] {
        std::fs::write(
            scenes.join("verify.yaml"),
            format!(
                "version: 1\nstages:\n  check:\n    kind: dataset\n    inputs: {{list: list.csv, images: \"{}\"}}\n    with: {{format: table, annotations: \"${{inputs.list}}\", images: \"${{inputs.images}}\", columns: {{image: image, caption: caption}}, verify_images: {verify}}}\n",
                tree.display()
            ),
        )?;
        let (t, rss) = timed(Command::new(&exe).current_dir(&scenes).args([
            "run",
            "--force-all",
            "verify.yaml",
        ]))?;
        let rate = 5000.0 / t.as_secs_f64();
        println!(
            "  verify_images: {verify:<5}  5000 images in {}  {rate:.0} images/s ({:.0} per core)  {rss:.0} MiB",
            secs(t),
            rate / cores() as f64
        );
    }
    Ok(0)
}
