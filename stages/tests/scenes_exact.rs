//! The scenes dataset's extended positives are exact, checked independently of the generator:
//! every scene is re-derived from its PNG pixels, every caption is parsed back from its text
//! with a parser written from the documented grammar, and "caption c holds for image i" is
//! recomputed for all pairs of the split and compared with what the generator wrote.

use std::collections::BTreeSet;

use cusa_stages::dataset::scenes::{ScenesConfig, generate};

const PALETTE: [(&str, [i32; 3]); 6] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [235, 210, 40]),
    ("purple", [140, 60, 190]),
    ("orange", [245, 140, 30]),
];

#[derive(Debug, Clone, PartialEq)]
struct Obj {
    shape: &'static str,
    colour: &'static str,
    size: &'static str,
    col: usize,
    row: usize,
}

#[derive(Debug)]
struct SceneSeen {
    dark: bool,
    objects: Vec<Obj>,
}

/// Reads objects from pixels: per grid cell, the pixels closest to a palette colour.
fn perceive(path: &std::path::Path) -> SceneSeen {
    let img = image::open(path).unwrap().to_rgb8();
    let (w, h) = img.dimensions();
    let px = |x: u32, y: u32| {
        let p = img.get_pixel(x, y).0;
        [p[0] as i32, p[1] as i32, p[2] as i32]
    };
    let dark = px(0, 0)[0] < 128;
    let bg = if dark { 30 } else { 225 };
    let cell = w as f32 / 3.0;
    let mut objects = Vec::new();
    for row in 0..3 {
        for col in 0..3 {
            let (x0, x1) = (
                (col as f32 * cell) as u32,
                (((col + 1) as f32 * cell) as u32).min(w),
            );
            let (y0, y1) = (
                (row as f32 * cell) as u32,
                (((row + 1) as f32 * cell) as u32).min(h),
            );
            let mut votes = [0usize; 6];
            let mut pts = Vec::new();
            for y in y0..y1 {
                for x in x0..x1 {
                    let p = px(x, y);
                    if p.iter().all(|c| (c - bg).abs() <= 8) {
                        continue;
                    }
                    let (best, dist) = PALETTE
                        .iter()
                        .enumerate()
                        .map(|(i, (_, c))| (i, (0..3).map(|k| (p[k] - c[k]).pow(2)).sum::<i32>()))
                        .min_by_key(|&(_, d)| d)
                        .unwrap();
                    if dist < 40 * 40 {
                        votes[best] += 1;
                        pts.push((x, y));
                    }
                }
            }
            if pts.len() < 20 {
                continue;
            }
            let colour = PALETTE[(0..6).max_by_key(|&i| votes[i]).unwrap()].0;
            let (minx, maxx) = (
                pts.iter().map(|p| p.0).min().unwrap(),
                pts.iter().map(|p| p.0).max().unwrap(),
            );
            let (miny, maxy) = (
                pts.iter().map(|p| p.1).min().unwrap(),
                pts.iter().map(|p| p.1).max().unwrap(),
            );
            let (bw, bh) = ((maxx - minx + 1) as f32, (maxy - miny + 1) as f32);
            let fill = pts.len() as f32 / (bw * bh);
            let width_at = |fy: f32| {
                let y = miny + ((bh - 1.0) * fy).round() as u32;
                pts.iter().filter(|p| p.1 == y).count() as f32
            };
            let shape = if fill > 0.92 {
                "square"
            } else if fill > 0.68 {
                "circle"
            } else if width_at(0.8) > width_at(0.5) * 1.2 {
                "triangle"
            } else {
                "diamond"
            };
            let size = if bw.max(bh) > cell * 0.55 {
                "large"
            } else {
                "small"
            };
            objects.push(Obj {
                shape,
                colour,
                size,
                col,
                row,
            });
        }
    }
    SceneSeen { dark, objects }
}

/// A partial description, from caption words.
#[derive(Debug, Default, Clone)]
struct Desc {
    shape: Option<&'static str>,
    colour: Option<&'static str>,
    size: Option<&'static str>,
    col: Option<usize>,
    row: Option<usize>,
}

impl Desc {
    fn matches(&self, o: &Obj) -> bool {
        self.shape.is_none_or(|v| v == o.shape)
            && self.colour.is_none_or(|v| v == o.colour)
            && self.size.is_none_or(|v| v == o.size)
            && self.col.is_none_or(|v| v == o.col)
            && self.row.is_none_or(|v| v == o.row)
    }
}

#[derive(Debug)]
enum Claim {
    Exists(Desc),
    Count(usize),
    Dark(bool),
    /// (a, b, horizontal): a's column (or row) is smaller than b's.
    Before(Desc, Desc, bool),
}

fn count_word(w: &str) -> usize {
    ["zero", "one", "two", "three"]
        .iter()
        .position(|c| *c == w)
        .unwrap_or_else(|| panic!("count word {w}"))
}

/// Parses a noun phrase of the documented grammar.
fn noun_phrase(text: &str) -> Desc {
    let mut d = Desc::default();
    let mut rest = text.trim();
    for (phrase, col, row) in [
        ("on the left", Some(0), None),
        ("in the centre", Some(1), None),
        ("on the right", Some(2), None),
        ("at the top", None, Some(0)),
        ("at mid-height", None, Some(1)),
        ("at the bottom", None, Some(2)),
        ("in the very centre", Some(1), Some(1)),
    ] {
        if let Some(r) = rest.strip_suffix(phrase) {
            rest = r.trim();
            d.col = col;
            d.row = row;
        }
    }
    for (ri, rw) in ["top", "middle", "bottom"].iter().enumerate() {
        for (ci, cw) in ["left", "centre", "right"].iter().enumerate() {
            if let Some(r) = rest.strip_suffix(&format!("in the {rw} {cw}")) {
                rest = r.trim();
                d.col = Some(ci);
                d.row = Some(ri);
            }
        }
    }
    let words: Vec<&str> = rest.split(' ').collect();
    for w in words {
        match w {
            "a" | "an" | "something" | "shape" | "object" | "thing" => {}
            "circle" | "disc" => d.shape = Some("circle"),
            "square" | "box" => d.shape = Some("square"),
            "triangle" => d.shape = Some("triangle"),
            "diamond" | "rhombus" => d.shape = Some("diamond"),
            "small" | "little" | "tiny" => d.size = Some("small"),
            "large" | "big" => d.size = Some("large"),
            "violet" => d.colour = Some("purple"),
            c => {
                d.colour = Some(
                    PALETTE
                        .iter()
                        .find(|(n, _)| *n == c)
                        .unwrap_or_else(|| panic!("word `{c}` in `{text}`"))
                        .0,
                )
            }
        }
    }
    d
}

fn parse(caption: &str) -> Vec<Claim> {
    let t = caption.to_lowercase();
    if let Some((head, list)) = t.split_once(": ") {
        let count = count_word(head.split(' ').next().unwrap());
        let items: Vec<&str> = list.split(", ").flat_map(|p| p.split(" and ")).collect();
        let mut claims = vec![Claim::Count(count)];
        claims.extend(items.into_iter().map(|np| Claim::Exists(noun_phrase(np))));
        return claims;
    }
    if let Some(head) = t.strip_suffix(" background") {
        let words: Vec<&str> = head.split(' ').collect();
        let dark = matches!(*words.last().unwrap(), "dark" | "black");
        return vec![Claim::Count(count_word(words[0])), Claim::Dark(dark)];
    }
    for (sep, horizontal, swap) in [
        (" to the left of ", true, false),
        (" to the right of ", true, true),
        (" above ", false, false),
        (" below ", false, true),
    ] {
        if let Some((a, b)) = t.split_once(sep) {
            let (a, b) = (noun_phrase(a), noun_phrase(b));
            return vec![if swap {
                Claim::Before(b, a, horizontal)
            } else {
                Claim::Before(a, b, horizontal)
            }];
        }
    }
    vec![Claim::Exists(noun_phrase(&t))]
}

fn holds(claims: &[Claim], s: &SceneSeen) -> bool {
    claims.iter().all(|c| match c {
        Claim::Exists(d) => s.objects.iter().any(|o| d.matches(o)),
        Claim::Count(n) => s.objects.len() == *n,
        Claim::Dark(dark) => s.dark == *dark,
        Claim::Before(a, b, horizontal) => s.objects.iter().enumerate().any(|(i, x)| {
            a.matches(x)
                && s.objects.iter().enumerate().any(|(j, y)| {
                    i != j
                        && b.matches(y)
                        && if *horizontal {
                            x.col < y.col
                        } else {
                            x.row < y.row
                        }
                })
        }),
    })
}

#[test]
fn positives_match_pixels_and_caption_text() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ScenesConfig {
        seed: 11,
        train: 0,
        val: 0,
        test: 80,
        size: 96,
        captions_per_image: 5,
    };
    let raw = generate(&cfg, dir.path()).unwrap();
    let scenes: Vec<(String, SceneSeen)> = raw
        .images
        .iter()
        .map(|i| (i.id.clone(), perceive(&dir.path().join(&i.path))))
        .collect();
    let counts: BTreeSet<usize> = scenes.iter().map(|(_, s)| s.objects.len()).collect();
    assert_eq!(
        counts,
        BTreeSet::from([1, 2, 3]),
        "scenes hold one to three objects"
    );

    let written: BTreeSet<(String, String)> = raw
        .positives
        .iter()
        .filter(|p| p.query_kind == "caption")
        .map(|p| (p.query_id.clone(), p.positive_id.clone()))
        .collect();
    let mut derived = BTreeSet::new();
    for c in &raw.captions {
        let claims = parse(&c.text);
        for (id, scene) in &scenes {
            if holds(&claims, scene) {
                derived.insert((c.id.clone(), id.clone()));
            }
        }
        assert!(
            derived.contains(&(c.id.clone(), c.image_id.clone())),
            "`{}` must describe its own image",
            c.text
        );
    }
    assert_eq!(written.len(), derived.len());
    assert_eq!(written, derived);
    // Both directions are written.
    let image_side = raw
        .positives
        .iter()
        .filter(|p| p.query_kind == "image")
        .count();
    assert_eq!(image_side, written.len());
    // The point of the dataset: many captions have positives beyond their own image.
    let extra = raw
        .captions
        .iter()
        .filter(|c| written.iter().filter(|(q, _)| *q == c.id).count() > 1)
        .count();
    assert!(
        extra * 3 > raw.captions.len(),
        "only {extra} of {} captions have extended positives",
        raw.captions.len()
    );
}
