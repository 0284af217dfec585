//! The embedded `scenes` dataset: generated pictures with captions whose truth is known exactly.
//!
//! Public datasets only estimate their false negatives (captions that truly describe another
//! image). Here every caption is a conjunction of statements over a scene, so "caption c is a
//! positive of image i" is decided exactly: all of c's statements hold for i. Those extended
//! positives go to `positives.parquet`, which is what CUSA's central claim is measured against.
//!
//! ## Scenes
//! A `size`×`size` picture (default 96) on a dark or light background with 1–3 objects in
//! distinct cells of a 3×3 grid. Each object has a shape (circle, square, triangle, diamond),
//! a colour (red, green, blue, yellow, purple, orange), a size (small, large), a column (left,
//! centre, right) and a row (top, middle, bottom). Positions jitter inside the cell; pixels get
//! mild noise. Everything derives from `seed` through SplitMix64 (specified here, so the bytes
//! never change with a dependency update): same seed → identical files → identical digests.
//!
//! ## Caption grammar
//! Five captions per image (`captions_per_image`), one per kind, in random order:
//! 1. inventory — "two shapes: a large red circle on the left and a small blue square in the
//!    top right" ⇒ count = 2 ∧ ∃ each fully described object;
//! 2. one object — "a small green triangle at the bottom" ⇒ ∃ object with those attributes;
//! 3. partial — "something red on the left", "a big shape", "a square" (1–2 attributes);
//! 4. count and background — "three objects on a dark background";
//! 5. relation — "a red circle to the left of a blue square", "… above …" (column or row
//!    strictly smaller), falling back to kind 3 for one-object scenes.
//!
//! Noun phrases: `[a|an] [size] [colour] (shape | shape-word)` where the shape-word ("shape",
//! "object", "thing") stands for any shape, and "something red" for any red object. Position
//! phrases: "on the left" / "in the centre" / "on the right" (column only), "at the top" / "at
//! mid-height" / "at the bottom" (row only), "in the ROW COLUMN" with ROW ∈ top, middle, bottom
//! and COLUMN ∈ left, centre, right ("in the very centre" for the middle cell). Synonyms: circle
//! = disc, square = box, diamond = rhombus, purple = violet, small = little = tiny, large = big,
//! dark = black, light = white.

use std::collections::BTreeMap;
use std::path::Path;

use image::{Rgb, RgbImage};
use imageproc::drawing::{draw_filled_circle_mut, draw_filled_rect_mut, draw_polygon_mut};
use imageproc::point::Point;
use imageproc::rect::Rect;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::normal::{Positive, RawCaption, RawDataset, RawImage};
use crate::api::StageError;

/// `scenes:` settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScenesConfig {
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_train")]
    pub train: usize,
    #[serde(default = "default_val")]
    pub val: usize,
    #[serde(default = "default_test")]
    pub test: usize,
    /// Picture side in pixels.
    #[serde(default = "default_size")]
    pub size: u32,
    #[serde(default = "default_captions")]
    pub captions_per_image: usize,
}

fn default_train() -> usize {
    1000
}
fn default_val() -> usize {
    200
}
fn default_test() -> usize {
    300
}
fn default_size() -> u32 {
    96
}
fn default_captions() -> usize {
    5
}

impl Default for ScenesConfig {
    fn default() -> Self {
        ScenesConfig {
            seed: 0,
            train: default_train(),
            val: default_val(),
            test: default_test(),
            size: default_size(),
            captions_per_image: default_captions(),
        }
    }
}

const SHAPES: [&[&str]; 4] = [
    &["circle", "disc"],
    &["square", "box"],
    &["triangle"],
    &["diamond", "rhombus"],
];
const COLOURS: [&[&str]; 6] = [
    &["red"],
    &["green"],
    &["blue"],
    &["yellow"],
    &["purple", "violet"],
    &["orange"],
];
const RGB: [[u8; 3]; 6] = [
    [220, 40, 40],
    [40, 170, 60],
    [40, 80, 220],
    [235, 210, 40],
    [140, 60, 190],
    [245, 140, 30],
];
const SIZES: [&[&str]; 2] = [&["small", "little", "tiny"], &["large", "big"]];
const BACKGROUNDS: [&[&str]; 2] = [&["dark", "black"], &["light", "white"]];
const BG_RGB: [u8; 2] = [30, 225];
const COUNT_WORDS: [&str; 4] = ["zero", "one", "two", "three"];

pub use crate::rng::SplitMix64;

/// One object of a scene.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Object {
    pub shape: u8,
    pub colour: u8,
    pub size: u8,
    pub col: u8,
    pub row: u8,
}

/// A scene: background and objects in distinct grid cells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scene {
    pub background: u8,
    pub objects: Vec<Object>,
}

/// A partial description of an object; `None` matches anything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Desc {
    pub shape: Option<u8>,
    pub colour: Option<u8>,
    pub size: Option<u8>,
    pub col: Option<u8>,
    pub row: Option<u8>,
}

impl Desc {
    pub fn full(o: &Object) -> Desc {
        Desc {
            shape: Some(o.shape),
            colour: Some(o.colour),
            size: Some(o.size),
            col: Some(o.col),
            row: Some(o.row),
        }
    }

    pub fn matches(&self, o: &Object) -> bool {
        self.shape.is_none_or(|v| v == o.shape)
            && self.colour.is_none_or(|v| v == o.colour)
            && self.size.is_none_or(|v| v == o.size)
            && self.col.is_none_or(|v| v == o.col)
            && self.row.is_none_or(|v| v == o.row)
    }
}

/// One statement of a caption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Statement {
    Exists(Desc),
    Count(u8),
    Background(u8),
    /// ∃ a ≠ b: a matches the first, b the second, a's column < b's column.
    LeftOf(Desc, Desc),
    /// ∃ a ≠ b: a's row < b's row.
    Above(Desc, Desc),
}

impl Statement {
    pub fn holds(&self, s: &Scene) -> bool {
        let pair = |a: &Desc, b: &Desc, cmp: &dyn Fn(&Object, &Object) -> bool| {
            s.objects.iter().enumerate().any(|(i, x)| {
                a.matches(x)
                    && s.objects
                        .iter()
                        .enumerate()
                        .any(|(j, y)| i != j && b.matches(y) && cmp(x, y))
            })
        };
        match self {
            Statement::Exists(d) => s.objects.iter().any(|o| d.matches(o)),
            Statement::Count(n) => s.objects.len() == *n as usize,
            Statement::Background(b) => s.background == *b,
            Statement::LeftOf(a, b) => pair(a, b, &|x, y| x.col < y.col),
            Statement::Above(a, b) => pair(a, b, &|x, y| x.row < y.row),
        }
    }
}

/// A caption: its text and what it states.
#[derive(Debug, Clone)]
pub struct Caption {
    pub text: String,
    pub statements: Vec<Statement>,
}

impl Caption {
    pub fn holds(&self, s: &Scene) -> bool {
        self.statements.iter().all(|st| st.holds(s))
    }
}

/// Draws a random scene.
pub fn random_scene(rng: &mut SplitMix64) -> Scene {
    let n = [1usize, 2, 2, 3, 3][rng.below(5)];
    let mut cells: Vec<u8> = (0..9).collect();
    let mut objects = Vec::with_capacity(n);
    for _ in 0..n {
        let cell = cells.remove(rng.below(cells.len()));
        objects.push(Object {
            shape: rng.below(SHAPES.len()) as u8,
            colour: rng.below(COLOURS.len()) as u8,
            size: rng.below(SIZES.len()) as u8,
            col: cell % 3,
            row: cell / 3,
        });
    }
    Scene {
        background: rng.below(BACKGROUNDS.len()) as u8,
        objects,
    }
}

fn position_phrase(d: &Desc) -> Option<String> {
    const COL: [&str; 3] = ["on the left", "in the centre", "on the right"];
    const ROW: [&str; 3] = ["at the top", "at mid-height", "at the bottom"];
    const ROW_WORD: [&str; 3] = ["top", "middle", "bottom"];
    const COL_WORD: [&str; 3] = ["left", "centre", "right"];
    match (d.row, d.col) {
        (None, None) => None,
        (None, Some(c)) => Some(COL[c as usize].into()),
        (Some(r), None) => Some(ROW[r as usize].into()),
        (Some(1), Some(1)) => Some("in the very centre".into()),
        (Some(r), Some(c)) => Some(format!(
            "in the {} {}",
            ROW_WORD[r as usize], COL_WORD[c as usize]
        )),
    }
}

/// "a large red circle on the left", "something red", "a big shape".
fn noun_phrase(d: &Desc, rng: &mut SplitMix64) -> String {
    let mut words: Vec<&str> = Vec::new();
    if let Some(s) = d.size {
        words.push(*rng.pick(SIZES[s as usize]));
    }
    if let Some(c) = d.colour {
        words.push(*rng.pick(COLOURS[c as usize]));
    }
    let phrase = match d.shape {
        Some(s) => {
            words.push(*rng.pick(SHAPES[s as usize]));
            article(&words.join(" "))
        }
        None if words.len() == 1 && d.colour.is_some() && rng.chance(0.5) => {
            format!("something {}", words[0])
        }
        None => {
            words.push(*rng.pick(&["shape", "object", "thing"]));
            article(&words.join(" "))
        }
    };
    match position_phrase(d) {
        Some(p) => format!("{phrase} {p}"),
        None => phrase,
    }
}

fn article(np: &str) -> String {
    let an = np.starts_with(['a', 'e', 'i', 'o', 'u']);
    format!("{} {np}", if an { "an" } else { "a" })
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// A description keeping two random attributes of `o` (position counts as one); a single
/// attribute ("a square") would describe half the dataset and make a useless query.
fn partial(o: &Object, rng: &mut SplitMix64) -> Desc {
    let full = Desc::full(o);
    loop {
        let mut d = Desc::default();
        let keep = 2;
        let mut attrs: Vec<u8> = vec![0, 1, 2, 3];
        for _ in 0..keep {
            match attrs.remove(rng.below(attrs.len())) {
                0 => d.shape = full.shape,
                1 => d.colour = full.colour,
                2 => d.size = full.size,
                _ => {
                    // Position: column, row or both.
                    match rng.below(3) {
                        0 => d.col = full.col,
                        1 => d.row = full.row,
                        _ => {
                            d.col = full.col;
                            d.row = full.row;
                        }
                    }
                }
            }
        }
        if d != Desc::default() {
            return d;
        }
    }
}

/// A caption of the given kind (0–4) for `scene`; true of the scene by construction.
pub fn caption(scene: &Scene, kind: usize, rng: &mut SplitMix64) -> Caption {
    let n = scene.objects.len();
    let objs = &scene.objects;
    match kind {
        0 => {
            let mut statements = vec![Statement::Count(n as u8)];
            let mut parts = Vec::new();
            for o in objs {
                let mut d = Desc::full(o);
                // Position by column, row or cell.
                match rng.below(3) {
                    0 => d.row = None,
                    1 => d.col = None,
                    _ => {}
                }
                parts.push(noun_phrase(&d, rng));
                statements.push(Statement::Exists(d));
            }
            let noun = if n == 1 {
                rng.pick(&["shape", "object"]).to_string()
            } else {
                format!("{}s", rng.pick(&["shape", "object"]))
            };
            let list = match parts.len() {
                1 => parts[0].clone(),
                _ => format!(
                    "{} and {}",
                    parts[..parts.len() - 1].join(", "),
                    parts[parts.len() - 1]
                ),
            };
            Caption {
                text: capitalise(&format!("{} {noun}: {list}", COUNT_WORDS[n])),
                statements,
            }
        }
        1 => {
            let o = rng.pick(objs);
            let mut d = Desc::full(o);
            if rng.chance(0.5) {
                d.row = None;
            }
            Caption {
                text: capitalise(&noun_phrase(&d, rng)),
                statements: vec![Statement::Exists(d)],
            }
        }
        4 if n >= 2 => {
            let i = rng.below(n);
            let mut j = rng.below(n - 1);
            if j >= i {
                j += 1;
            }
            let (a, b) = (&objs[i], &objs[j]);
            let da = Desc {
                shape: Some(a.shape),
                colour: Some(a.colour),
                ..Desc::default()
            };
            let db = Desc {
                shape: Some(b.shape),
                colour: Some(b.colour),
                ..Desc::default()
            };
            let (x, y) = (noun_phrase(&da, rng), noun_phrase(&db, rng));
            let horizontal = a.col != b.col && (a.row == b.row || rng.chance(0.5));
            let (text, st) = if horizontal {
                if a.col < b.col {
                    (format!("{x} to the left of {y}"), Statement::LeftOf(da, db))
                } else {
                    (
                        format!("{x} to the right of {y}"),
                        Statement::LeftOf(db, da),
                    )
                }
            } else if a.row < b.row {
                (format!("{x} above {y}"), Statement::Above(da, db))
            } else {
                (format!("{x} below {y}"), Statement::Above(db, da))
            };
            Caption {
                text: capitalise(&text),
                statements: vec![st],
            }
        }
        3 => {
            let bg = rng.pick(BACKGROUNDS[scene.background as usize]);
            let noun = if n == 1 {
                rng.pick(&["shape", "object"]).to_string()
            } else {
                format!("{}s", rng.pick(&["shape", "object"]))
            };
            Caption {
                text: capitalise(&format!("{} {noun} on a {bg} background", COUNT_WORDS[n])),
                statements: vec![
                    Statement::Count(n as u8),
                    Statement::Background(scene.background),
                ],
            }
        }
        _ => {
            let o = rng.pick(objs);
            let d = partial(o, rng);
            Caption {
                text: capitalise(&noun_phrase(&d, rng)),
                statements: vec![Statement::Exists(d)],
            }
        }
    }
}

/// Draws a scene as pixels.
pub fn render(scene: &Scene, size: u32, rng: &mut SplitMix64) -> RgbImage {
    let bg = BG_RGB[scene.background as usize];
    let mut img = RgbImage::from_pixel(size, size, Rgb([bg, bg, bg]));
    let cell = size as f32 / 3.0;
    for o in &scene.objects {
        // Radius ≤ 0.36 cell and jitter ≤ 0.08 cell: every object stays inside its cell, so
        // objects never overlap and each is fully visible.
        let jitter = |rng: &mut SplitMix64| (rng.below(1000) as f32 / 1000.0 - 0.5) * cell * 0.16;
        let cx = o.col as f32 * cell + cell / 2.0 + jitter(rng);
        let cy = o.row as f32 * cell + cell / 2.0 + jitter(rng);
        let r = cell * if o.size == 0 { 0.2 } else { 0.36 };
        let colour = Rgb(RGB[o.colour as usize]);
        let p = |x: f32, y: f32| Point::new(x.round() as i32, y.round() as i32);
        match o.shape {
            0 => draw_filled_circle_mut(
                &mut img,
                (cx.round() as i32, cy.round() as i32),
                r.round() as i32,
                colour,
            ),
            1 => {
                let side = (2.0 * r * 0.85).round().max(1.0);
                let rect = Rect::at(
                    (cx - side / 2.0).round() as i32,
                    (cy - side / 2.0).round() as i32,
                )
                .of_size(side as u32, side as u32);
                draw_filled_rect_mut(&mut img, rect, colour);
            }
            2 => draw_polygon_mut(
                &mut img,
                &[
                    p(cx, cy - r),
                    p(cx + r * 0.95, cy + r * 0.8),
                    p(cx - r * 0.95, cy + r * 0.8),
                ],
                colour,
            ),
            _ => draw_polygon_mut(
                &mut img,
                &[p(cx, cy - r), p(cx + r, cy), p(cx, cy + r), p(cx - r, cy)],
                colour,
            ),
        }
    }
    for px in img.pixels_mut() {
        let noise = rng.below(13) as i16 - 6;
        for ch in px.0.iter_mut() {
            *ch = (*ch as i16 + noise).clamp(0, 255) as u8;
        }
    }
    img
}

/// A generated image with its captions: the exact content behind one picture.
#[derive(Debug, Clone)]
pub struct Generated {
    pub id: String,
    pub split: &'static str,
    pub scene: Scene,
    pub captions: Vec<Caption>,
}

/// The splits in generation order (their index is part of every item's seed).
fn splits(cfg: &ScenesConfig) -> [(&'static str, usize); 3] {
    [("train", cfg.train), ("val", cfg.val), ("test", cfg.test)]
}

/// Item `i` of split number `si`: its scene and captions, and the generator in the state the
/// picture is drawn from.
fn item(cfg: &ScenesConfig, si: usize, split: &'static str, i: usize) -> (Generated, SplitMix64) {
    let mut rng = SplitMix64::new(item_seed(cfg.seed, si, i));
    let scene = random_scene(&mut rng);
    let mut kinds: Vec<usize> = Vec::new();
    while kinds.len() < cfg.captions_per_image {
        let mut round: Vec<usize> = (0..5).collect();
        while !round.is_empty() && kinds.len() < cfg.captions_per_image {
            kinds.push(round.remove(rng.below(round.len())));
        }
    }
    let captions: Vec<Caption> = kinds
        .iter()
        .map(|&k| caption(&scene, k, &mut rng))
        .collect();
    let generated = Generated {
        id: format!("{split}-{i:05}"),
        split,
        scene,
        captions,
    };
    (generated, rng)
}

/// Every item's exact content (scenes and captions, no pictures), as [`generate`] makes
/// them: what stages that need the truth behind the files (controlled teachers) rebuild from
/// the settings the dataset's report.json records. Caption `k` of item `id` is `{id}-{k}`.
pub fn content(cfg: &ScenesConfig) -> Vec<Generated> {
    splits(cfg)
        .iter()
        .enumerate()
        .flat_map(|(si, (name, n))| (0..*n).map(move |i| (si, *name, i)))
        .collect::<Vec<_>>()
        .par_iter()
        .map(|&(si, split, i)| item(cfg, si, split, i).0)
        .collect()
}

/// A seed per (split, index), independent of generation order.
fn item_seed(seed: u64, split: usize, index: usize) -> u64 {
    let mut g = SplitMix64::new(seed ^ ((split as u64) << 56) ^ index as u64);
    g.next_u64()
}

/// Generates the dataset: writes PNGs under `out/images/<split>/` and returns the rows,
/// with exact extended positives for every split.
pub fn generate(cfg: &ScenesConfig, out: &Path) -> Result<RawDataset, StageError> {
    if cfg.size < 24 {
        return Err(StageError::failed(
            "`scenes.size` must be at least 24 pixels",
        ));
    }
    if cfg.captions_per_image == 0 {
        return Err(StageError::failed(
            "`scenes.captions_per_image` must be at least 1",
        ));
    }
    let splits = splits(cfg);
    let jobs: Vec<(usize, &'static str, usize)> = splits
        .iter()
        .enumerate()
        .flat_map(|(si, (name, n))| (0..*n).map(move |i| (si, *name, i)))
        .collect();
    for (name, n) in &splits {
        if *n > 0 {
            std::fs::create_dir_all(out.join("images").join(name))
                .map_err(|e| StageError::io("creating image folders", e))?;
        }
    }
    let generated: Vec<Result<Generated, StageError>> = jobs
        .par_iter()
        .map(|&(si, split, i)| {
            let (generated, mut rng) = item(cfg, si, split, i);
            let img = render(&generated.scene, cfg.size, &mut rng);
            let path = out
                .join("images")
                .join(split)
                .join(format!("{}.png", generated.id));
            img.save(&path)
                .map_err(|e| StageError::failed(format!("writing {}: {e}", path.display())))?;
            Ok(generated)
        })
        .collect();
    let generated: Vec<Generated> = generated.into_iter().collect::<Result<_, _>>()?;

    let mut raw = RawDataset::default();
    let mut by_split: BTreeMap<&str, Vec<&Generated>> = BTreeMap::new();
    for g in &generated {
        by_split.entry(g.split).or_default().push(g);
        raw.images.push(RawImage {
            id: g.id.clone(),
            path: format!("images/{}/{}.png", g.split, g.id),
            split: g.split.to_string(),
            label: None,
            size: Some((cfg.size, cfg.size)),
        });
        for (k, c) in g.captions.iter().enumerate() {
            raw.captions.push(RawCaption {
                id: format!("{}-{k}", g.id),
                image_id: g.id.clone(),
                text: c.text.clone(),
            });
        }
    }
    // Exact extended positives within each split, in both directions.
    for (_, items) in by_split {
        let per_caption: Vec<Vec<Positive>> = items
            .par_iter()
            .flat_map(|g| {
                g.captions
                    .par_iter()
                    .enumerate()
                    .map(move |(k, c)| (g, k, c))
            })
            .map(|(g, k, c)| {
                items
                    .iter()
                    .filter(|other| c.holds(&other.scene))
                    .map(|other| Positive {
                        query_kind: "caption",
                        query_id: format!("{}-{k}", g.id),
                        positive_id: other.id.clone(),
                    })
                    .collect()
            })
            .collect();
        let mut image_side: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for p in per_caption.iter().flatten() {
            image_side
                .entry(p.positive_id.clone())
                .or_default()
                .push(p.query_id.clone());
        }
        raw.positives.extend(per_caption.into_iter().flatten());
        for (image, captions) in image_side {
            for c in captions {
                raw.positives.push(Positive {
                    query_kind: "image",
                    query_id: image.clone(),
                    positive_id: c,
                });
            }
        }
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `content` rebuilds exactly what `generate` wrote (the controlled teachers rely on it).
    #[test]
    fn content_is_what_generate_writes() {
        let cfg = ScenesConfig {
            seed: 11,
            train: 6,
            val: 3,
            test: 2,
            size: 32,
            ..ScenesConfig::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let raw = generate(&cfg, dir.path()).unwrap();
        let rebuilt: Vec<(String, String, String)> = content(&cfg)
            .iter()
            .flat_map(|g| {
                g.captions
                    .iter()
                    .enumerate()
                    .map(|(k, c)| (format!("{}-{k}", g.id), g.id.clone(), c.text.clone()))
            })
            .collect();
        let written: Vec<(String, String, String)> = raw
            .captions
            .iter()
            .map(|c| (c.id.clone(), c.image_id.clone(), c.text.clone()))
            .collect();
        assert_eq!(rebuilt, written);
    }

    #[test]
    fn every_caption_is_true_of_its_own_scene() {
        let mut rng = SplitMix64::new(7);
        for _ in 0..2000 {
            let scene = random_scene(&mut rng);
            for kind in 0..5 {
                let c = caption(&scene, kind, &mut rng);
                assert!(c.holds(&scene), "{:?} is false of {scene:?}", c.text);
            }
        }
    }

    #[test]
    fn statements_are_exact_predicates() {
        let scene = Scene {
            background: 0,
            objects: vec![
                Object {
                    shape: 0,
                    colour: 0,
                    size: 1,
                    col: 0,
                    row: 0,
                },
                Object {
                    shape: 1,
                    colour: 2,
                    size: 0,
                    col: 2,
                    row: 2,
                },
            ],
        };
        let red = Desc {
            colour: Some(0),
            ..Desc::default()
        };
        let blue_square = Desc {
            shape: Some(1),
            colour: Some(2),
            ..Desc::default()
        };
        assert!(Statement::LeftOf(red, blue_square).holds(&scene));
        assert!(!Statement::LeftOf(blue_square, red).holds(&scene));
        assert!(Statement::Above(red, blue_square).holds(&scene));
        // The same object cannot be both sides of a relation.
        assert!(!Statement::LeftOf(red, red).holds(&scene));
        assert!(Statement::Count(2).holds(&scene) && !Statement::Count(3).holds(&scene));
        assert!(
            Statement::Exists(Desc {
                col: Some(2),
                row: Some(2),
                ..Desc::default()
            })
            .holds(&scene)
        );
        assert!(
            !Statement::Exists(Desc {
                colour: Some(0),
                col: Some(2),
                ..Desc::default()
            })
            .holds(&scene)
        );
    }
}
