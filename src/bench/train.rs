//! `cusa-pipe bench train`: step time of +CSA / +USA / +CUSA against the base loss on the same
//! batches (features precomputed, the paper's setting for its +4.5 % figure), and training
//! throughput in pairs/s, on the CPU backend (burn ndarray).

pub fn train(batch: usize, steps: usize) -> anyhow::Result<i32> {
    type B = burn::backend::Autodiff<burn::backend::NdArray<f32>>;
    let (feature_dim, hidden, dim) = (384, 512, 256);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "feature-heads student {feature_dim}→{hidden}→{dim} per modality, batch {batch}, {steps} timed steps per variant (median), burn ndarray on {cores} cores"
    );
    let figures = cusa_stages::train::bench::step_times::<B>(
        &Default::default(),
        batch,
        feature_dim,
        hidden,
        dim,
        steps,
        5,
    );
    let base = figures[0].seconds_per_step;
    println!(
        "{:<7} {:>12} {:>12} {:>10}",
        "loss", "ms/step", "pairs/s", "vs base"
    );
    for f in &figures {
        println!(
            "{:<7} {:>12.2} {:>12.0} {:>+9.1}%",
            f.variant,
            f.seconds_per_step * 1e3,
            f.pairs_per_second,
            (f.seconds_per_step / base - 1.0) * 100.0
        );
    }
    println!("goal: +cusa ≤ +5 % over base (the paper: +4.5 % with both teachers precomputed)");
    Ok(0)
}
