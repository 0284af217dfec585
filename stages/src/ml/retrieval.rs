//! Retrieval metrics of docs/method.md on embeddings: R@1/5/10 both ways and RSUM, and mAP@R /
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
}

/// Most memory one block of scores may take (the rest of a direction's work is per row).
const BLOCK_BYTES: usize = 32 << 20;

/// Calls `visit(q, scores)` for every query row, with its scores against every gallery row,
/// in query order. Scores come from a matrix product of `block` queries at a time against the
/// whole gallery (blocks in parallel), so memory is bounded by [`BLOCK_BYTES`] per thread,
/// never queries × gallery.
fn per_query<T: Send>(
    queries: &Matrix<'_>,
    gallery: &Matrix<'_>,
    visit: impl Fn(usize, &[f32]) -> T + Sync,
) -> Vec<T> {
    let (nq, ng, dim) = (queries.rows(), gallery.rows(), queries.dim);
    assert_eq!(dim, gallery.dim, "queries and gallery differ in dimension");
    if nq == 0 {
        return Vec::new();
    }
    let block = (BLOCK_BYTES / (4 * ng.max(1))).clamp(1, 1024);
    let starts: Vec<usize> = (0..nq).step_by(block).collect();
    starts
        .into_par_iter()
        .flat_map_iter(|start| {
            let rows = block.min(nq - start);
            let mut scores = vec![0.0f32; rows * ng];
            if ng > 0 && dim > 0 {
                let a = &queries.data[start * dim..(start + rows) * dim];
                // SAFETY: `a` is rows × dim (row stride dim), the gallery is ng × dim read as
                // its transpose dim × ng (row stride 1, column stride dim), `scores` is
                // rows × ng (row stride ng); all three slices have exactly those lengths.
                unsafe {
                    matrixmultiply::sgemm(
                        rows,
                        dim,
                        ng,
                        1.0,
                        a.as_ptr(),
                        dim as isize,
                        1,
                        gallery.data.as_ptr(),
                        1,
                        dim as isize,
                        0.0,
                        scores.as_mut_ptr(),
                        ng as isize,
                        1,
                    );
                }
            }
            (0..rows)
                .map(|r| visit(start + r, &scores[r * ng..(r + 1) * ng]))
                .collect::<Vec<_>>()
        })
        .collect()
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

/// What one query yields: the rank of its best ground truth, its top-1 gallery row, and
/// (AP@R, R-P, R@1) against its extended positives when it has some.
struct QueryOutcome {
    rank: usize,
    top1: usize,
    extended: Option<(f64, f64, f64)>,
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

/// Rank of the best of `truth` in `scores`: the number of other items scoring at least its
/// score (ties against the query); the gallery size when `truth` is empty.
fn rank_of_best(scores: &[f32], truth: &[usize]) -> usize {
    let Some(best) = truth.iter().map(|&g| scores[g]).reduce(f32::max) else {
        return scores.len();
    };
    let at_least = scores.iter().filter(|&&s| s >= best).count();
    let true_at_least = truth.iter().filter(|&&g| scores[g] >= best).count();
    at_least - true_at_least
}

/// (AP@R, R-Precision, R@1) of one query against its positive set (R = |positives| > 0).
///
/// Only the top R of the ranking matter, and they all score at least the R-th largest score
/// `t`: the candidates are the items scoring ≥ t (R of them, more with ties), sorted by score
/// with wrong items first among exact ties (against the query). O(gallery) per query, with a
/// membership test only for the few candidates.
fn extended_of(scores: &[f32], positives: &[usize]) -> (f64, f64, f64) {
    let mut sorted_positives = positives.to_vec();
    sorted_positives.sort_unstable();
    sorted_positives.dedup();
    let r = sorted_positives.len().min(scores.len());
    let mut copy = scores.to_vec();
    let (_, &mut t, _) = copy.select_nth_unstable_by(r - 1, |a, b| b.total_cmp(a));
    let mut order: Vec<(f32, bool)> = scores
        .iter()
        .enumerate()
        .filter(|&(_, &s)| s >= t)
        .map(|(g, &s)| (s, sorted_positives.binary_search(&g).is_ok()))
        .collect();
    order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let r = sorted_positives.len();
    let (mut hits, mut ap) = (0usize, 0.0);
    for (k, &(_, positive)) in order.iter().take(r).enumerate() {
        if positive {
            hits += 1;
            ap += hits as f64 / (k + 1) as f64;
        }
    }
    let r1 = if order[0].1 { 1.0 } else { 0.0 };
    (ap / r as f64, hits as f64 / r as f64, r1)
}

/// One direction in one pass over the scores: ranks and top-1 against `truth[q]`, and the
/// extended metrics against `positives[q]` when given.
fn direction(
    queries: &Matrix<'_>,
    gallery: &Matrix<'_>,
    truth: &[Vec<usize>],
    positives: Option<&[Vec<usize>]>,
) -> (Vec<usize>, Vec<usize>, Option<Extended>) {
    let outcomes = per_query(queries, gallery, |q, scores| QueryOutcome {
        rank: rank_of_best(scores, &truth[q]),
        top1: argmax(scores),
        extended: positives
            .map(|p| &p[q])
            .filter(|p| !p.is_empty())
            .map(|p| extended_of(scores, p)),
    });
    let extended = positives.map(|_| {
        let per_query: Vec<(f64, f64, f64)> = outcomes.iter().filter_map(|o| o.extended).collect();
        let n = per_query.len().max(1) as f64;
        let mean =
            |f: fn(&(f64, f64, f64)) -> f64| 100.0 * per_query.iter().map(f).sum::<f64>() / n;
        Extended {
            map_at_r: mean(|x| x.0),
            r_precision: mean(|x| x.1),
            r1: mean(|x| x.2),
            queries: per_query.len(),
        }
    });
    let (ranks, top1) = outcomes.into_iter().map(|o| (o.rank, o.top1)).unzip();
    (ranks, top1, extended)
}

/// Everything measured on one split: ranks both ways, and the extended metrics per direction
/// when positive sets are given (`[i2t, t2i]`: caption rows per image, image rows per caption).
pub fn measure(
    images: &Matrix<'_>,
    captions: &Matrix<'_>,
    image_of: &[usize],
    positives: Option<&[Vec<Vec<usize>>; 2]>,
) -> (Ranks, Option<[Extended; 2]>) {
    let mut captions_of: Vec<Vec<usize>> = vec![Vec::new(); images.rows()];
    for (c, &i) in image_of.iter().enumerate() {
        captions_of[i].push(c);
    }
    let image_truth: Vec<Vec<usize>> = image_of.iter().map(|&i| vec![i]).collect();
    let (i2t, i2t_top1, ext_i2t) = direction(
        images,
        captions,
        &captions_of,
        positives.map(|p| p[0].as_slice()),
    );
    let (t2i, t2i_top1, ext_t2i) = direction(
        captions,
        images,
        &image_truth,
        positives.map(|p| p[1].as_slice()),
    );
    let ranks = Ranks {
        i2t,
        t2i,
        i2t_top1,
        t2i_top1,
    };
    (ranks, ext_i2t.zip(ext_t2i).map(|(a, b)| [a, b]))
}

/// The ranks of `images` and `captions` (unit rows) with `image_of[c]` = row of caption c's
/// image.
pub fn ranks(images: &Matrix<'_>, captions: &Matrix<'_>, image_of: &[usize]) -> Ranks {
    measure(images, captions, image_of, None).0
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
    let no_truth = vec![Vec::new(); queries.rows()];
    let (_, _, e) = direction(queries, gallery, &no_truth, Some(positives));
    e.expect("positives were given")
}

/// Uni-modal retrieval R@1 (in %) from class labels: every labelled row queries all other
/// labelled rows (itself excluded) and scores a hit when its nearest neighbour shares its
/// label. Ties count against the query: a hit needs a same-label row scoring strictly above
/// every other-label row. Rows without a label neither query nor appear in a gallery; queries
/// whose label no other row has are counted (they cannot hit). Returns (R@1, queries).
pub fn label_r1(rows: &Matrix<'_>, labels: &[Option<u32>]) -> (f64, usize) {
    let labelled: Vec<usize> = (0..rows.rows()).filter(|&i| labels[i].is_some()).collect();
    if labelled.len() < 2 {
        return (0.0, labelled.len());
    }
    let data: Vec<f32> = labelled
        .iter()
        .flat_map(|&i| rows.data[i * rows.dim..(i + 1) * rows.dim].iter().copied())
        .collect();
    let m = Matrix {
        data: &data,
        dim: rows.dim,
    };
    let label_of: Vec<u32> = labelled.iter().map(|&i| labels[i].unwrap_or(0)).collect();
    let hits = per_query(&m, &m, |q, scores| {
        let (mut same, mut other) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
        for (g, &s) in scores.iter().enumerate() {
            if g == q {
                continue;
            }
            if label_of[g] == label_of[q] {
                same = same.max(s);
            } else {
                other = other.max(s);
            }
        }
        same > other
    });
    let n = hits.len();
    (
        100.0 * hits.iter().filter(|&&h| h).count() as f64 / n as f64,
        n,
    )
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
