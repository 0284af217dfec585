//! `cusa-pipe bench train`: step time of +CSA / +USA / +CUSA (and on `scenes-small` +LCA /
//! +CRA / +SelfAlign / +SelfAlign+CUSA) against the base loss on the same
//! batches (teacher vectors precomputed, the paper's setting for its +4.5 % figure), and
//! training throughput in pairs/s, on the CPU backend (burn ndarray): once with a
//! `feature-heads` student (a tiny MLP: the loss terms dominate the step) and once with the
//! `scenes-small` CNN + transformer trained from pixels and words, and once with a `clip`
//! student of the tiny test shape (both towers fine-tuned; ViT-B/32 figures need a GPU).
//!
//! The peer: the same `scenes-small` student, batch, threads and optimiser in PyTorch on the
//! CPU (`scripts/bench/scenes_small_torch.py`, run with `--python`), measured in the same run
//! against the base loss.

use std::path::Path;
use std::process::Command;

use cusa_stages::ml::clip::shape::{Activation, ClipShape, TextShape, Tower, VisionShape};
use cusa_stages::ml::scenes_small::ScenesSmallShape;
use cusa_stages::train::bench::{
    StepFigure, clip_step_times_cpu, feature_heads_step_times_cpu, scenes_small_step_times_cpu,
    scenes_small_step_times_flex,
};

fn table(figures: &[StepFigure]) {
    let base = figures[0].seconds_per_step;
    println!(
        "{:<16} {:>12} {:>12} {:>10}",
        "loss", "ms/step", "pairs/s", "vs base"
    );
    for f in figures {
        println!(
            "{:<16} {:>12.2} {:>12.0} {:>+9.1}%",
            f.variant,
            f.seconds_per_step * 1e3,
            f.pairs_per_second,
            (f.seconds_per_step / base - 1.0) * 100.0
        );
    }
}

pub fn train(batch: usize, steps: usize, python: &Path) -> anyhow::Result<i32> {
    let (feature_dim, hidden, dim) = (384, 512, 256);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "burn ndarray on {cores} cores, batch {batch}, {steps} timed steps per variant (median), teachers 384-d"
    );
    println!("\nfeature-heads student {feature_dim}→{hidden}→{dim} per modality:");
    table(&feature_heads_step_times_cpu(
        batch,
        feature_dim,
        hidden,
        dim,
        steps,
        5,
    ));
    let shape = ScenesSmallShape {
        image_size: 48,
        channels: vec![32, 64, 128, 256],
        vocab: 90,
        max_words: 32,
        width: 128,
        layers: 2,
        heads: 4,
        dim: 256,
        uni_heads: false,
        selfalign: None,
    };
    println!(
        "\nscenes-small student (CNN 48 px {:?}, transformer 2×128 over 12 words, dim 256; SelfAlign: 36 regions, 1024 prototypes, 512 hardest):",
        shape.channels
    );
    let scenes_small = scenes_small_step_times_cpu(batch, &shape, (steps / 4).max(3), 2);
    table(&scenes_small);
    torch_peer(python, batch, (steps / 4).max(3), cores, &scenes_small[0]);
    println!("\nthe same scenes-small student on burn flex (f32), burn's other CPU backend:");
    table(&scenes_small_step_times_flex(
        batch,
        &shape,
        (steps / 4).max(3),
        2,
    ));
    let clip = tiny_clip();
    println!(
        "\nclip student, the tiny test shape (ViT 2×80 patch 8 at 32 px, text 2×64 over 14 tokens, embed 48; tests/fixtures/clip-tiny):"
    );
    table(&clip_step_times_cpu(batch, &clip, (steps / 4).max(3), 2));
    println!(
        "\ngoal: +cusa ≤ +5 % over base (the paper: +4.5 % with both teachers precomputed); +selfalign ≤ +25 %"
    );
    Ok(0)
}

/// The PyTorch CPU peer of the `scenes-small` base step, and the goal line.
fn torch_peer(python: &Path, batch: usize, steps: usize, threads: usize, ours: &StepFigure) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench/scenes_small_torch.py");
    let out = Command::new(python)
        .arg(&script)
        .args(["--batch", &batch.to_string()])
        .args(["--steps", &steps.to_string()])
        .args(["--threads", &threads.to_string()])
        .output();
    let peer = match out {
        Ok(o) if o.status.success() => serde_json::from_slice::<serde_json::Value>(&o.stdout).ok(),
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            println!(
                "  the PyTorch peer did not run ({}): pip install torch, or pass --python\n  {}",
                python.display(),
                err.lines().last().unwrap_or("")
            );
            return;
        }
        Err(e) => {
            println!("  the PyTorch peer did not run ({}): {e}", python.display());
            return;
        }
    };
    let Some(peer) = peer else {
        println!("  the PyTorch peer printed no JSON");
        return;
    };
    let theirs = peer["seconds_per_step"].as_f64().unwrap_or(f64::NAN);
    let ratio = theirs / ours.seconds_per_step;
    println!(
        "  PyTorch {} on the CPU ({} threads, {} kernels), same student, batch and AdamW, base loss: {:.2} ms/step",
        peer["torch"].as_str().unwrap_or("?"),
        peer["threads"],
        peer["cpu_capability"].as_str().unwrap_or("?"),
        theirs * 1e3
    );
    println!(
        "  cusa-pipe base {:.2} ms/step: {ratio:.2}× PyTorch's speed (goal ≥ 1.0×: {})",
        ours.seconds_per_step * 1e3,
        if ratio >= 1.0 { "met" } else { "NOT met" }
    );
}

/// The tiny test shape of `tests/fixtures/clip-tiny`: ViT 2×80 patch 8 at 32 px, text 2×64,
/// embed 48.
pub fn tiny_clip() -> ClipShape {
    let tower = |width, mlp| Tower {
        width,
        layers: 2,
        heads: 4,
        mlp,
        activation: Activation::QuickGelu,
    };
    ClipShape {
        vision: VisionShape {
            tower: tower(80, 160),
            image_size: 32,
            patch_size: 8,
        },
        text: TextShape {
            tower: tower(64, 128),
            vocab: 1024,
            context: 77,
        },
        embed_dim: 48,
    }
}
