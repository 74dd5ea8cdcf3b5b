//! Decode, resize and re-encode one image.
//!
//! PNG is decoded with the `png` crate (every colour type and bit depth it
//! reads, normalised to 8 bits per sample, alpha kept); JPEG with
//! `jpeg-decoder`, using its DCT scaling to decode big images straight at the
//! smallest scale at or above the target. Resizing uses fast_image_resize's
//! convolution filters; the output is encoded in the input's format.

use super::probe::{ImageFormat, ImageHeader};
use super::sizing::Dims;
use fast_image_resize as fir;
use serde::Deserialize;
use std::fmt;
use std::io::Cursor;

/// Resampling filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ResizeFilter {
    /// Catmull-Rom bicubic: sharp, fast.
    #[default]
    CatmullRom,
    /// Lanczos with a 3-lobe window: sharpest, slowest.
    Lanczos3,
}

/// Encoder and decoder settings.
#[derive(Debug, Clone, Copy)]
pub struct TranscodeOptions {
    pub jpeg_quality: u8,
    pub filter: ResizeFilter,
    /// Largest decoded image, in pixels, the decoders may allocate for.
    pub max_pixels: u64,
}

/// Why an image could not be transcoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TranscodeError {
    /// The image data is corrupt or truncated.
    Decode(String),
    /// A buffer could not be allocated.
    OutOfMemory(usize),
    /// Encoding or resizing failed.
    Encode(String),
}

impl fmt::Display for TranscodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Decode(e) => write!(f, "cannot decode image: {e}"),
            Self::OutOfMemory(n) => write!(f, "cannot allocate {n} bytes for the image"),
            Self::Encode(e) => write!(f, "cannot re-encode image: {e}"),
        }
    }
}

/// Channel layout of 8-bit pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    L8,
    La8,
    Rgb8,
    Rgba8,
}

impl Layout {
    pub fn channels(self) -> usize {
        match self {
            Self::L8 => 1,
            Self::La8 => 2,
            Self::Rgb8 => 3,
            Self::Rgba8 => 4,
        }
    }

    fn fir(self) -> fir::PixelType {
        match self {
            Self::L8 => fir::PixelType::U8,
            Self::La8 => fir::PixelType::U8x2,
            Self::Rgb8 => fir::PixelType::U8x3,
            Self::Rgba8 => fir::PixelType::U8x4,
        }
    }
}

/// A decoded image, 8 bits per sample.
#[derive(Debug, Clone)]
pub struct Pixels {
    pub width: u32,
    pub height: u32,
    pub layout: Layout,
    pub data: Vec<u8>,
}

fn zeroed(len: usize) -> Result<Vec<u8>, TranscodeError> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| TranscodeError::OutOfMemory(len))?;
    v.resize(len, 0);
    Ok(v)
}

fn decoded_bytes_limit(max_pixels: u64) -> usize {
    usize::try_from(max_pixels.saturating_mul(4)).unwrap_or(usize::MAX)
}

/// Decodes an image. For JPEG, `target` lets the decoder use DCT scaling:
/// the result is then at least `target` on both sides but may be smaller
/// than the original.
pub fn decode(
    bytes: &[u8],
    header: &ImageHeader,
    target: Option<Dims>,
    max_pixels: u64,
) -> Result<Pixels, TranscodeError> {
    match header.format {
        ImageFormat::Png => decode_png(bytes, max_pixels),
        ImageFormat::Jpeg => decode_jpeg(bytes, target, max_pixels),
    }
}

fn decode_png(bytes: &[u8], max_pixels: u64) -> Result<Pixels, TranscodeError> {
    let err = |e: png::DecodingError| TranscodeError::Decode(format!("png: {e}"));
    let limits = png::Limits {
        bytes: decoded_bytes_limit(max_pixels).saturating_mul(2),
    };
    let mut decoder = png::Decoder::new_with_limits(Cursor::new(bytes), limits);
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().map_err(err)?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| TranscodeError::Decode("png: image too large".into()))?;
    let mut data = zeroed(size)?;
    let frame = reader.next_frame(&mut data).map_err(err)?;
    data.truncate(frame.buffer_size());
    let layout = match frame.color_type {
        png::ColorType::Grayscale => Layout::L8,
        png::ColorType::GrayscaleAlpha => Layout::La8,
        png::ColorType::Rgb => Layout::Rgb8,
        png::ColorType::Rgba => Layout::Rgba8,
        png::ColorType::Indexed => {
            return Err(TranscodeError::Decode("png: palette was not expanded".into()))
        }
    };
    Ok(Pixels {
        width: frame.width,
        height: frame.height,
        layout,
        data,
    })
}

fn decode_jpeg(bytes: &[u8], target: Option<Dims>, max_pixels: u64) -> Result<Pixels, TranscodeError> {
    let err = |e: jpeg_decoder::Error| TranscodeError::Decode(format!("jpeg: {e}"));
    let mut decoder = jpeg_decoder::Decoder::new(Cursor::new(bytes));
    decoder.set_max_decoding_buffer_size(decoded_bytes_limit(max_pixels));
    decoder.read_info().map_err(err)?;
    if let Some(t) = target {
        let w = u16::try_from(t.width).unwrap_or(u16::MAX);
        let h = u16::try_from(t.height).unwrap_or(u16::MAX);
        decoder.scale(w, h).map_err(err)?;
    }
    let data = decoder.decode().map_err(err)?;
    let info = decoder
        .info()
        .ok_or_else(|| TranscodeError::Decode("jpeg: no frame information".into()))?;
    let (width, height) = (u32::from(info.width), u32::from(info.height));
    let (layout, data) = match info.pixel_format {
        jpeg_decoder::PixelFormat::L8 => (Layout::L8, data),
        // 12-bit greyscale comes as big-endian 16-bit samples: keep the high byte.
        jpeg_decoder::PixelFormat::L16 => (Layout::L8, data.chunks_exact(2).map(|p| p[0]).collect()),
        jpeg_decoder::PixelFormat::RGB24 => (Layout::Rgb8, data),
        jpeg_decoder::PixelFormat::CMYK32 => (Layout::Rgb8, cmyk_to_rgb(&data)),
    };
    let expected = width as usize * height as usize * layout.channels();
    if data.len() < expected {
        return Err(TranscodeError::Decode("jpeg: short pixel data".into()));
    }
    Ok(Pixels {
        width,
        height,
        layout,
        data,
    })
}

/// Adobe CMYK as jpeg-decoder returns it (inverted) to RGB.
fn cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(cmyk.len() / 4 * 3);
    for p in cmyk.chunks_exact(4) {
        let k = 255 - u16::from(p[3]);
        for &c in &p[..3] {
            let c = 255 - u16::from(c);
            // Both factors are <= 255, so the quotient fits a byte.
            out.push(((c * k) / 255) as u8);
        }
    }
    out
}

/// Resizes to exactly `to`.
pub fn resize(src: Pixels, to: Dims, filter: ResizeFilter) -> Result<Pixels, TranscodeError> {
    if src.width == to.width && src.height == to.height {
        return Ok(src);
    }
    let err = |e: &dyn fmt::Display| TranscodeError::Encode(format!("resize: {e}"));
    let pixel_type = src.layout.fir();
    let src_img =
        fir::images::Image::from_vec_u8(src.width, src.height, src.data, pixel_type).map_err(|e| err(&e))?;
    let mut dst = fir::images::Image::new(to.width, to.height, pixel_type);
    let alg = match filter {
        ResizeFilter::CatmullRom => fir::ResizeAlg::Convolution(fir::FilterType::CatmullRom),
        ResizeFilter::Lanczos3 => fir::ResizeAlg::Convolution(fir::FilterType::Lanczos3),
    };
    fir::Resizer::new()
        .resize(&src_img, &mut dst, &fir::ResizeOptions::new().resize_alg(alg))
        .map_err(|e| err(&e))?;
    Ok(Pixels {
        width: to.width,
        height: to.height,
        layout: src.layout,
        data: dst.into_vec(),
    })
}

/// Encodes in `format`. JPEG drops alpha (never present for JPEG input).
pub fn encode(px: &Pixels, format: ImageFormat, jpeg_quality: u8) -> Result<Vec<u8>, TranscodeError> {
    let mut out = Vec::new();
    match format {
        ImageFormat::Jpeg => {
            let err = |e: jpeg_encoder::EncodingError| TranscodeError::Encode(format!("jpeg: {e}"));
            let (w, h) = match (u16::try_from(px.width), u16::try_from(px.height)) {
                (Ok(w), Ok(h)) => (w, h),
                _ => return Err(TranscodeError::Encode("jpeg: image too large".into())),
            };
            let color = match px.layout {
                Layout::L8 => jpeg_encoder::ColorType::Luma,
                Layout::Rgb8 => jpeg_encoder::ColorType::Rgb,
                Layout::La8 | Layout::Rgba8 => {
                    return Err(TranscodeError::Encode("jpeg: alpha channel".into()))
                }
            };
            let enc = jpeg_encoder::Encoder::new(&mut out, jpeg_quality);
            enc.encode(&px.data, w, h, color).map_err(err)?;
        }
        ImageFormat::Png => {
            let err = |e: png::EncodingError| TranscodeError::Encode(format!("png: {e}"));
            let mut enc = png::Encoder::new(&mut out, px.width, px.height);
            enc.set_color(match px.layout {
                Layout::L8 => png::ColorType::Grayscale,
                Layout::La8 => png::ColorType::GrayscaleAlpha,
                Layout::Rgb8 => png::ColorType::Rgb,
                Layout::Rgba8 => png::ColorType::Rgba,
            });
            enc.set_depth(png::BitDepth::Eight);
            enc.set_compression(png::Compression::Fast);
            let mut writer = enc.write_header().map_err(err)?;
            writer.write_image_data(&px.data).map_err(err)?;
            writer.finish().map_err(err)?;
        }
    }
    Ok(out)
}

/// Decode, resize to `to`, and encode in the input's format.
pub fn transcode(
    bytes: &[u8],
    header: &ImageHeader,
    to: Dims,
    opts: &TranscodeOptions,
) -> Result<Vec<u8>, TranscodeError> {
    let px = decode(bytes, header, Some(to), opts.max_pixels)?;
    let px = resize(px, to, opts.filter)?;
    encode(&px, header.format, opts.jpeg_quality)
}

#[cfg(test)]
mod tests {
    use super::super::probe::probe;
    use super::*;

    fn gradient(w: u32, h: u32, layout: Layout) -> Pixels {
        let c = layout.channels();
        let mut data = Vec::with_capacity((w * h) as usize * c);
        for y in 0..h {
            for x in 0..w {
                for ch in 0..c {
                    data.push(((x * 255 / w.max(1)) as u8).wrapping_add((y * 3 + ch as u32 * 40) as u8));
                }
            }
        }
        Pixels {
            width: w,
            height: h,
            layout,
            data,
        }
    }

    #[test]
    fn png_roundtrip_every_layout_keeps_alpha() {
        for layout in [Layout::L8, Layout::La8, Layout::Rgb8, Layout::Rgba8] {
            let bytes = encode(&gradient(300, 200, layout), ImageFormat::Png, 90).expect("encode");
            let header = probe(bytes.as_slice()).expect("probe");
            let to = Dims::new(112, 84);
            let out = transcode(&bytes, &header, to, &opts()).expect("transcode");
            let back = decode(&out, &probe(out.as_slice()).expect("probe"), None, 1 << 30).expect("decode");
            assert_eq!((back.width, back.height, back.layout), (112, 84, layout));
        }
    }

    #[test]
    fn jpeg_scaled_decode_then_exact_resize() {
        let bytes = encode(&gradient(1600, 1200, Layout::Rgb8), ImageFormat::Jpeg, 90).expect("encode");
        let header = probe(bytes.as_slice()).expect("probe");
        // DCT scaling gives at least the requested size.
        let px = decode(&bytes, &header, Some(Dims::new(300, 220)), 1 << 30).expect("decode");
        assert!(
            px.width >= 300 && px.height >= 220 && px.width < 1600,
            "{}x{}",
            px.width,
            px.height
        );
        let out = transcode(&bytes, &header, Dims::new(308, 224), &opts()).expect("transcode");
        let h2 = probe(out.as_slice()).expect("probe");
        assert_eq!((h2.format, h2.width, h2.height), (ImageFormat::Jpeg, 308, 224));
    }

    #[test]
    fn corrupt_data_is_an_error_not_a_panic() {
        let bytes = encode(&gradient(200, 200, Layout::Rgb8), ImageFormat::Jpeg, 90).expect("encode");
        let header = probe(bytes.as_slice()).expect("probe");
        let cut = &bytes[..bytes.len() / 3];
        // jpeg-decoder pads truncated scans; either way no panic and a sane size.
        if let Ok(px) = decode(cut, &header, None, 1 << 30) {
            assert_eq!((px.width, px.height), (200, 200));
        }
        let png = encode(&gradient(200, 200, Layout::Rgb8), ImageFormat::Png, 90).expect("encode");
        let ph = probe(png.as_slice()).expect("probe");
        assert!(matches!(
            decode(&png[..png.len() / 2], &ph, None, 1 << 30),
            Err(TranscodeError::Decode(_))
        ));
    }

    fn opts() -> TranscodeOptions {
        TranscodeOptions {
            jpeg_quality: 90,
            filter: ResizeFilter::CatmullRom,
            max_pixels: 1 << 26,
        }
    }
}
