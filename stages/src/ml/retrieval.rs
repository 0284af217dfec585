//! Retrieval metrics of METHOD.md on embeddings: R@1/5/10 both ways and RSUM, and mAP@R /
//! R-Precision against extended positive sets.
//!
//! i2t: an image's rank is the best rank among all its captions; t2i: the rank of the caption's
//! one image. Ties are broken against the query (a true item tied with a wrong one counts as
//! ranked after it), so a collapsed model scores zero, never chance.

use rayon::prelude::*;

/// Row-major unit vectors.
pub struct Matrix<'a> {
    pub data: &'a [f32],
    pub dim: usize,
}

impl Matrix<'_> {
    fn rows(&self) -> usize {
        self.data.len() / self.dim
    }
    fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// R@K of both directions (in %), and their sum.
#[derive(Debug, Clone, Copy, serde::Serialize, PartialEq)]
pub struct Recalls {
    pub i2t_r1: f64,
    pub i2t_r5: f64,
    pub i2t_r10: f64,
    pub t2i_r1: f64,
    pub t2i_r5: f64,
    pub t2i_r10: f64,
    pub rsum: f64,
}

impl Recalls {
    /// The element-wise mean of `all` (zeros when empty).
    pub fn mean(all: &[Recalls]) -> Recalls {
        let n = all.len().max(1) as f64;
        let avg = |f: fn(&Recalls) -> f64| all.iter().map(f).sum::<f64>() / n;
        Recalls {
            i2t_r1: avg(|r| r.i2t_r1),
            i2t_r5: avg(|r| r.i2t_r5),
            i2t_r10: avg(|r| r.i2t_r10),
            t2i_r1: avg(|r| r.t2i_r1),
            t2i_r5: avg(|r| r.t2i_r5),
            t2i_r10: avg(|r| r.t2i_r10),
            rsum: avg(|r| r.rsum),
        }
    }
}

/// Number of items scoring at least `score` other than those in `own` (0 = ranked first).
fn rank_of(scores: &[f32], score: f32, own: &dyn Fn(usize) -> bool) -> usize {
    scores
        .iter()
        .enumerate()
        .filter(|(j, s)| !own(*j) && **s >= score)
        .count()
}

/// 0-based rank of the first ground truth of every query: i2t per image (best over its
/// captions), t2i per caption.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranks {
    pub i2t: Vec<usize>,
    pub t2i: Vec<usize>,
    /// Top-1 gallery row of every query.
    pub i2t_top1: Vec<usize>,
    pub t2i_top1: Vec<usize>,
}

fn argmax(scores: &[f32]) -> usize {
    // First maximum: a deterministic choice among ties.
    let mut best = 0;
    for (j, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = j;
        }
    }
    best
}

/// The ranks of `images` and `captions` (unit rows) with `image_of[c]` = row of caption c's
/// image. One score row per query at a time (never the whole matrix).
pub fn ranks(images: &Matrix<'_>, captions: &Matrix<'_>, image_of: &[usize]) -> Ranks {
    let (ni, nc) = (images.rows(), captions.rows());
    let mut captions_of: Vec<Vec<usize>> = vec![Vec::new(); ni];
    for (c, &i) in image_of.iter().enumerate() {
        captions_of[i].push(c);
    }
    // i2t: for each image, the best rank over its captions.
    let (i2t, i2t_top1): (Vec<usize>, Vec<usize>) = (0..ni)
        .into_par_iter()
        .map(|i| {
            let q = images.row(i);
            let scores: Vec<f32> = (0..nc).map(|c| dot(q, captions.row(c))).collect();
            let own = |c: usize| image_of[c] == i;
            let rank = captions_of[i]
                .iter()
                .map(|&c| rank_of(&scores, scores[c], &own))
                .min()
                .unwrap_or(usize::MAX);
            (rank, argmax(&scores))
        })
        .unzip();
    let (t2i, t2i_top1): (Vec<usize>, Vec<usize>) = (0..nc)
        .into_par_iter()
        .map(|c| {
            let q = captions.row(c);
            let scores: Vec<f32> = (0..ni).map(|i| dot(q, images.row(i))).collect();
            let own = |i: usize| i == image_of[c];
            (rank_of(&scores, scores[image_of[c]], &own), argmax(&scores))
        })
        .unzip();
    Ranks {
        i2t,
        t2i,
        i2t_top1,
        t2i_top1,
    }
}

impl Ranks {
    pub fn recalls(&self) -> Recalls {
        let at = |ranks: &[usize], k: usize| {
            100.0 * ranks.iter().filter(|&&r| r < k).count() as f64 / ranks.len().max(1) as f64
        };
        let r = [
            at(&self.i2t, 1),
            at(&self.i2t, 5),
            at(&self.i2t, 10),
            at(&self.t2i, 1),
            at(&self.t2i, 5),
            at(&self.t2i, 10),
        ];
        Recalls {
            i2t_r1: r[0],
            i2t_r5: r[1],
            i2t_r10: r[2],
            t2i_r1: r[3],
            t2i_r5: r[4],
            t2i_r10: r[5],
            rsum: r.iter().sum(),
        }
    }
}

/// R@1/5/10 for `images` and `captions` (unit rows) with `image_of[c]` = row of caption c's
/// image.
pub fn recalls(images: &Matrix<'_>, captions: &Matrix<'_>, image_of: &[usize]) -> Recalls {
    ranks(images, captions, image_of).recalls()
}

/// Retrieval against extended positive sets (in %), as ECCV Caption defines it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Extended {
    #[serde(rename = "mAP@R")]
    pub map_at_r: f64,
    #[serde(rename = "R-P")]
    pub r_precision: f64,
    #[serde(rename = "R@1")]
    pub r1: f64,
    /// Queries with at least one positive (the others are skipped).
    pub queries: usize,
}

/// mAP@R, R-Precision and R@1 of `queries` against `gallery` with positive sets
/// `positives[q]` (gallery rows); queries without positives are skipped. With R = |positives|:
/// AP@R = (1/R) Σ_{k≤R} P@k·rel(k), R-P = P@R, R@1 = rel(1).
pub fn extended(queries: &Matrix<'_>, gallery: &Matrix<'_>, positives: &[Vec<usize>]) -> Extended {
    let per_query: Vec<(f64, f64, f64)> = (0..queries.rows())
        .into_par_iter()
        .filter(|&q| !positives[q].is_empty())
        .map(|q| {
            let qv = queries.row(q);
            let pos: std::collections::HashSet<usize> = positives[q].iter().copied().collect();
            let mut order: Vec<(f32, bool)> = (0..gallery.rows())
                .map(|g| (dot(qv, gallery.row(g)), pos.contains(&g)))
                .collect();
            let r = pos.len();
            // Only the top R matter: select, then sort them. Ties: negatives first (against
            // the query).
            let cmp = |a: &(f32, bool), b: &(f32, bool)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
            if r < order.len() {
                order.select_nth_unstable_by(r - 1, cmp);
                order.truncate(r);
            }
            order.sort_by(cmp);
            let (mut hits, mut ap) = (0usize, 0.0);
            for (k, &(_, positive)) in order.iter().take(r).enumerate() {
                if positive {
                    hits += 1;
                    ap += hits as f64 / (k + 1) as f64;
                }
            }
            let r1 = if order[0].1 { 1.0 } else { 0.0 };
            (ap / r as f64, hits as f64 / r as f64, r1)
        })
        .collect();
    let n = per_query.len().max(1) as f64;
    let mean = |f: fn(&(f64, f64, f64)) -> f64| 100.0 * per_query.iter().map(f).sum::<f64>() / n;
    Extended {
        map_at_r: mean(|x| x.0),
        r_precision: mean(|x| x.1),
        r1: mean(|x| x.2),
        queries: per_query.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recalls_count_the_best_caption_and_ties_go_against_the_query() {
        // Two images on the axes; captions 0,1 of image 0 and caption 2 of image 1.
        let images = [1.0, 0.0, 0.0, 1.0];
        let captions = [0.6, 0.8, 1.0, 0.0, 0.0, 1.0];
        let r = recalls(
            &Matrix {
                data: &images,
                dim: 2,
            },
            &Matrix {
                data: &captions,
                dim: 2,
            },
            &[0, 0, 1],
        );
        assert_eq!((r.i2t_r1, r.t2i_r1), (100.0, 100.0 * 2.0 / 3.0));
        assert!((r.rsum - (100.0 * 5.0 + 100.0 * 2.0 / 3.0)).abs() < 1e-9);
        // Identical embeddings everywhere: ties rank the truth last.
        let same = [1.0, 0.0, 1.0, 0.0];
        let r = recalls(
            &Matrix {
                data: &same,
                dim: 2,
            },
            &Matrix {
                data: &same,
                dim: 2,
            },
            &[0, 1],
        );
        assert_eq!((r.i2t_r1, r.t2i_r1), (0.0, 0.0));
    }

    #[test]
    fn map_at_r_follows_its_definition() {
        // Gallery scores for the query: g0 0.9, g1 0.8, g2 0.7, g3 0.1; positives {g0, g2}:
        // R = 2, top-2 = g0 (hit, P@1 = 1), g1 (miss) → AP@R = (1 + 0)/2, R-Precision = 1/2.
        let q = [1.0, 0.0];
        let g = [0.9, 0.0, 0.8, 0.0, 0.7, 0.0, 0.1, 0.0];
        let e = extended(
            &Matrix { data: &q, dim: 2 },
            &Matrix { data: &g, dim: 2 },
            &[vec![0, 2]],
        );
        assert_eq!((e.map_at_r, e.r_precision, e.r1), (50.0, 50.0, 100.0));
    }
}
