//! Image preprocessing for image teachers, matching what the models were trained with.
//!
//! The reference pipelines resize PIL images with torchvision (`Resize(n)` on the shortest side,
//! long side truncated; `CenterCrop(n)` with rounded offsets; `ToTensor`; `Normalize`). Feature
//! parity (1e-4 relative L2) needs the same pixels, so the resampler here is Pillow's own
//! algorithm (`libImaging/Resample.c`): separable convolution, the filter widened by the scale
//! when downscaling (antialiasing), coefficients in 22-bit fixed point, a horizontal pass clipped
//! to 8 bits before the vertical pass. Tests pin the cropped bytes to Pillow's on real photos.

use image::RgbImage;
use serde::{Deserialize, Serialize};

/// Resampling filter.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    Bicubic,
    Bilinear,
}

/// How pixels become a tensor.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    /// Shortest side after resizing (with `crop`), or `[width, height]` for a plain resize.
    pub resize: Resize,
    /// Centre crop to a square of this side (after a shortest-side resize).
    pub crop: Option<u32>,
    pub interpolation: Interpolation,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Channel order: `rgb` or `bgr`.
    #[serde(default = "default_channels")]
    pub channels: String,
    /// `nchw` or `nhwc`.
    #[serde(default = "default_layout")]
    pub layout: String,
}

fn default_channels() -> String {
    "rgb".into()
}
fn default_layout() -> String {
    "nchw".into()
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Resize {
    Shortest(u32),
    Exact([u32; 2]),
}

impl<'de> Deserialize<'de> for Resize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let v = serde_json::Value::deserialize(d)?;
        let side = |v: &serde_json::Value| {
            v.as_u64()
                .filter(|&n| n > 0 && n <= 16384)
                .map(|n| n as u32)
        };
        match &v {
            serde_json::Value::Array(a) if a.len() == 2 => match (side(&a[0]), side(&a[1])) {
                (Some(w), Some(h)) => Ok(Resize::Exact([w, h])),
                _ => Err(D::Error::custom(
                    "`resize: [width, height]` takes two positive pixel counts",
                )),
            },
            _ => side(&v).map(Resize::Shortest).ok_or_else(|| {
                D::Error::custom(format!(
                    "`resize` is the shortest side (e.g. 256) or [width, height], not `{v}`"
                ))
            }),
        }
    }
}

const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

impl Preprocess {
    /// The named presets: `clip`, `imagenet`, `dinov2`.
    pub fn preset(name: &str) -> Option<Preprocess> {
        let base = |resize, crop, interpolation, mean, std| Preprocess {
            resize: Resize::Shortest(resize),
            crop: Some(crop),
            interpolation,
            mean,
            std,
            channels: default_channels(),
            layout: default_layout(),
        };
        match name {
            "clip" => Some(base(
                224,
                224,
                Interpolation::Bicubic,
                [0.481_454_66, 0.457_827_5, 0.408_210_73],
                [0.268_629_54, 0.261_302_6, 0.275_777_1],
            )),
            "imagenet" => Some(base(
                256,
                224,
                Interpolation::Bilinear,
                IMAGENET_MEAN,
                IMAGENET_STD,
            )),
            "dinov2" => Some(base(
                256,
                224,
                Interpolation::Bicubic,
                IMAGENET_MEAN,
                IMAGENET_STD,
            )),
            _ => None,
        }
    }

    /// Output side lengths (width, height).
    pub fn output_size(&self) -> (u32, u32) {
        match (&self.resize, self.crop) {
            (_, Some(c)) => (c, c),
            (Resize::Exact([w, h]), None) => (*w, *h),
            (Resize::Shortest(s), None) => (*s, *s),
        }
    }

    /// Resizes and crops; returns the 8-bit RGB pixels the tensor is made from.
    pub fn pixels(&self, img: &RgbImage) -> RgbImage {
        let (w, h) = img.dimensions();
        let (nw, nh) = match self.resize {
            Resize::Exact([rw, rh]) => (rw, rh),
            // torchvision: the long side is truncated.
            Resize::Shortest(s) if w <= h => (s, (s as f64 * h as f64 / w as f64) as u32),
            Resize::Shortest(s) => ((s as f64 * w as f64 / h as f64) as u32, s),
        };
        let window = match self.crop {
            None => Window::whole(nw, nh),
            Some(c) => Window {
                // Python's round(): halves go to the even neighbour (58.5 → 58).
                top: ((nh as f64 - c as f64) / 2.0).round_ties_even().max(0.0) as u32,
                left: ((nw as f64 - c as f64) / 2.0).round_ties_even().max(0.0) as u32,
                width: c.min(nw),
                height: c.min(nh),
            },
        };
        if (nw, nh) == (w, h) {
            image::imageops::crop_imm(img, window.left, window.top, window.width, window.height)
                .to_image()
        } else {
            // Only the pixels the crop keeps are computed: each output pixel depends on its own
            // coefficients alone, so they equal the full resize's, cropped.
            resample_window(img, nw, nh, self.interpolation, window)
        }
    }

    /// The normalised tensor (one image, without the batch dimension) in the configured layout.
    pub fn tensor(&self, pixels: &RgbImage, out: &mut Vec<f32>) {
        // The same f32 expression as (v / 255 - mean) / std, tabulated per channel.
        let lut: Vec<[f32; 256]> = (0..3)
            .map(|c| std::array::from_fn(|v| (v as f32 / 255.0 - self.mean[c]) / self.std[c]))
            .collect();
        let bgr = self.channels == "bgr";
        let raw = pixels.as_raw();
        let plane = raw.len() / 3;
        let base = out.len();
        out.resize(base + raw.len(), 0.0);
        let dst = &mut out[base..];
        let order = if bgr { [2, 1, 0] } else { [0, 1, 2] };
        if self.layout == "nhwc" {
            for (px, o) in raw.chunks_exact(3).zip(dst.chunks_exact_mut(3)) {
                for (c, &src) in order.iter().enumerate() {
                    o[c] = lut[src][px[src] as usize];
                }
            }
        } else {
            let (r, rest) = dst.split_at_mut(plane);
            let (g, b) = rest.split_at_mut(plane);
            for (i, px) in raw.chunks_exact(3).enumerate() {
                r[i] = lut[order[0]][px[order[0]] as usize];
                g[i] = lut[order[1]][px[order[1]] as usize];
                b[i] = lut[order[2]][px[order[2]] as usize];
            }
        }
    }
}

/// Decodes an image file (format from its content) to 8-bit RGB; alpha is dropped and grey is
/// replicated, as PIL's `convert("RGB")` does.
pub fn decode(path: &std::path::Path) -> Result<RgbImage, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        match decode_jpeg(&bytes) {
            Ok(img) => return Ok(img),
            // CMYK/YCCK: libjpeg cannot convert those to RGB; the general decoder can.
            Err(e) if e.contains("Unsupported color conversion") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?
        .decode()
        .map_err(|e| e.to_string())?
        .to_rgb8())
}

/// libjpeg's message for the error or warning in `cinfo`.
fn jpeg_message(cinfo: &mut mozjpeg_sys::jpeg_common_struct) -> String {
    // SAFETY: libjpeg passes its own common struct, whose `err` is the manager installed in
    // `decode_jpeg`; `format_message` writes at most JMSG_LENGTH_MAX (80) bytes into the buffer
    // (the binding declares the buffer `&[u8; 80]`, the C side writes to it).
    unsafe {
        let Some(err) = cinfo.err.as_ref() else {
            return "libjpeg error".into();
        };
        let code = err.msg_code;
        match err.format_message {
            Some(format) => {
                let format: unsafe extern "C-unwind" fn(
                    &mut mozjpeg_sys::jpeg_common_struct,
                    &mut [u8; 80],
                ) = std::mem::transmute(format);
                let mut buffer = [0u8; 80];
                format(cinfo, &mut buffer);
                let text = buffer.split(|&c| c == 0).next().unwrap_or_default();
                String::from_utf8_lossy(text).into_owned()
            }
            None => format!("libjpeg error {code}"),
        }
    }
}

/// Fatal libjpeg errors unwind out of the C decoder (built with unwinding support) to the
/// `catch_unwind` in [`decode_jpeg`], leaving nothing behind (no panic hook runs).
extern "C-unwind" fn jpeg_fatal(cinfo: &mut mozjpeg_sys::jpeg_common_struct) {
    let message = jpeg_message(cinfo);
    std::panic::resume_unwind(Box::new(message));
}

/// Warnings are ignored as Pillow ignores them, except a premature end of data, which Pillow
/// refuses ("image file is truncated") and so do we: a half-grey picture must not become a
/// teacher vector.
extern "C-unwind" fn jpeg_warning(
    cinfo: &mut mozjpeg_sys::jpeg_common_struct,
    level: std::os::raw::c_int,
) {
    // SAFETY: as in `jpeg_message`.
    let code = unsafe { cinfo.err.as_ref() }.map_or(0, |e| e.msg_code);
    if level < 0 && code == mozjpeg_sys::JWRN_JPEG_EOF {
        std::panic::resume_unwind(Box::new("image file is truncated".to_string()));
    }
}

/// Decodes a JPEG to RGB exactly as Pillow does: the same libjpeg lineage with the same
/// settings (islow IDCT, fancy upsampling); checked byte for byte against Pillow on
/// scikit-image's JPEG photos.
fn decode_jpeg(data: &[u8]) -> Result<RgbImage, String> {
    let decoded = std::panic::catch_unwind(|| -> std::io::Result<(usize, usize, Vec<u8>)> {
        // SAFETY: jpeg_std_error fills every field of the manager.
        let mut err: mozjpeg_sys::jpeg_error_mgr = unsafe { std::mem::zeroed() };
        unsafe { mozjpeg_sys::jpeg_std_error(&mut err) };
        err.error_exit = Some(jpeg_fatal);
        err.emit_message = Some(jpeg_warning);
        let mut d = mozjpeg::decompress::DecompressBuilder::new()
            .with_err(err)
            .from_mem(data)?;
        d.dct_method(mozjpeg::DctMethod::IntegerSlow);
        d.do_fancy_upsampling(true);
        let mut started = d.rgb()?;
        let (w, h) = (started.width(), started.height());
        let pixels = started.read_scanlines::<u8>()?;
        started.finish()?;
        Ok((w, h, pixels))
    });
    match decoded {
        Ok(Ok((w, h, pixels))) => RgbImage::from_raw(w as u32, h as u32, pixels)
            .ok_or_else(|| "the JPEG decoder returned a short buffer".to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(payload) => Err(payload
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_else(|| "libjpeg failed".into())),
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

fn bilinear(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 { 1.0 - x } else { 0.0 }
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`: per output pixel, the first input
/// index, the count, and fixed-point weights.
fn coefficients(
    in_size: u32,
    out_size: u32,
    filter: Interpolation,
) -> (Vec<(usize, usize)>, Vec<i32>, usize) {
    let (f, support): (fn(f64) -> f64, f64) = match filter {
        Interpolation::Bicubic => (bicubic, 2.0),
        Interpolation::Bilinear => (bilinear, 1.0),
    };
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = support * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size as usize);
    let mut kk = vec![0i32; out_size as usize * ksize];
    for xx in 0..out_size as usize {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut w: Vec<f64> = (0..n)
            .map(|x| f((x as f64 + xmin as f64 - center + 0.5) * ss))
            .collect();
        let total: f64 = w.iter().sum();
        if total != 0.0 {
            w.iter_mut().for_each(|v| *v /= total);
        }
        for (x, v) in w.iter().enumerate() {
            let scaled = v * (1u64 << PRECISION_BITS) as f64;
            kk[xx * ksize + x] = if *v < 0.0 {
                (-0.5 + scaled) as i32
            } else {
                (0.5 + scaled) as i32
            };
        }
        bounds.push((xmin, n));
    }
    (bounds, kk, ksize)
}

fn clip8(v: i32) -> u8 {
    if v >= (1i32 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// A rectangle of a resized image: the part a centre crop keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub left: u32,
    pub top: u32,
    pub width: u32,
    pub height: u32,
}

impl Window {
    pub fn whole(width: u32, height: u32) -> Window {
        Window {
            left: 0,
            top: 0,
            width,
            height,
        }
    }
}

/// Pillow's two-pass resample of an RGB image (horizontal first, rows limited to those the
/// vertical pass reads).
pub fn resample(img: &RgbImage, out_w: u32, out_h: u32, filter: Interpolation) -> RgbImage {
    resample_window(img, out_w, out_h, filter, Window::whole(out_w, out_h))
}

/// [`resample`] computing only `window` of the `out_w` × `out_h` result (columns and rows
/// outside it are never computed; the horizontal pass reads only the rows the window's
/// vertical pass needs).
pub fn resample_window(
    img: &RgbImage,
    out_w: u32,
    out_h: u32,
    filter: Interpolation,
    window: Window,
) -> RgbImage {
    let (in_w, in_h) = img.dimensions();
    let (hb, hk, hks) = coefficients(in_w, out_w, filter);
    let (vb, vk, vks) = coefficients(in_h, out_h, filter);
    let (left, top) = (window.left as usize, window.top as usize);
    let hb = &hb[left..left + window.width as usize];
    let hk = &hk[left * hks..];
    let vb = &vb[top..top + window.height as usize];
    let vk = &vk[top * vks..];
    let (out_w, out_h) = (window.width, window.height);
    let first = vb.first().map(|b| b.0).unwrap_or(0);
    let last = vb.iter().map(|b| b.0 + b.1).max().unwrap_or(in_h as usize);
    let src = img.as_raw();
    // Pillow accumulates in 32 bits: 255 · 2^22 · Σ|k| stays below 2^31.
    let half = 1i32 << (PRECISION_BITS - 1);
    // Horizontal pass over rows first..last.
    let rows = last - first;
    let mut tmp = vec![0u8; rows * out_w as usize * 3];
    for y in 0..rows {
        let row = &src[(y + first) * in_w as usize * 3..(y + first + 1) * in_w as usize * 3];
        for (xx, &(xmin, n)) in hb.iter().enumerate() {
            let k = &hk[xx * hks..xx * hks + n];
            let mut acc = [half; 3];
            for (x, &w) in k.iter().enumerate() {
                let p = &row[(xmin + x) * 3..(xmin + x) * 3 + 3];
                for c in 0..3 {
                    acc[c] += p[c] as i32 * w;
                }
            }
            for c in 0..3 {
                tmp[(y * out_w as usize + xx) * 3 + c] = clip8(acc[c]);
            }
        }
    }
    // Vertical pass.
    let mut out = vec![0u8; out_h as usize * out_w as usize * 3];
    for (yy, &(ymin, n)) in vb.iter().enumerate() {
        let k = &vk[yy * vks..yy * vks + n];
        for xx in 0..out_w as usize {
            let mut acc = [half; 3];
            for (y, &w) in k.iter().enumerate() {
                let p = &tmp[((ymin - first + y) * out_w as usize + xx) * 3..][..3];
                for c in 0..3 {
                    acc[c] += p[c] as i32 * w;
                }
            }
            for c in 0..3 {
                out[(yy * out_w as usize + xx) * 3 + c] = clip8(acc[c]);
            }
        }
    }
    RgbImage::from_raw(out_w, out_h, out).expect("sizes match")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A JPEG made by the `image` crate's encoder: whole, it decodes; cut short, it is refused
    /// as Pillow refuses it; garbage after the SOI marker is a libjpeg error, not a crash.
    #[test]
    fn jpeg_decoding_refuses_truncated_and_corrupt_files() {
        let dir = tempfile::tempdir().unwrap();
        let img = RgbImage::from_fn(64, 48, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 5) as u8, 90])
        });
        let mut bytes = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90)
            .encode_image(&img)
            .unwrap();
        let whole = dir.path().join("whole.jpg");
        std::fs::write(&whole, &bytes).unwrap();
        let decoded = decode(&whole).unwrap();
        assert_eq!(decoded.dimensions(), (64, 48));
        let close = decoded
            .pixels()
            .zip(img.pixels())
            .all(|(a, b)| a.0.iter().zip(b.0).all(|(&p, q)| p.abs_diff(q) <= 8));
        assert!(close, "a quality-90 JPEG decodes close to its source");

        let cut = dir.path().join("cut.jpg");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        assert_eq!(decode(&cut).unwrap_err(), "image file is truncated");

        let corrupt = dir.path().join("corrupt.jpg");
        let mut junk = bytes[..4].to_vec();
        junk.extend((0..4000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8));
        std::fs::write(&corrupt, &junk).unwrap();
        let e = decode(&corrupt).unwrap_err();
        assert!(!e.is_empty() && e != "image file is truncated", "{e}");
    }

    #[test]
    fn resize_reads_a_side_or_a_size_and_says_what_is_wrong() {
        let r = |j: &str| serde_json::from_str::<Resize>(j);
        assert_eq!(r("256").unwrap(), Resize::Shortest(256));
        assert_eq!(r("[320, 240]").unwrap(), Resize::Exact([320, 240]));
        assert!(
            r("\"big\"")
                .unwrap_err()
                .to_string()
                .contains("the shortest side")
        );
        assert!(
            r("[0, 3]")
                .unwrap_err()
                .to_string()
                .contains("two positive pixel counts")
        );
    }

    #[test]
    fn upscaling_a_flat_image_keeps_it_flat_and_crops_are_centred() {
        let img = RgbImage::from_pixel(96, 64, image::Rgb([10, 200, 30]));
        let p = Preprocess::preset("dinov2").unwrap();
        let out = p.pixels(&img);
        assert_eq!(out.dimensions(), (224, 224));
        assert!(
            out.pixels().all(|px| px.0 == [10, 200, 30]),
            "bicubic weights sum to one"
        );
        let mut t = Vec::new();
        p.tensor(&out, &mut t);
        assert_eq!(t.len(), 3 * 224 * 224);
        assert!(
            (t[0] - (10.0 / 255.0 - 0.485) / 0.229).abs() < 1e-6,
            "channel planes in NCHW order"
        );
        assert!((t[224 * 224] - (200.0 / 255.0 - 0.456) / 0.224).abs() < 1e-6);
    }

    #[test]
    fn a_resized_window_is_the_full_resize_cropped() {
        let img = RgbImage::from_fn(96, 80, |x, y| {
            image::Rgb([(x * 7 + y) as u8, (y * 13) as u8, (x * y) as u8])
        });
        for filter in [Interpolation::Bicubic, Interpolation::Bilinear] {
            let full = resample(&img, 307, 256, filter);
            let w = Window {
                left: 41,
                top: 16,
                width: 224,
                height: 224,
            };
            let cropped = image::imageops::crop_imm(&full, w.left, w.top, w.width, w.height);
            assert_eq!(
                resample_window(&img, 307, 256, filter, w),
                cropped.to_image()
            );
        }
    }
}
