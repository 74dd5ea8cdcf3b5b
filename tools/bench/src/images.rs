//! Images: reading them as data URLs, and the benchmark's image pool.
//!
//! The pool is made of real photographs (by default the Debian
//! `ukui-wallpapers` backgrounds, 3640–3840 × 2400 px). Every pool image is
//! distinct — a seeded crop of 90–100 % of each side of a source photo at a
//! seeded offset, mirrored with probability ½, scaled so its long side is one
//! of the size classes (default 512 … 3840 px, never upscaled) and written as a
//! JPEG. Distinct pixels matter: the backends' encoder caches key on pixels, so
//! a repeated image would skip the encoder. The pool is cached on disk with a
//! manifest and rebuilt only when its parameters or sources change.

use crate::error::{BenchError, Result};
use crate::rng::{derive, Rng};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use vlm_budget::core::probe::{probe, ImageFormat};
use vlm_budget::core::sizing::{Dims, SizingRule};
use vlm_budget::core::transcode::{self, Layout, Pixels, ResizeFilter};

/// Largest source image decoded, pixels.
const MAX_SOURCE_PIXELS: u64 = 80_000_000;

/// Image files (`.jpg`, `.jpeg`, `.png`) in `dir`, sorted by name.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| BenchError::io(dir, e))?;
    let mut out = Vec::new();
    for entry in rd {
        let p = entry.map_err(|e| BenchError::io(dir, e))?.path();
        let ext = p
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        if matches!(ext.as_deref(), Some("jpg" | "jpeg" | "png")) && p.is_file() {
            out.push(p);
        }
    }
    out.sort();
    if out.is_empty() {
        return Err(BenchError::Usage(format!(
            "no .jpg/.jpeg/.png images in {}",
            dir.display()
        )));
    }
    Ok(out)
}

/// Size and token count of an image file, from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMeta {
    pub width: u32,
    pub height: u32,
    /// Visual tokens by the Qwen2.5-VL rule.
    pub tokens: u64,
    #[serde(skip)]
    pub jpeg: bool,
}

/// Reads the header of `bytes`.
pub fn meta(bytes: &[u8], path: &Path) -> Result<ImageMeta> {
    let err = |m: String| BenchError::Image {
        path: path.to_path_buf(),
        message: m,
    };
    let h = probe(bytes).map_err(|e| err(e.to_string()))?;
    let tokens = SizingRule::QWEN2_5_VL
        .tokens(h.width, h.height)
        .map_err(|e| err(e.to_string()))?;
    Ok(ImageMeta {
        width: h.width,
        height: h.height,
        tokens,
        jpeg: h.format == ImageFormat::Jpeg,
    })
}

/// A file as a `data:` URL, with its header's facts.
pub fn data_url(path: &Path) -> Result<(String, ImageMeta, usize)> {
    let bytes = std::fs::read(path).map_err(|e| BenchError::io(path, e))?;
    let m = meta(&bytes, path)?;
    let mime = if m.jpeg { "image/jpeg" } else { "image/png" };
    let mut url = String::with_capacity(bytes.len() * 4 / 3 + 32);
    url.push_str("data:");
    url.push_str(mime);
    url.push_str(";base64,");
    base64::engine::general_purpose::STANDARD.encode_string(&bytes, &mut url);
    Ok((url, m, bytes.len()))
}

/// What a pool is made from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolSpec {
    pub seed: u64,
    pub count: usize,
    /// Long-side classes in pixels.
    pub sizes: Vec<u32>,
    pub jpeg_quality: u8,
    /// Source photos: (file name, bytes).
    pub sources: Vec<(String, u64)>,
}

/// One pool image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolImage {
    pub file: String,
    pub source: String,
    pub width: u32,
    pub height: u32,
    pub tokens: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Manifest {
    spec: PoolSpec,
    images: Vec<PoolImage>,
}

/// How pool image `i` is cut from its source.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cut {
    pub source: usize,
    pub x0: u32,
    pub y0: u32,
    pub width: u32,
    pub height: u32,
    pub mirror: bool,
    pub out: Dims,
}

/// The seeded cut of pool image `i`, for a source of `w`×`h`.
pub fn cut(seed: u64, i: usize, sources: usize, sizes: &[u32], dims: &dyn Fn(usize) -> (u32, u32)) -> Cut {
    let mut rng = Rng::new(derive(seed, i as u64));
    let source = rng.below(sources as u64) as usize;
    let long = sizes[rng.below(sizes.len() as u64) as usize].max(1);
    let (w, h) = dims(source);
    let cw = ((f64::from(w) * rng.range(0.9, 1.0)).round() as u32).clamp(1, w);
    let ch = ((f64::from(h) * rng.range(0.9, 1.0)).round() as u32).clamp(1, h);
    let x0 = rng.below(u64::from(w - cw) + 1) as u32;
    let y0 = rng.below(u64::from(h - ch) + 1) as u32;
    let mirror = rng.unit() < 0.5;
    let scale = (f64::from(long) / f64::from(cw.max(ch))).min(1.0);
    let out = Dims::new(
        ((f64::from(cw) * scale).round() as u32).max(1),
        ((f64::from(ch) * scale).round() as u32).max(1),
    );
    Cut {
        source,
        x0,
        y0,
        width: cw,
        height: ch,
        mirror,
        out,
    }
}

fn to_rgb(px: Pixels) -> Pixels {
    let n = px.width as usize * px.height as usize;
    let data = match px.layout {
        Layout::Rgb8 => px.data,
        Layout::L8 => px.data.iter().flat_map(|&v| [v, v, v]).collect(),
        Layout::La8 | Layout::Rgba8 => {
            // Composite over white.
            let c = px.layout.channels();
            let mut out = Vec::with_capacity(n * 3);
            for p in px.data.chunks_exact(c) {
                let a = u16::from(p[c - 1]);
                for k in 0..3 {
                    let v = u16::from(p[k.min(c - 2)]);
                    out.push(((v * a + 255 * (255 - a) + 127) / 255) as u8);
                }
            }
            out
        }
    };
    Pixels {
        width: px.width,
        height: px.height,
        layout: Layout::Rgb8,
        data,
    }
}

fn crop(src: &Pixels, c: &Cut) -> Pixels {
    let (w, cw, ch) = (src.width as usize, c.width as usize, c.height as usize);
    let mut data = Vec::with_capacity(cw * ch * 3);
    for y in c.y0 as usize..c.y0 as usize + ch {
        let row = &src.data[(y * w + c.x0 as usize) * 3..(y * w + c.x0 as usize + cw) * 3];
        if c.mirror {
            data.extend(row.chunks_exact(3).rev().flatten());
        } else {
            data.extend_from_slice(row);
        }
    }
    Pixels {
        width: c.width,
        height: c.height,
        layout: Layout::Rgb8,
        data,
    }
}

fn decode_source(path: &Path) -> Result<Pixels> {
    let bytes = std::fs::read(path).map_err(|e| BenchError::io(path, e))?;
    let err = |m: String| BenchError::Image {
        path: path.to_path_buf(),
        message: m,
    };
    let h = probe(&bytes[..]).map_err(|e| err(e.to_string()))?;
    let px = transcode::decode(&bytes, &h, None, MAX_SOURCE_PIXELS).map_err(|e| err(e.to_string()))?;
    Ok(to_rgb(px))
}

/// Builds (or reuses) the pool in `out`: `count` distinct JPEGs cut from the
/// photos in `photos`. Work is spread over `threads` threads.
pub fn build_pool(
    photos: &Path,
    out: &Path,
    count: usize,
    sizes: &[u32],
    seed: u64,
    jpeg_quality: u8,
    threads: usize,
) -> Result<Vec<PoolImage>> {
    if sizes.is_empty() || sizes.contains(&0) {
        return Err(BenchError::Usage(
            "image sizes must be a non-empty list of positive pixel counts".into(),
        ));
    }
    let files = list_images(photos)?;
    let mut sources = Vec::new();
    for f in &files {
        let len = std::fs::metadata(f).map_err(|e| BenchError::io(f, e))?.len();
        sources.push((file_name(f), len));
    }
    let spec = PoolSpec {
        seed,
        count,
        sizes: sizes.to_vec(),
        jpeg_quality,
        sources,
    };
    let manifest_path = out.join("manifest.json");
    if let Ok(text) = std::fs::read_to_string(&manifest_path) {
        if let Ok(m) = serde_json::from_str::<Manifest>(&text) {
            let complete = m
                .images
                .iter()
                .all(|img| std::fs::metadata(out.join(&img.file)).is_ok_and(|md| md.len() == img.bytes));
            if m.spec == spec && complete {
                return Ok(m.images);
            }
        }
    }
    std::fs::create_dir_all(out).map_err(|e| BenchError::io(out, e))?;
    // Source sizes from the headers, without decoding.
    let mut dims = Vec::new();
    for f in &files {
        let bytes = std::fs::read(f).map_err(|e| BenchError::io(f, e))?;
        let m = meta(&bytes, f)?;
        dims.push((m.width, m.height));
    }
    let cuts: Vec<Cut> = (0..count)
        .map(|i| cut(seed, i, files.len(), sizes, &|s| dims[s]))
        .collect();
    let threads = threads.clamp(1, files.len());
    let results: Vec<Result<Vec<(usize, PoolImage)>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (files, cuts) = (&files, &cuts);
                scope.spawn(move || -> Result<Vec<(usize, PoolImage)>> {
                    let mut done = Vec::new();
                    // Thread t handles sources t, t + threads, ...: each decoded once.
                    for s in (t..files.len()).step_by(threads) {
                        let mine: Vec<usize> = (0..cuts.len()).filter(|&i| cuts[i].source == s).collect();
                        if mine.is_empty() {
                            continue;
                        }
                        let src = decode_source(&files[s])?;
                        for i in mine {
                            done.push((i, write_cut(&src, &cuts[i], i, &files[s], out, jpeg_quality)?));
                        }
                    }
                    Ok(done)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(BenchError::Process("image worker panicked".into())))
            })
            .collect()
    });
    let mut images: Vec<Option<PoolImage>> = vec![None; count];
    for r in results {
        for (i, img) in r? {
            images[i] = Some(img);
        }
    }
    let images: Vec<PoolImage> = images.into_iter().flatten().collect();
    if images.len() != count {
        return Err(BenchError::Process("image pool incomplete".into()));
    }
    let text = serde_json::to_string_pretty(&Manifest {
        spec,
        images: images.clone(),
    })
    .map_err(|e| BenchError::json("manifest", e))?;
    std::fs::write(&manifest_path, text).map_err(|e| BenchError::io(&manifest_path, e))?;
    Ok(images)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn write_cut(src: &Pixels, c: &Cut, i: usize, source: &Path, out: &Path, q: u8) -> Result<PoolImage> {
    let err = |m: String| BenchError::Image {
        path: source.to_path_buf(),
        message: m,
    };
    let px =
        transcode::resize(crop(src, c), c.out, ResizeFilter::CatmullRom).map_err(|e| err(e.to_string()))?;
    let jpeg = transcode::encode(&px, ImageFormat::Jpeg, q).map_err(|e| err(e.to_string()))?;
    let file = format!("img-{i:05}.jpg");
    let path = out.join(&file);
    std::fs::write(&path, &jpeg).map_err(|e| BenchError::io(&path, e))?;
    let tokens = SizingRule::QWEN2_5_VL
        .tokens(c.out.width, c.out.height)
        .map_err(|e| err(e.to_string()))?;
    Ok(PoolImage {
        file,
        source: file_name(source),
        width: c.out.width,
        height: c.out.height,
        tokens,
        bytes: jpeg.len() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_are_seeded_within_bounds_and_sized() {
        let sizes = [512, 1024, 3840];
        let dims = |s: usize| if s == 0 { (3840, 2400) } else { (3640, 2400) };
        let mut classes = std::collections::BTreeMap::new();
        for i in 0..500 {
            let c = cut(3, i, 2, &sizes, &dims);
            assert_eq!(c, cut(3, i, 2, &sizes, &dims));
            let (w, h) = dims(c.source);
            assert!(c.x0 + c.width <= w && c.y0 + c.height <= h);
            assert!(c.width as f64 >= 0.9 * w as f64 - 1.0 && c.height as f64 >= 0.9 * h as f64 - 1.0);
            let long = c.out.width.max(c.out.height);
            // Long side is a size class, unless the crop is smaller (no upscaling).
            assert!(sizes.contains(&long) || long == c.width.max(c.height), "{c:?}");
            assert!(c.out.width <= c.width && c.out.height <= c.height);
            // The 3840 class is never upscaled: it keeps the crop's long side (≥ 90% of 3640).
            let class = if long > 1024 {
                assert!(long >= 3276, "{c:?}");
                3840
            } else {
                long
            };
            *classes.entry(class).or_insert(0) += 1;
        }
        assert_eq!(classes.keys().copied().collect::<Vec<_>>(), vec![512, 1024, 3840]);
        assert!(classes.values().all(|&n| n > 120), "{classes:?}");
        assert_ne!(cut(3, 0, 2, &sizes, &dims), cut(4, 0, 2, &sizes, &dims));
    }

    #[test]
    fn crop_mirrors_rows() {
        let src = Pixels {
            width: 3,
            height: 2,
            layout: Layout::Rgb8,
            data: (0u8..18).collect(),
        };
        let c = Cut {
            source: 0,
            x0: 1,
            y0: 1,
            width: 2,
            height: 1,
            mirror: true,
            out: Dims::new(2, 1),
        };
        assert_eq!(crop(&src, &c).data, vec![15, 16, 17, 12, 13, 14]);
        let c = Cut { mirror: false, ..c };
        assert_eq!(crop(&src, &c).data, vec![12, 13, 14, 15, 16, 17]);
    }

    #[test]
    fn alpha_is_composited_over_white() {
        let px = Pixels {
            width: 2,
            height: 1,
            layout: Layout::Rgba8,
            data: vec![10, 20, 30, 255, 0, 0, 0, 0],
        };
        assert_eq!(to_rgb(px).data, vec![10, 20, 30, 255, 255, 255]);
        let px = Pixels {
            width: 1,
            height: 1,
            layout: Layout::La8,
            data: vec![100, 255],
        };
        assert_eq!(to_rgb(px).data, vec![100, 100, 100]);
    }
}
