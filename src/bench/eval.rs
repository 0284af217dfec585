//! `cusa-pipe bench eval`: the `eval` stage's metrics on a COCO-5K-sized gallery (default 5,000
//! images × 25,000 captions, d = 512, random embeddings with extended positive sets) against the
//! reference code on the same input, in the same run: numpy similarities + top-K, then
//! eccv-caption's own metric functions (`scripts/bench/eval_eccv_caption.py`). Both sides'
//! numbers are printed and compared; wall time excludes loading, peak RSS includes the inputs.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use cusa_stages::ml::retrieval::{self, Matrix};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use serde_json::{Value, json};

fn write_f32(path: &Path, data: &[f32]) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for x in data {
        f.write_all(&x.to_le_bytes())?;
    }
    Ok(f.flush()?)
}

/// Peak resident memory of this process since the last reset, in MiB (Linux `VmHWM`).
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

pub fn eval(
    root: &Path,
    python: &Path,
    images: usize,
    per_image: usize,
    dim: usize,
    repeat: usize,
) -> anyhow::Result<i32> {
    let dir = root.join("eval");
    std::fs::create_dir_all(&dir)?;
    let captions = images * per_image;
    // Integer-valued coordinates: every dot product (|x| ≤ 127, d ≤ 1024) is an integer below
    // 2^24, exact in float32 whatever the summation order, so both sides rank the same scores
    // and any difference in the numbers is a difference in the metrics, not in rounding. A
    // caption is its image plus noise (R@1 near the middle of the range); exact ties are rare
    // and both sides order them the same way (wrong items first).
    let mut rng = StdRng::seed_from_u64(5);
    let mut normal = |std: f32| std * rng.sample::<f32, _>(StandardNormal);
    let im: Vec<f32> = (0..images * dim)
        .map(|_| normal(20.0).round().clamp(-127.0, 127.0))
        .collect();
    let image_of: Vec<usize> = (0..captions).map(|c| c / per_image).collect();
    let cap: Vec<f32> = (0..captions * dim)
        .map(|k| {
            (im[image_of[k / dim] * dim + k % dim] + normal(100.0))
                .round()
                .clamp(-127.0, 127.0)
        })
        .collect();
    // Extended positives, ECCV-Caption-like: an image's own captions plus up to 25 others, a
    // caption's own image plus up to 15 others; every 11th caption has none (skipped).
    let i2t: Vec<Vec<usize>> = (0..images)
        .map(|i| {
            let mut p: Vec<usize> = (i * per_image..(i + 1) * per_image).collect();
            p.extend((0..rng.random_range(0..=25)).map(|_| rng.random_range(0..captions)));
            p.sort_unstable();
            p.dedup();
            p
        })
        .collect();
    let t2i: Vec<Vec<usize>> = (0..captions)
        .map(|c| {
            if c % 11 == 10 {
                return Vec::new();
            }
            let mut p = vec![image_of[c]];
            p.extend((0..rng.random_range(0..=15)).map(|_| rng.random_range(0..images)));
            p.sort_unstable();
            p.dedup();
            p
        })
        .collect();
    write_f32(&dir.join("images.f32"), &im)?;
    write_f32(&dir.join("captions.f32"), &cap)?;
    std::fs::write(
        dir.join("image_of.u32"),
        image_of
            .iter()
            .flat_map(|&i| (i as u32).to_le_bytes())
            .collect::<Vec<u8>>(),
    )?;
    std::fs::write(
        dir.join("positives.json"),
        serde_json::to_vec(&json!({"i2t": i2t, "t2i": t2i}))?,
    )?;
    std::fs::write(
        dir.join("meta.json"),
        serde_json::to_vec(&json!({"images": images, "captions": captions, "dim": dim}))?,
    )?;
    println!(
        "{images} images × {captions} captions, d = {dim}, random integer-valued embeddings; {} cores",
        super::cores()
    );

    // Ours: the functions the eval stage calls, best of `repeat`.
    let (images_m, captions_m) = (Matrix { data: &im, dim }, Matrix { data: &cap, dim });
    let positives = [i2t, t2i];
    let _ = std::fs::write("/proc/self/clear_refs", "5"); // resets VmHWM
    let mut best = f64::INFINITY;
    let mut result = None;
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        let r = retrieval::measure(&images_m, &captions_m, &image_of, Some(&positives));
        best = best.min(t.elapsed().as_secs_f64());
        result = Some(r);
    }
    let ours_rss = peak_rss_mib();
    let (ranks, extended) = result.context("no run")?;
    let recalls = ranks.recalls();
    let [ext_i2t, ext_t2i] = extended.context("no extended metrics")?;
    let ours: Vec<(String, f64)> = vec![
        ("i2t R@1".into(), recalls.i2t_r1),
        ("i2t R@5".into(), recalls.i2t_r5),
        ("i2t R@10".into(), recalls.i2t_r10),
        ("t2i R@1".into(), recalls.t2i_r1),
        ("t2i R@5".into(), recalls.t2i_r5),
        ("t2i R@10".into(), recalls.t2i_r10),
        ("i2t mAP@R".into(), ext_i2t.map_at_r),
        ("i2t R-P".into(), ext_i2t.r_precision),
        ("i2t ext R@1".into(), ext_i2t.r1),
        ("t2i mAP@R".into(), ext_t2i.map_at_r),
        ("t2i R-P".into(), ext_t2i.r_precision),
        ("t2i ext R@1".into(), ext_t2i.r1),
    ];

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench/eval_eccv_caption.py");
    // OpenBLAS picks its own kernels: this machine's environment may force older ones.
    let out = Command::new(python)
        .arg(&script)
        .arg(&dir)
        .env_remove("OPENBLAS_CORETYPE")
        .env_remove("OPENBLAS_L2_SIZE")
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        println!(
            "cusa-pipe: {best:.3} s, peak RSS {ours_rss:.0} MiB\n\nthe peer did not run ({}): pip install numpy eccv-caption==0.1.0, or pass --python\n{}",
            python.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        return Ok(0);
    }
    let peer: Value = serde_json::from_slice(&out.stdout).context("the peer's output")?;
    let peer_value = |name: &str| -> Option<f64> {
        let (direction, metric) = name.split_once(' ')?;
        if let Some(m) = metric.strip_prefix("ext ") {
            return peer["extended"][direction][m].as_f64();
        }
        if metric.starts_with("mAP") || metric.starts_with("R-P") {
            return peer["extended"][direction][metric].as_f64();
        }
        peer["recalls"][name].as_f64()
    };
    println!(
        "\n{:<12} {:>12} {:>14}",
        "metric", "cusa-pipe", "eccv-caption"
    );
    let mut identical = true;
    for (name, value) in &ours {
        let theirs = peer_value(name).unwrap_or(f64::NAN);
        let same = (value - theirs).abs() <= 1e-9 * value.abs().max(1.0);
        identical &= same;
        println!(
            "{name:<12} {value:>12.4} {theirs:>14.4}{}",
            if same { "" } else { "   DIFFERENT" }
        );
    }
    let peer_s = peer["seconds"].as_f64().unwrap_or(f64::NAN);
    println!("\nfull cross-modal + extended metrics, both directions (best of {repeat} for ours):");
    println!("  cusa-pipe                      {best:>8.3} s   peak RSS {ours_rss:>6.0} MiB");
    println!(
        "  numpy + eccv-caption           {peer_s:>8.3} s   peak RSS {:>6.0} MiB",
        peer["peak_rss_mib"].as_f64().unwrap_or(f64::NAN)
    );
    println!(
        "  {:.1}× faster; numbers {}",
        peer_s / best,
        if identical { "identical" } else { "DIFFER" }
    );
    let gemm_s = peer["gemm_seconds"].as_f64().unwrap_or(f64::NAN);
    println!(
        "  the floor: one {images}×{captions}×{dim} product alone, numpy {gemm_s:.3} s ({})",
        peer["blas"].as_str().unwrap_or("unknown BLAS")
    );
    println!(
        "  goal ≤ 2× that product ({:.3} s): {:.2}× it — {}",
        2.0 * gemm_s,
        best / gemm_s,
        if best <= 2.0 * gemm_s {
            "met"
        } else {
            "NOT met"
        }
    );
    if !identical {
        bail!("the metrics differ from the reference");
    }
    Ok(0)
}
