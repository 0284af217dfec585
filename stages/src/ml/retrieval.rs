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

/// Rows of `queries` scored at a time against a gallery of `gallery_rows`.
fn block_rows(gallery_rows: usize) -> usize {
    (BLOCK_BYTES / (4 * gallery_rows.max(1))).clamp(1, 1024)
}

/// A gallery stored transposed (dim × rows, row-major): the product's packing then reads each
/// depth step of a panel of gallery rows as one contiguous run instead of gathering it with a
/// stride of dim (measured: 1.21 s instead of 1.56 s for COCO-5K's product on one core).
/// Memory: one copy of the gallery.
struct Gallery {
    transposed: Vec<f32>,
    rows: usize,
    dim: usize,
}

impl Gallery {
    fn of(m: &Matrix<'_>) -> Gallery {
        let (rows, dim) = (m.rows(), m.dim);
        let mut transposed = vec![0.0f32; rows * dim];
        // Tiles of 64 rows keep both sides of the copy in cache.
        for r0 in (0..rows).step_by(64) {
            let r1 = (r0 + 64).min(rows);
            for d in 0..dim {
                for r in r0..r1 {
                    transposed[d * rows + r] = m.data[r * dim + d];
                }
            }
        }
        Gallery {
            transposed,
            rows,
            dim,
        }
    }
}

/// `out = a · galleryᵀ` for `a` = `rows` × dim (row-major), `out` = `rows` × gallery rows.
///
/// The `gemm` crate's kernels (AVX-512 where the CPU has it, AVX2/FMA or NEON otherwise), one
/// thread: callers parallelise over blocks. For a given `rows`, every score is summed in one
/// order whatever the gallery's size (the depth blocking depends on dim and the caches only),
/// which [`fused`] checks rather than assumes.
fn scores_into(a: &[f32], rows: usize, gallery: &Gallery, out: &mut [f32]) {
    let (ng, dim) = (gallery.rows, gallery.dim);
    assert_eq!(a.len(), rows * dim, "query block shape");
    assert_eq!(out.len(), rows * ng, "score block shape");
    if rows == 0 || ng == 0 {
        return;
    }
    if dim == 0 {
        out.fill(0.0);
        return;
    }
    // SAFETY: dst is rows × ng (column stride 1, row stride ng), lhs rows × dim (column
    // stride 1, row stride dim), rhs dim × ng (column stride 1, row stride ng); the asserts
    // above and `Gallery::of` pin every length, and read_dst = false means dst is only written.
    unsafe {
        gemm::gemm(
            rows,
            ng,
            dim,
            out.as_mut_ptr(),
            1,
            ng as isize,
            false,
            a.as_ptr(),
            1,
            dim as isize,
            gallery.transposed.as_ptr(),
            1,
            ng as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Calls `visit(q, scores)` for every query row, with its scores against every gallery row,
/// in query order. Scores come from a matrix product of a block of queries at a time against
/// the whole gallery (blocks in parallel), so memory is bounded by [`BLOCK_BYTES`] per thread,
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
    let block = block_rows(ng);
    let starts: Vec<usize> = (0..nq).step_by(block).collect();
    let gallery = Gallery::of(gallery);
    // One score buffer per worker, reused: a fresh one per block would be zeroed by the
    // kernel page by page.
    let blocks: Vec<Vec<T>> = starts
        .into_par_iter()
        .map_init(Vec::new, |scores: &mut Vec<f32>, start| {
            let rows = block.min(nq - start);
            scores.resize(rows * ng, 0.0);
            let scores = &mut scores[..rows * ng];
            scores_into(
                &queries.data[start * dim..(start + rows) * dim],
                rows,
                &gallery,
                scores,
            );
            (0..rows)
                .map(|r| visit(start + r, &scores[r * ng..(r + 1) * ng]))
                .collect()
        })
        .collect();
    blocks.into_iter().flatten().collect()
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
    let t = nth_largest(scores, sorted_positives.len().min(scores.len()));
    let mut order: Vec<(f32, bool)> = scores
        .iter()
        .enumerate()
        .filter(|&(_, &s)| s >= t)
        .map(|(g, &s)| (s, sorted_positives.binary_search(&g).is_ok()))
        .collect();
    ap_at_r(&mut order, sorted_positives.len())
}

/// `f32::total_cmp`'s order as an integer order (negative values' magnitude bits flipped; the
/// flip is its own inverse, see [`from_total_key`]).
fn total_key(s: f32) -> i32 {
    flip_negative(s.to_bits() as i32)
}

fn from_total_key(k: i32) -> f32 {
    f32::from_bits(flip_negative(k) as u32)
}

fn flip_negative(bits: i32) -> i32 {
    bits ^ (((bits >> 31) as u32) >> 1) as i32
}

/// The `r`-th largest of `scores` (1-based, `total_cmp` order, 0 < r ≤ len) in one pass: the r
/// largest keys so far stay sorted in a small buffer, and nearly every score is rejected by
/// one integer comparison with the smallest of them.
fn nth_largest(scores: &[f32], r: usize) -> f32 {
    debug_assert!(r > 0 && r <= scores.len());
    let mut top: Vec<i32> = Vec::with_capacity(r + 1);
    let mut floor = i32::MIN;
    for &s in scores {
        let k = total_key(s);
        if top.len() == r {
            if k <= floor {
                continue;
            }
            top.remove(0);
        }
        let at = top.partition_point(|&x| x < k);
        top.insert(at, k);
        floor = top[0];
    }
    from_total_key(top[0])
}

/// (AP@R, R-Precision, R@1) of the candidates (score, positive?) against `r` positives: they
/// are ranked best first, wrong items first among exact ties (against the query).
fn ap_at_r(order: &mut [(f32, bool)], r: usize) -> (f64, f64, f64) {
    order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
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

/// The extended metrics (in %) averaged over the queries that have positives.
fn mean_extended(per_query: impl Iterator<Item = (f64, f64, f64)>) -> Extended {
    let per_query: Vec<(f64, f64, f64)> = per_query.collect();
    let n = per_query.len().max(1) as f64;
    let mean = |f: fn(&(f64, f64, f64)) -> f64| 100.0 * per_query.iter().map(f).sum::<f64>() / n;
    Extended {
        map_at_r: mean(|x| x.0),
        r_precision: mean(|x| x.1),
        r1: mean(|x| x.2),
        queries: per_query.len(),
    }
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
    let extended = positives.map(|_| mean_extended(outcomes.iter().filter_map(|o| o.extended)));
    let (ranks, top1) = outcomes.into_iter().map(|o| (o.rank, o.top1)).unzip();
    (ranks, top1, extended)
}

/// Everything measured on one split: ranks both ways, and the extended metrics per direction
/// when positive sets are given (`[i2t, t2i]`: caption rows per image, image rows per caption).
///
/// One matrix product serves both directions ([`fused`]); should two products of the same
/// kernel ever score a true pair differently, it falls back to one product per direction.
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
    let block = block_rows(captions.rows());
    if let Some(fused) = fused(images, captions, image_of, &captions_of, positives, block) {
        return fused;
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

/// The t2i direction seen column by column while the image blocks stream past: per caption,
/// what one worker learnt from the images of its blocks. Workers' states merge exactly.
struct Columns {
    /// Images scoring at least the caption's own pair (the own image included).
    at_least: Vec<u32>,
    /// Best score so far and its image (the first among ties; `u32::MAX` before any).
    best: Vec<f32>,
    best_at: Vec<u32>,
    /// Scores below this cannot be among the top R (+∞ for captions without positives).
    floor: Vec<f32>,
    /// (score, image) of every image scoring at least `floor`.
    candidates: Vec<Vec<(f32, u32)>>,
    /// A true pair scored differently from the product that gave `own`.
    mismatch: bool,
}

impl Columns {
    fn new(top: &[usize]) -> Self {
        let n = top.len();
        Columns {
            at_least: vec![0; n],
            best: vec![f32::NEG_INFINITY; n],
            best_at: vec![u32::MAX; n],
            floor: top
                .iter()
                .map(|&r| {
                    if r == 0 {
                        f32::INFINITY
                    } else {
                        f32::NEG_INFINITY
                    }
                })
                .collect(),
            candidates: vec![Vec::new(); n],
            mismatch: false,
        }
    }

    fn merge(mut self, other: Columns, top: &[usize]) -> Columns {
        self.mismatch |= other.mismatch;
        for (a, b) in self.at_least.iter_mut().zip(&other.at_least) {
            *a += b;
        }
        for c in 0..self.best.len() {
            let (s, at) = (other.best[c], other.best_at[c]);
            if s > self.best[c] || (s == self.best[c] && at < self.best_at[c]) {
                self.best[c] = s;
                self.best_at[c] = at;
            }
        }
        for (c, theirs) in other.candidates.into_iter().enumerate() {
            if !theirs.is_empty() {
                self.candidates[c].extend(theirs);
                self.floor[c] = keep_top(&mut self.candidates[c], top[c]).max(self.floor[c]);
            }
        }
        self
    }
}

/// Keeps the items scoring at least the `r`-th largest score (ties included) and returns that
/// score, or −∞ while there are fewer than `r`.
fn keep_top(items: &mut Vec<(f32, u32)>, r: usize) -> f32 {
    if r == 0 || items.len() < r {
        return f32::NEG_INFINITY;
    }
    let (_, &mut (t, _), _) = items.select_nth_unstable_by(r - 1, |a, b| b.0.total_cmp(&a.0));
    items.retain(|&(s, _)| s >= t);
    t
}

/// Both directions from one product: blocks of images against every caption. Each image row
/// gives its i2t outcome as [`direction`] would; each score also updates its caption's column
/// state ([`Columns`]) for t2i. A caption's t2i rank counts the images scoring at least its own
/// pair, so the own pair's score (`own`) is computed first, by the same kernel with the same
/// block of image rows, and every true pair met in the pass is checked against it: `None` if
/// one differs (then [`measure`] uses a product per direction). Memory: one block of scores
/// per worker plus a few numbers per caption (and its top-R candidates). `block`: image rows
/// per product.
fn fused(
    images: &Matrix<'_>,
    captions: &Matrix<'_>,
    image_of: &[usize],
    captions_of: &[Vec<usize>],
    positives: Option<&[Vec<Vec<usize>>; 2]>,
    block: usize,
) -> Option<(Ranks, Option<[Extended; 2]>)> {
    let (ni, nc, dim) = (images.rows(), captions.rows(), images.dim);
    assert_eq!(dim, captions.dim, "images and captions differ in dimension");
    if ni == 0 || nc == 0 || dim == 0 || block == 0 {
        return None;
    }
    let starts: Vec<usize> = (0..ni).step_by(block).collect();
    let image_block = |start: usize| {
        let rows = block.min(ni - start);
        (rows, &images.data[start * dim..(start + rows) * dim])
    };

    // The own pair of every caption, block by block: the block's images against the captions
    // they own (at least 16 columns, so the product takes the path the full one takes).
    let own_pairs: Vec<Vec<(usize, f32)>> = starts
        .par_iter()
        .map(|&start| {
            let (rows, a) = image_block(start);
            let owned: Vec<usize> = (start..start + rows)
                .flat_map(|i| captions_of[i].iter().copied())
                .collect();
            if owned.is_empty() {
                return Vec::new();
            }
            let mut columns = owned.clone();
            while columns.len() < 16 {
                columns.push(owned[0]);
            }
            let data: Vec<f32> = columns
                .iter()
                .flat_map(|&c| captions.data[c * dim..(c + 1) * dim].iter().copied())
                .collect();
            let gallery = Gallery::of(&Matrix { data: &data, dim });
            let mut out = vec![0.0f32; rows * columns.len()];
            scores_into(a, rows, &gallery, &mut out);
            owned
                .iter()
                .enumerate()
                .map(|(j, &c)| (c, out[(image_of[c] - start) * columns.len() + j]))
                .collect()
        })
        .collect();
    let mut own = vec![f32::NAN; nc];
    for (c, s) in own_pairs.into_iter().flatten() {
        own[c] = s;
    }

    // t2i positive sets, sorted, and how many top items each needs.
    let t2i_positives: Vec<Vec<usize>> = match positives {
        Some(p) => p[1]
            .iter()
            .map(|p| {
                let mut p = p.clone();
                p.sort_unstable();
                p.dedup();
                p
            })
            .collect(),
        None => vec![Vec::new(); nc],
    };
    let top: Vec<usize> = t2i_positives.iter().map(|p| p.len().min(ni)).collect();
    let gallery = Gallery::of(captions);

    type Rows = Vec<(usize, Vec<QueryOutcome>)>;
    // One contiguous run of blocks per worker: every fold state starts with empty columns
    // (everything is a candidate until its top R fill up), so states are few and long-lived.
    let per_worker = (starts.len() / rayon::current_num_threads().max(1)).max(1);
    let (mut rows_out, columns, _): (Rows, Columns, Vec<f32>) = starts
        .into_par_iter()
        .with_min_len(per_worker)
        .fold(
            || (Vec::new(), Columns::new(&top), Vec::new()),
            |(mut rows_out, mut col, mut buffer), start| {
                let (rows, a) = image_block(start);
                buffer.resize(rows * nc, 0.0);
                let scores = &mut buffer[..rows * nc];
                scores_into(a, rows, &gallery, scores);
                let mut outcomes = Vec::with_capacity(rows);
                for r in 0..rows {
                    let i = start + r;
                    let row = &scores[r * nc..(r + 1) * nc];
                    outcomes.push(QueryOutcome {
                        rank: rank_of_best(row, &captions_of[i]),
                        top1: argmax(row),
                        extended: positives
                            .map(|p| &p[0][i])
                            .filter(|p| !p.is_empty())
                            .map(|p| extended_of(row, p)),
                    });
                    for &c in &captions_of[i] {
                        col.mismatch |= row[c].to_bits() != own[c].to_bits();
                    }
                    for ((n, &s), &o) in col.at_least.iter_mut().zip(row).zip(&own) {
                        *n += u32::from(s >= o);
                    }
                    let at = i as u32;
                    for ((b, b_at), &s) in col.best.iter_mut().zip(col.best_at.iter_mut()).zip(row)
                    {
                        let better = s > *b;
                        *b = if better { s } else { *b };
                        *b_at = if better { at } else { *b_at };
                    }
                    // Chunks of 16 are tested branch-free first: a candidate is rare once
                    // each caption's top R have filled.
                    for (k, chunk) in row.chunks(16).enumerate() {
                        let floors = &col.floor[k * 16..k * 16 + chunk.len()];
                        let any = chunk
                            .iter()
                            .zip(floors)
                            .fold(false, |any, (&s, &f)| any | (s >= f));
                        if !any {
                            continue;
                        }
                        for (j, &s) in chunk.iter().enumerate() {
                            let c = k * 16 + j;
                            if s >= col.floor[c] {
                                let list = &mut col.candidates[c];
                                list.push((s, at));
                                if list.len() >= 2 * top[c] + 64 {
                                    col.floor[c] = keep_top(list, top[c]);
                                }
                            }
                        }
                    }
                }
                rows_out.push((start, outcomes));
                (rows_out, col, buffer)
            },
        )
        .reduce(
            || (Vec::new(), Columns::new(&top), Vec::new()),
            |(mut a_rows, a_col, _), (b_rows, b_col, _)| {
                a_rows.extend(b_rows);
                (a_rows, a_col.merge(b_col, &top), Vec::new())
            },
        );
    if columns.mismatch {
        return None;
    }
    rows_out.sort_unstable_by_key(|(start, _)| *start);
    let outcomes: Vec<QueryOutcome> = rows_out.into_iter().flat_map(|(_, o)| o).collect();
    let ext_i2t = positives.map(|_| mean_extended(outcomes.iter().filter_map(|o| o.extended)));
    let (i2t, i2t_top1) = outcomes.into_iter().map(|o| (o.rank, o.top1)).unzip();

    let t2i: Vec<usize> = (0..nc)
        .map(|c| {
            let own_counted = u32::from(!own[c].is_nan());
            columns.at_least[c].saturating_sub(own_counted) as usize
        })
        .collect();
    let t2i_top1: Vec<usize> = columns
        .best_at
        .iter()
        .map(|&at| if at == u32::MAX { 0 } else { at as usize })
        .collect();
    let ext_t2i = positives.map(|_| {
        let Columns { candidates, .. } = columns;
        let per_caption: Vec<(f64, f64, f64)> = candidates
            .into_par_iter()
            .zip(&t2i_positives)
            .filter(|(_, p)| !p.is_empty())
            .map(|(list, p)| {
                let mut order: Vec<(f32, bool)> = list
                    .into_iter()
                    .map(|(s, g)| (s, p.binary_search(&(g as usize)).is_ok()))
                    .collect();
                ap_at_r(&mut order, p.len())
            })
            .collect();
        mean_extended(per_caption.into_iter())
    });
    let ranks = Ranks {
        i2t,
        t2i,
        i2t_top1,
        t2i_top1,
    };
    Some((ranks, ext_i2t.zip(ext_t2i).map(|(a, b)| [a, b])))
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

    /// Integer-valued embeddings from a small range: many exact ties, exact scores.
    fn tied(rows: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..rows * dim)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 33) % 3) as f32 - 1.0
            })
            .collect()
    }

    #[test]
    fn one_product_for_both_directions_equals_one_per_direction() {
        let (ni, per, dim) = (97, 3, 24);
        let nc = ni * per + 5;
        let im = tied(ni, dim, 1);
        let cap = tied(nc, dim, 2);
        // Captions out of image order, some images with none, uneven counts.
        let image_of: Vec<usize> = (0..nc).map(|c| (c * 37 + c / 7) % (ni - 4)).collect();
        let mut captions_of = vec![Vec::new(); ni];
        for (c, &i) in image_of.iter().enumerate() {
            captions_of[i].push(c);
        }
        let positives = [
            (0..ni)
                .map(|i| (0..i % 9).map(|k| (i * 13 + k * 29) % nc).collect())
                .collect::<Vec<Vec<usize>>>(),
            (0..nc)
                .map(|c| (0..c % 6).map(|k| (c * 7 + k * 11) % ni).collect())
                .collect::<Vec<Vec<usize>>>(),
        ];
        let (images, captions) = (Matrix { data: &im, dim }, Matrix { data: &cap, dim });
        let image_truth: Vec<Vec<usize>> = image_of.iter().map(|&i| vec![i]).collect();
        let (i2t, i2t_top1, e_i2t) =
            direction(&images, &captions, &captions_of, Some(&positives[0]));
        let (t2i, t2i_top1, e_t2i) =
            direction(&captions, &images, &image_truth, Some(&positives[1]));
        let want = (
            Ranks {
                i2t,
                t2i,
                i2t_top1,
                t2i_top1,
            },
            Some([e_i2t.unwrap(), e_t2i.unwrap()]),
        );
        assert!(want.0.t2i.iter().any(|&r| r > 0) && want.0.i2t.iter().any(|&r| r > 0));
        // One block, several blocks (merged across workers), one image per block.
        for block in [1024, 10, 1] {
            let got = fused(
                &images,
                &captions,
                &image_of,
                &captions_of,
                Some(&positives),
                block,
            )
            .expect("the own pairs must score the same in both products");
            assert_eq!(got, want, "block {block}");
            let ranks_only = fused(&images, &captions, &image_of, &captions_of, None, block);
            assert_eq!(ranks_only, Some((want.0.clone(), None)), "block {block}");
        }
    }

    #[test]
    fn nth_largest_is_the_total_order_selection() {
        let mut v: Vec<f32> = tied(1, 500, 9).iter().map(|x| x * 0.5).collect();
        v.extend([0.0, -0.0, f32::INFINITY, -3.5, 7.25, 7.25]);
        for r in [1, 2, 3, 7, 40, v.len()] {
            let mut sorted = v.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            assert_eq!(
                nth_largest(&v, r).to_bits(),
                sorted[r - 1].to_bits(),
                "r {r}"
            );
        }
    }

    #[test]
    fn float_scores_of_own_pairs_agree_between_products() {
        // Real-valued unit vectors, the shape of a COCO-1K fold: the own-pair check must pass
        // (the fallback to two products stays a safety net, not the path taken).
        let (ni, nc, dim) = (1000, 5000, 64);
        let unit = |rows: usize, seed: u64| {
            let mut v: Vec<f32> = tied(rows, dim, seed)
                .iter()
                .enumerate()
                .map(|(k, &x)| x + (k as f32 * 0.618).fract())
                .collect();
            for r in v.chunks_mut(dim) {
                let n = r.iter().map(|x| x * x).sum::<f32>().sqrt();
                r.iter_mut().for_each(|x| *x /= n);
            }
            v
        };
        let (im, cap) = (unit(ni, 3), unit(nc, 4));
        let image_of: Vec<usize> = (0..nc).map(|c| c / 5).collect();
        let mut captions_of = vec![Vec::new(); ni];
        for (c, &i) in image_of.iter().enumerate() {
            captions_of[i].push(c);
        }
        let (images, captions) = (Matrix { data: &im, dim }, Matrix { data: &cap, dim });
        for block in [block_rows(nc), 333, 48, 5] {
            let got = fused(&images, &captions, &image_of, &captions_of, None, block);
            assert!(got.is_some(), "block {block}: fell back to two products");
        }
    }
}
