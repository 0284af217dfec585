//! `cusa-pipe bench train`: step time of +CSA / +USA / +CUSA (and on `scenes-small` +LCA /
//! +CRA / +SelfAlign / +SelfAlign+CUSA) against the base loss on the same
//! batches (teacher vectors precomputed, the paper's setting for its +4.5 % figure), and
//! training throughput in pairs/s, on the CPU backend (burn ndarray): once with a
//! `feature-heads` student (a tiny MLP: the loss terms dominate the step) and once with the
//! `scenes-small` CNN + transformer trained from pixels and words, and once with a `clip`
//! student of the tiny test shape (both towers fine-tuned; ViT-B/32 figures need a GPU).

use cusa_stages::ml::clip::shape::{Activation, ClipShape, TextShape, Tower, VisionShape};
use cusa_stages::ml::scenes_small::ScenesSmallShape;
use cusa_stages::train::bench::{
    StepFigure, clip_step_times_cpu, feature_heads_step_times_cpu, scenes_small_step_times_cpu,
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

pub fn train(batch: usize, steps: usize) -> anyhow::Result<i32> {
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
    table(&scenes_small_step_times_cpu(
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
