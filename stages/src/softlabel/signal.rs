//! How much the teachers know about the false negatives CUSA exists for, measured against a
//! dataset's exact (extended) positives: run this before spending GPU-days on CUSA with new
//! teachers.
//!
//! Over batches of the training batch size (captions, each with its image, as training draws
//! them), per direction:
//! * **i2t** (the soft labels P^II of CSA's image→text term): row k is image i_k, column l the
//!   caption c_l of the batch; the teacher's score is cos(u_{i_k}, u_{i_l}) (image teacher);
//!   the pair is a true positive when c_l truly describes i_k;
//! * **t2i** (P^TT, text→image): row k is caption c_k, column l the image i_l; the score is
//!   cos(v_{c_k}, v_{c_l}) (text teacher); true when i_l is truly described by c_k.
//!
//! Columns of the row's own image (the diagonal, and other captions of the same image) are
//! excluded from the AUC and the positives: they are the one-hot target's positives already.
//! Figures: the ROC AUC of the score for true-positive vs negative pairs (ties count ½; 0.5 is
//! no signal), the soft labels' mass (softmax over the whole row, diagonal included, at τ_s) on
//! the true positives against what a uniform row would put there (their count / B) and on the
//! row's own image (all the one-hot target wants), the same mass split (own / true positives /
//! negatives) at a sweep of temperatures (τ_s = 1 down to 0.05: AUC is scale-free, the soft
//! labels are not — at τ_s = 1 cosines in a narrow band give nearly uniform rows whatever the
//! teacher knows), and the precision@k of each item's k nearest teacher neighbours in the
//! whole split (other images' items only) against the rate of positives among all candidates.
//!
//! Invariants: the figures are a pure function of the vectors, the positives, the batches and
//! τ_s (float64 accumulation, batches drawn from a fixed seed); `scripts/fixtures/
//! teacher_signal.py` computes the same in numpy float64 and the tests compare.

use std::collections::HashSet;

use rayon::prelude::*;
use serde::Serialize;

/// Everything the figures are computed from; rows index the softlabel stage's files.
pub struct Inputs<'a> {
    /// Unit image-teacher vectors, `dim_i` wide, one per image row.
    pub images: &'a [f32],
    pub dim_i: usize,
    /// Unit text-teacher vectors, `dim_t` wide, one per caption row.
    pub captions: &'a [f32],
    pub dim_t: usize,
    /// The image row of each caption.
    pub caption_image: &'a [u32],
    /// (caption row, image row) pairs where the caption truly describes the image, besides
    /// its own image.
    pub positives: &'a HashSet<(u32, u32)>,
}

/// One direction's figures.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Direction {
    /// ROC AUC of the teacher score, true positives vs negatives (0.5: no signal).
    pub auc: f64,
    /// Mean soft-label mass per row on its true positives.
    pub mass_on_positives: f64,
    /// What a uniform row would put there (mean count of true positives / B).
    pub mass_uniform: f64,
    /// Mean soft-label mass per row on its own image's columns (the diagonal and the image's
    /// other captions in the batch): what the one-hot target puts all of a row's mass on.
    pub mass_on_own: f64,
    /// Mean count of true positives per row (own image excluded).
    pub positives_per_row: f64,
    /// Precision of the k nearest teacher neighbours (whole split).
    pub precision_at_k: f64,
    /// The rate of true positives among all candidates (what random neighbours would get).
    pub precision_random: f64,
    /// Where the soft labels' mass goes at each temperature of [`SWEEP`]: how sharp τ_s must
    /// be before the soft labels say anything, and what they then take from the own pair.
    pub by_temperature: Vec<Mass>,
}

/// The temperatures the soft labels' mass is also reported at ([`Direction::by_temperature`]):
/// CUSA's τ_s = 1 down to sharp ones. AUC and precision do not depend on τ_s; the mass does.
pub const SWEEP: [f64; 5] = [1.0, 0.5, 0.2, 0.1, 0.05];

/// Where a row's soft-label mass goes at one temperature (mean per row; the three add to 1).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Mass {
    pub temperature: f64,
    /// On the row's own image (the one-hot target's positives).
    pub own: f64,
    /// On the true extra positives (the one-hot target's false negatives).
    pub positives: f64,
    /// On the true negatives.
    pub negatives: f64,
}

/// Both directions, with how they were measured.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Signal {
    pub batch_size: usize,
    pub batches: usize,
    pub temperature: f64,
    pub k: usize,
    pub i2t: Direction,
    pub t2i: Direction,
}

/// Batches of `size` caption rows out of `n`, `count` of them, drawn as training draws an
/// epoch (a seeded shuffle, cut into full batches; reshuffled when used up).
pub fn batches(n: usize, size: usize, count: usize, seed: u64) -> Vec<Vec<u32>> {
    let size = size.min(n);
    let mut state = seed;
    let mut next = move || {
        // splitmix64
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut out = Vec::with_capacity(count);
    let mut order: Vec<u32> = Vec::new();
    while out.len() < count && size > 0 {
        if order.len() < size {
            order = (0..n as u32).collect();
            for i in (1..n).rev() {
                let j = (next() % (i as u64 + 1)) as usize;
                order.swap(i, j);
            }
        }
        out.push(order.split_off(order.len() - size));
    }
    out
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// ROC AUC from (score, label) pairs: the Mann–Whitney statistic, ties counted ½.
pub fn auc(mut pairs: Vec<(f64, bool)>) -> f64 {
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut pos, mut neg) = (0f64, 0f64);
    let mut wins = 0f64; // positives ranked above negatives
    let mut i = 0;
    while i < pairs.len() {
        let mut j = i;
        let (mut p, mut q) = (0f64, 0f64);
        while j < pairs.len() && pairs[j].0 == pairs[i].0 {
            if pairs[j].1 {
                p += 1.0
            } else {
                q += 1.0
            }
            j += 1;
        }
        // Positives in this tie group beat every earlier negative, and half of the tied ones.
        wins += p * neg + 0.5 * p * q;
        pos += p;
        neg += q;
        i = j;
    }
    if pos == 0.0 || neg == 0.0 {
        f64::NAN
    } else {
        wins / (pos * neg)
    }
}

/// One direction's batch figures: the AUC, the mass at each temperature asked for, the
/// uniform mass and the positives per row.
struct Scored {
    auc: f64,
    mass: Vec<Mass>,
    uniform: f64,
    count: f64,
}

/// One batch of one direction: its (score, label) pairs, summed (own, positives, negatives)
/// mass per temperature, summed uniform mass, summed positive count, and its row count.
type BatchFigures = (Vec<(f64, bool)>, Vec<[f64; 3]>, f64, f64, usize);

/// The figures of one direction over `batches`, the mass at each of `temperatures`.
/// `score(k_row, l_row)` is the teacher's similarity of two caption rows' items;
/// `truth(row_caption, col_caption)` whether the pair is a true positive.
fn direction(
    inputs: &Inputs<'_>,
    batches: &[Vec<u32>],
    temperatures: &[f64],
    score: &(dyn Fn(u32, u32) -> f64 + Sync),
    truth: &(dyn Fn(u32, u32) -> bool + Sync),
) -> Scored {
    let per_batch: Vec<BatchFigures> = batches
        .par_iter()
        .map(|batch| {
            let b = batch.len();
            let mut pairs = Vec::with_capacity(b * b);
            let mut mass = vec![[0.0; 3]; temperatures.len()];
            let (mut uniform, mut count) = (0.0, 0.0);
            for &k in batch {
                let row: Vec<f64> = batch.iter().map(|&l| score(k, l)).collect();
                let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let own = inputs.caption_image[k as usize];
                // 0: own image, 1: true positive, 2: negative.
                let kind: Vec<usize> = batch
                    .iter()
                    .map(|&l| {
                        if inputs.caption_image[l as usize] == own {
                            0
                        } else if truth(k, l) {
                            1
                        } else {
                            2
                        }
                    })
                    .collect();
                for (col, &c) in kind.iter().enumerate() {
                    if c != 0 {
                        pairs.push((row[col], c == 1));
                    }
                }
                let positives = kind.iter().filter(|&&c| c == 1).count();
                uniform += positives as f64 / b as f64;
                count += positives as f64;
                for (m, &t) in mass.iter_mut().zip(temperatures) {
                    let exp: Vec<f64> = row.iter().map(|s| ((s - max) / t).exp()).collect();
                    let z: f64 = exp.iter().sum();
                    let mut on = [0.0; 3];
                    for (&c, e) in kind.iter().zip(&exp) {
                        on[c] += e / z;
                    }
                    m.iter_mut().zip(on).for_each(|(m, x)| *m += x);
                }
            }
            (pairs, mass, uniform, count, b)
        })
        .collect();
    let rows: usize = per_batch.iter().map(|x| x.4).sum();
    let mut pairs = Vec::new();
    let mut mass = vec![[0.0; 3]; temperatures.len()];
    let (mut uniform, mut count) = (0.0, 0.0);
    for (p, m, u, c, _) in per_batch {
        pairs.extend(p);
        for (a, x) in mass.iter_mut().zip(m) {
            a.iter_mut().zip(x).for_each(|(a, x)| *a += x);
        }
        uniform += u;
        count += c;
    }
    let rows = rows.max(1) as f64;
    Scored {
        auc: auc(pairs),
        mass: mass
            .into_iter()
            .zip(temperatures)
            .map(|([own, positives, negatives], &temperature)| Mass {
                temperature,
                own: own / rows,
                positives: positives / rows,
                negatives: negatives / rows,
            })
            .collect(),
        uniform: uniform / rows,
        count: count / rows,
    }
}

/// Precision of the `k` nearest neighbours of every item among the other images' items, and
/// the rate of positives among all those candidates.
fn neighbours(
    n: usize,
    k: usize,
    score: &(dyn Fn(usize, usize) -> f64 + Sync),
    candidate: &(dyn Fn(usize, usize) -> bool + Sync),
    truth: &(dyn Fn(usize, usize) -> bool + Sync),
) -> (f64, f64) {
    let per: Vec<(f64, usize, usize)> = (0..n)
        .into_par_iter()
        .map(|q| {
            let mut scored: Vec<(f64, usize)> = (0..n)
                .filter(|&c| candidate(q, c))
                .map(|c| (score(q, c), c))
                .collect();
            let total = scored.len();
            let positives = scored.iter().filter(|(_, c)| truth(q, *c)).count();
            // Highest score first; ties by index, so the choice is deterministic.
            scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let top = k.min(total);
            let hits = scored[..top].iter().filter(|(_, c)| truth(q, *c)).count();
            let precision = if top > 0 {
                hits as f64 / top as f64
            } else {
                0.0
            };
            (precision, positives, total)
        })
        .collect();
    let precision = per.iter().map(|x| x.0).sum::<f64>() / n.max(1) as f64;
    let (pos, total) = per
        .iter()
        .fold((0usize, 0usize), |(p, t), x| (p + x.1, t + x.2));
    (precision, pos as f64 / total.max(1) as f64)
}

/// One direction of the soft labels: which teacher it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// P^II, from the image teacher ([`Inputs::images`]).
    I2t,
    /// P^TT, from the text teacher ([`Inputs::captions`]).
    T2i,
}

impl Which {
    /// `i2t` or `t2i`, as the reports name the direction.
    pub fn name(self) -> &'static str {
        match self {
            Which::I2t => "i2t",
            Which::T2i => "t2i",
        }
    }
}

/// One direction's batch figures at `temperatures`: the teacher's score and the truth of a
/// (row, column) pair of caption rows.
fn scored(inputs: &Inputs<'_>, batches: &[Vec<u32>], temperatures: &[f64], which: Which) -> Scored {
    let image_of = |c: u32| inputs.caption_image[c as usize];
    let describes = |c: u32, i: u32| image_of(c) == i || inputs.positives.contains(&(c, i));
    match which {
        // Row image i_k, column caption c_l.
        Which::I2t => {
            let img = |r: u32| {
                let r = r as usize;
                &inputs.images[r * inputs.dim_i..(r + 1) * inputs.dim_i]
            };
            direction(
                inputs,
                batches,
                temperatures,
                &|k, l| dot(img(image_of(k)), img(image_of(l))),
                &|k, l| describes(l, image_of(k)),
            )
        }
        // Row caption c_k, column image i_l.
        Which::T2i => {
            let cap = |r: u32| {
                let r = r as usize;
                &inputs.captions[r * inputs.dim_t..(r + 1) * inputs.dim_t]
            };
            direction(
                inputs,
                batches,
                temperatures,
                &|k, l| dot(cap(k), cap(l)),
                &|k, l| describes(k, image_of(l)),
            )
        }
    }
}

/// The ROC AUC of one direction alone (what a controlled teacher is calibrated on): the same
/// figure [`measure`] reports, reading only that direction's teacher vectors.
pub fn direction_auc(inputs: &Inputs<'_>, batches: &[Vec<u32>], which: Which) -> f64 {
    scored(inputs, batches, &[], which).auc
}

/// The teacher-signal figures (see the module doc).
pub fn measure(inputs: &Inputs<'_>, batches: &[Vec<u32>], temperature: f64, k: usize) -> Signal {
    let img = |r: u32| {
        let r = r as usize;
        &inputs.images[r * inputs.dim_i..(r + 1) * inputs.dim_i]
    };
    let cap = |r: u32| {
        let r = r as usize;
        &inputs.captions[r * inputs.dim_t..(r + 1) * inputs.dim_t]
    };
    let image_of = |c: u32| inputs.caption_image[c as usize];
    let describes = |c: u32, i: u32| image_of(c) == i || inputs.positives.contains(&(c, i));
    // The sweep, and τ_s after it when it is not one of them (computed once either way).
    let mut temperatures = SWEEP.to_vec();
    if !SWEEP.contains(&temperature) {
        temperatures.push(temperature);
    }
    let figures = |which: Which, (precision_at_k, precision_random): (f64, f64)| {
        let mut s = scored(inputs, batches, &temperatures, which);
        let at = s
            .mass
            .iter()
            .find(|m| m.temperature == temperature)
            .cloned()
            .expect("τ_s is among the temperatures");
        s.mass.truncate(SWEEP.len());
        Direction {
            auc: s.auc,
            mass_on_positives: at.positives,
            mass_uniform: s.uniform,
            mass_on_own: at.own,
            positives_per_row: s.count,
            precision_at_k,
            precision_random,
            by_temperature: s.mass,
        }
    };
    // Whole-split neighbours. Images: another image j is a hit when one of its captions
    // describes the query image.
    let n_images = inputs.images.len() / inputs.dim_i.max(1);
    let mut captions_of: Vec<Vec<u32>> = vec![Vec::new(); n_images];
    for (c, &i) in inputs.caption_image.iter().enumerate() {
        captions_of[i as usize].push(c as u32);
    }
    let (p_i, r_i) = neighbours(
        n_images,
        k,
        &|q, c| dot(img(q as u32), img(c as u32)),
        &|q, c| q != c,
        &|q, c| captions_of[c].iter().any(|&t| describes(t, q as u32)),
    );
    let n_captions = inputs.caption_image.len();
    let (p_t, r_t) = neighbours(
        n_captions,
        k,
        &|q, c| dot(cap(q as u32), cap(c as u32)),
        &|q, c| image_of(q as u32) != image_of(c as u32),
        &|q, c| describes(q as u32, image_of(c as u32)),
    );
    Signal {
        batch_size: batches.first().map_or(0, Vec::len),
        batches: batches.len(),
        temperature,
        k,
        i2t: figures(Which::I2t, (p_i, r_i)),
        t2i: figures(Which::T2i, (p_t, r_t)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_counts_ties_as_half_and_orders_scores() {
        assert_eq!(auc(vec![(0.9, true), (0.1, false)]), 1.0);
        assert_eq!(auc(vec![(0.1, true), (0.9, false)]), 0.0);
        assert_eq!(auc(vec![(0.5, true), (0.5, false)]), 0.5);
        // 2 positives, 2 negatives: wins 1 + 0.5 + 1 + 1 = 3.5 of 4.
        let v = vec![(0.8, true), (0.5, true), (0.5, false), (0.2, false)];
        assert_eq!(auc(v), 3.5 / 4.0);
    }

    #[test]
    fn batches_are_full_distinct_and_reproducible() {
        let a = batches(10, 4, 5, 7);
        assert_eq!(a, batches(10, 4, 5, 7));
        assert_eq!(a.len(), 5);
        for b in &a {
            assert_eq!(b.len(), 4);
            let set: HashSet<_> = b.iter().collect();
            assert_eq!(set.len(), 4, "no caption twice in a batch");
        }
    }
}
