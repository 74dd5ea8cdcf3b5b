//! Decode, resize and re-encode one image.
//!
//! PNG is decoded with the `png` crate (every colour type and bit depth it
//! reads, normalised to 8 bits per sample, alpha kept); JPEG with
//! `jpeg-decoder`, using its DCT scaling to decode big images straight at the
//! smallest scale (1/8, 1/4, 1/2 or 1) that is at least the target on both
//! sides. Resizing uses fast_image_resize's convolution filters, on the part
//! of the decoded buffer the picture covers; the output is encoded in the
//! input's format: JPEG with 4:2:0 chroma subsampling and standard Huffman
//! tables (as libjpeg and Pillow write by default), PNG with the `png` crate's
//! fast deflate and adaptive row filters.
//!
//! Pixel buffers are not copied between the steps: alpha is premultiplied in
//! place before resizing and divided out of the small result, and colour
//! conversions that shrink a buffer (CMYK, 16-bit grey) run in place.

use super::exif;
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

/// What a resized image keeps of the original's metadata (see
/// [`super::exif`]): the EXIF orientation, and an ICC profile of the
/// output's colour space.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    /// EXIF orientation 2..=8 (1, the default, is not carried).
    pub orientation: Option<u16>,
    /// The ICC profile, when it describes the decoded pixels (not, e.g.,
    /// a CMYK profile once CMYK was converted to RGB).
    pub icc: Option<Vec<u8>>,
}

impl Metadata {
    fn new(orientation: Option<u16>, icc: Option<Vec<u8>>, layout: Layout) -> Self {
        let space: &[u8] = match layout {
            Layout::L8 | Layout::La8 => b"GRAY",
            Layout::Rgb8 | Layout::Rgba8 => b"RGB ",
        };
        Self {
            orientation: orientation.filter(|&o| o != 1),
            icc: icc.filter(|p| exif::icc_colour_space(p) == Some(space)),
        }
    }
}

/// A decoded image and the part of its buffer the picture covers.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub pixels: Pixels,
    /// Metadata to carry to the re-encoded image.
    pub meta: Metadata,
    /// Width and height, in buffer pixels, of the picture. The buffer's own
    /// size, except after DCT scaling of a JPEG whose sides are not multiples
    /// of the scaled block: its last column or row then covers the picture
    /// only in part (the rest is the encoder's edge padding).
    pub extent: (f64, f64),
}

impl From<Pixels> for Decoded {
    fn from(pixels: Pixels) -> Self {
        let extent = (f64::from(pixels.width), f64::from(pixels.height));
        Self {
            pixels,
            extent,
            meta: Metadata::default(),
        }
    }
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
/// the buffer is then at least `target` on both sides but may be smaller
/// than the original, and its last column or row may reach past the picture
/// (see [`Decoded::extent`]; [`decode_scaled`] keeps it).
pub fn decode(
    bytes: &[u8],
    header: &ImageHeader,
    target: Option<Dims>,
    max_pixels: u64,
) -> Result<Pixels, TranscodeError> {
    decode_scaled(bytes, header, target, max_pixels).map(|d| d.pixels)
}

/// [`decode`], with the part of the buffer the picture covers.
pub fn decode_scaled(
    bytes: &[u8],
    header: &ImageHeader,
    target: Option<Dims>,
    max_pixels: u64,
) -> Result<Decoded, TranscodeError> {
    match header.format {
        ImageFormat::Png => decode_png(bytes, max_pixels),
        ImageFormat::Jpeg => decode_jpeg(bytes, target, max_pixels),
    }
}

fn decode_png(bytes: &[u8], max_pixels: u64) -> Result<Decoded, TranscodeError> {
    let err = |e: png::DecodingError| TranscodeError::Decode(format!("png: {e}"));
    let limits = png::Limits {
        bytes: decoded_bytes_limit(max_pixels).saturating_mul(2),
    };
    let mut decoder = png::Decoder::new_with_limits(Cursor::new(bytes), limits);
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    // The output carries no text metadata: skip parsing it. Chunk CRCs
    // are still checked, so a damaged file is refused, not resized. The
    // ICC profile and the EXIF orientation are kept.
    decoder.set_ignore_text_chunk(true);
    let mut reader = decoder.read_info().map_err(err)?;
    let icc = reader.info().icc_profile.as_deref().map(<[u8]>::to_vec);
    let orientation = reader.info().exif_metadata.as_deref().and_then(exif::orientation);
    // `Limits` bounds the decoder's own buffers, not the output: hold the
    // pixel limit here, before the output buffer is allocated.
    let (w, h) = reader.info().size();
    if u64::from(w) * u64::from(h) > max_pixels {
        return Err(TranscodeError::Decode(format!(
            "png: {w}x{h} is above the {max_pixels}-pixel limit"
        )));
    }
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
    let mut decoded = Decoded::from(Pixels {
        width: frame.width,
        height: frame.height,
        layout,
        data,
    });
    decoded.meta = Metadata::new(orientation, icc, layout);
    Ok(decoded)
}

/// Side of a JPEG decoded at `eighths`/8 scale, as jpeg-decoder rounds it.
fn scaled_side(side: u16, eighths: u16) -> u16 {
    let n = u32::from(side) * u32::from(eighths);
    // At most `side`, so it fits.
    n.div_ceil(8) as u16
}

/// The smallest DCT scale (in eighths: 1, 2, 4 or 8) at which a `width` x
/// `height` JPEG decodes to at least `target` on both sides.
pub fn dct_scale(width: u16, height: u16, target: Dims) -> u16 {
    [1u16, 2, 4]
        .into_iter()
        .find(|&s| {
            u32::from(scaled_side(width, s)) >= target.width
                && u32::from(scaled_side(height, s)) >= target.height
        })
        .unwrap_or(8)
}

fn decode_jpeg(bytes: &[u8], target: Option<Dims>, max_pixels: u64) -> Result<Decoded, TranscodeError> {
    let err = |e: jpeg_decoder::Error| TranscodeError::Decode(format!("jpeg: {e}"));
    let mut decoder = jpeg_decoder::Decoder::new(Cursor::new(bytes));
    decoder.set_max_decoding_buffer_size(decoded_bytes_limit(max_pixels));
    decoder.read_info().map_err(err)?;
    let info = decoder
        .info()
        .ok_or_else(|| TranscodeError::Decode("jpeg: no frame information".into()))?;
    let (full_w, full_h) = (info.width, info.height);
    let mut eighths = 8u16;
    if let Some(t) = target {
        let s = dct_scale(full_w, full_h, t);
        if s < 8 {
            // jpeg-decoder takes the smallest scale at which *either* side
            // reaches the request; asking for the scaled size of both sides
            // makes that scale `s`. Should rounding make it pick a smaller
            // one, decode at full size instead.
            let want = (scaled_side(full_w, s), scaled_side(full_h, s));
            if decoder.scale(want.0, want.1).map_err(err)? == want {
                eighths = s;
            } else {
                decoder.scale(full_w, full_h).map_err(err)?;
            }
        }
    }
    let mut data = decoder.decode().map_err(err)?;
    let info = decoder
        .info()
        .ok_or_else(|| TranscodeError::Decode("jpeg: no frame information".into()))?;
    let (width, height) = (u32::from(info.width), u32::from(info.height));
    let layout = match info.pixel_format {
        jpeg_decoder::PixelFormat::L8 => Layout::L8,
        jpeg_decoder::PixelFormat::L16 => {
            l16_to_l8_in_place(&mut data);
            Layout::L8
        }
        jpeg_decoder::PixelFormat::RGB24 => Layout::Rgb8,
        jpeg_decoder::PixelFormat::CMYK32 => {
            cmyk_to_rgb_in_place(&mut data);
            Layout::Rgb8
        }
    };
    let expected = width as usize * height as usize * layout.channels();
    if data.len() < expected {
        return Err(TranscodeError::Decode("jpeg: short pixel data".into()));
    }
    let scale = f64::from(eighths) / 8.0;
    let orientation = decoder.exif_data().and_then(exif::orientation);
    let meta = Metadata::new(orientation, decoder.icc_profile(), layout);
    Ok(Decoded {
        meta,
        pixels: Pixels {
            width,
            height,
            layout,
            data,
        },
        extent: (
            (f64::from(full_w) * scale).min(f64::from(width)),
            (f64::from(full_h) * scale).min(f64::from(height)),
        ),
    })
}

/// 16-bit big-endian grey samples to 8 bits (the high byte), in place.
fn l16_to_l8_in_place(data: &mut Vec<u8>) {
    let n = data.len() / 2;
    for i in 0..n {
        data[i] = data[2 * i];
    }
    data.truncate(n);
}

/// CMYK ink amounts (0 is no ink: jpeg-decoder undoes Adobe's inverted
/// storage, for CMYK and YCCK alike) to RGB, in place.
fn cmyk_to_rgb_in_place(data: &mut Vec<u8>) {
    let n = data.len() / 4;
    for i in 0..n {
        // Pixel i is read before anything at or after 3*i+3 <= 4*i+4 is written.
        let (c, m, y, k) = (data[4 * i], data[4 * i + 1], data[4 * i + 2], data[4 * i + 3]);
        let k = 255 - u16::from(k);
        for (j, v) in [c, m, y].into_iter().enumerate() {
            // Both factors are <= 255, so the quotient fits a byte.
            data[3 * i + j] = (((255 - u16::from(v)) * k) / 255) as u8;
        }
    }
    data.truncate(n * 3);
}

/// Resizes the picture to exactly `to`. Images with alpha are resized
/// premultiplied (no dark fringes), the premultiplication done in place.
pub fn resize(src: impl Into<Decoded>, to: Dims, filter: ResizeFilter) -> Result<Pixels, TranscodeError> {
    let Decoded {
        pixels: src, extent, ..
    } = src.into();
    let whole = extent == (f64::from(src.width), f64::from(src.height));
    if whole && src.width == to.width && src.height == to.height {
        return Ok(src);
    }
    let err = |e: &dyn fmt::Display| TranscodeError::Encode(format!("resize: {e}"));
    let layout = src.layout;
    let pixel_type = layout.fir();
    let alpha = matches!(layout, Layout::La8 | Layout::Rgba8);
    let mut src_img =
        fir::images::Image::from_vec_u8(src.width, src.height, src.data, pixel_type).map_err(|e| err(&e))?;
    let mul_div = fir::MulDiv::default();
    if alpha {
        mul_div
            .multiply_alpha_inplace(&mut src_img)
            .map_err(|e| err(&e))?;
    }
    let mut dst = fir::images::Image::new(to.width, to.height, pixel_type);
    let alg = match filter {
        ResizeFilter::CatmullRom => fir::ResizeAlg::Convolution(fir::FilterType::CatmullRom),
        ResizeFilter::Lanczos3 => fir::ResizeAlg::Convolution(fir::FilterType::Lanczos3),
    };
    let options = fir::ResizeOptions::new()
        .resize_alg(alg)
        .use_alpha(false)
        .crop(0.0, 0.0, extent.0, extent.1);
    fir::Resizer::new()
        .resize(&src_img, &mut dst, &options)
        .map_err(|e| err(&e))?;
    drop(src_img);
    if alpha {
        mul_div.divide_alpha_inplace(&mut dst).map_err(|e| err(&e))?;
    }
    Ok(Pixels {
        width: to.width,
        height: to.height,
        layout,
        data: dst.into_vec(),
    })
}

/// Encodes in `format`. JPEG drops alpha (never present for JPEG input).
pub fn encode(px: &Pixels, format: ImageFormat, jpeg_quality: u8) -> Result<Vec<u8>, TranscodeError> {
    encode_with(px, format, jpeg_quality, &Metadata::default())
}

/// [`encode`], writing `meta`: for JPEG an APP1 `Exif` segment with the
/// orientation and APP2 `ICC_PROFILE` segments, for PNG `eXIf` and `iCCP`.
pub fn encode_with(
    px: &Pixels,
    format: ImageFormat,
    jpeg_quality: u8,
    meta: &Metadata,
) -> Result<Vec<u8>, TranscodeError> {
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
            let mut enc = jpeg_encoder::Encoder::new(&mut out, jpeg_quality);
            // 4:2:0 with box-averaged chroma at every quality, as libjpeg's
            // and Pillow's defaults (jpeg-encoder keeps full chroma from
            // quality 90 up, for about 1.5x the bytes).
            enc.set_sampling_factor(jpeg_encoder::SamplingFactor::F_2_2);
            enc.set_chroma_subsampling_method(jpeg_encoder::ChromaSubsamplingMethod::Average);
            if let Some(o) = meta.orientation {
                let mut app1 = exif::EXIF_ID.to_vec();
                app1.extend_from_slice(&exif::orientation_tiff(o));
                enc.add_app_segment(1, app1).map_err(err)?;
            }
            if let Some(icc) = &meta.icc {
                enc.add_icc_profile(icc).map_err(err)?;
            }
            enc.encode(&px.data, w, h, color).map_err(err)?;
        }
        ImageFormat::Png => {
            let err = |e: png::EncodingError| TranscodeError::Encode(format!("png: {e}"));
            let mut info = png::Info::with_size(px.width, px.height);
            info.color_type = match px.layout {
                Layout::L8 => png::ColorType::Grayscale,
                Layout::La8 => png::ColorType::GrayscaleAlpha,
                Layout::Rgb8 => png::ColorType::Rgb,
                Layout::Rgba8 => png::ColorType::Rgba,
            };
            info.bit_depth = png::BitDepth::Eight;
            info.icc_profile = meta.icc.as_deref().map(std::borrow::Cow::Borrowed);
            info.exif_metadata = meta.orientation.map(|o| exif::orientation_tiff(o).into());
            let mut enc = png::Encoder::with_info(&mut out, info).map_err(err)?;
            // fdeflate with adaptive row filters: a few ms for a 1-Mpixel
            // image. zlib-class levels shrink photos by up to a third more
            // but cost 4-20x the time, on the proxy's worker thread.
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
    let mut px = decode_scaled(bytes, header, Some(to), opts.max_pixels)?;
    let meta = std::mem::take(&mut px.meta);
    let px = resize(px, to, opts.filter)?;
    encode_with(&px, header.format, opts.jpeg_quality, &meta)
}

#[cfg(test)]
mod tests {
    use super::super::probe::probe;
    use super::super::sizing::SizingRule;
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

    /// A photo-like picture: smooth shading, hard-edged discs, thin lines
    /// and sensor-like grain; deterministic.
    fn photo(w: u32, h: u32, layout: Layout) -> Pixels {
        let c = layout.channels();
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut grain = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            f32::from((state >> 60) as u8) - 7.5
        };
        let discs = [(0.3f32, 0.4f32, 0.15f32), (0.7, 0.6, 0.2), (0.55, 0.2, 0.08)];
        let mut data = Vec::with_capacity(w as usize * h as usize * c);
        for y in 0..h {
            for x in 0..w {
                let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
                let inside = discs
                    .iter()
                    .filter(|(cx, cy, r)| (fx - cx).powi(2) + (fy - cy).powi(2) < r * r)
                    .count() as f32;
                let lines = if fx < 0.2 && (x / 3) % 2 == 0 { 40.0 } else { 0.0 };
                for ch in 0..c {
                    let k = ch as f32;
                    let v = if ch == 3 || (ch == 1 && layout == Layout::La8) {
                        // Alpha: opaque, a soft ramp and a transparent band.
                        if fy < 0.1 {
                            0.0
                        } else {
                            255.0 * fx.max(0.3)
                        }
                    } else {
                        120.0 + 60.0 * (5.0 * fx + k).sin() * (3.0 * fy).cos() + 50.0 * inside - lines
                            + grain()
                    };
                    data.push(v.clamp(0.0, 255.0) as u8);
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

    /// PSNR of two same-size images over every sample, in dB.
    fn psnr(a: &Pixels, b: &Pixels) -> f64 {
        assert_eq!((a.width, a.height, a.layout), (b.width, b.height, b.layout));
        let se: f64 = a
            .data
            .iter()
            .zip(&b.data)
            .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
            .sum();
        let mse = se / a.data.len() as f64;
        if mse == 0.0 {
            f64::INFINITY
        } else {
            10.0 * (255.0 * 255.0 / mse).log10()
        }
    }

    fn jpeg(px: &Pixels, quality: u8) -> (Vec<u8>, ImageHeader) {
        let bytes = encode(px, ImageFormat::Jpeg, quality).expect("encode");
        let header = probe(bytes.as_slice()).expect("probe");
        (bytes, header)
    }

    /// The reference: decode at full size, resize the whole picture.
    fn full_decode_then_resize(bytes: &[u8], header: &ImageHeader, to: Dims) -> Pixels {
        let full = decode(bytes, header, None, 1 << 30).expect("decode");
        assert_eq!((full.width, full.height), (header.width, header.height));
        resize(full, to, ResizeFilter::CatmullRom).expect("resize")
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

    fn icc(space: &[u8; 4], len: usize) -> Vec<u8> {
        let mut p: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        p[16..20].copy_from_slice(space);
        p
    }

    #[test]
    fn orientation_and_colour_profile_are_carried() {
        let cases = [
            (ImageFormat::Jpeg, Layout::Rgb8, b"RGB "),
            (ImageFormat::Jpeg, Layout::L8, b"GRAY"),
            (ImageFormat::Png, Layout::Rgba8, b"RGB "),
            (ImageFormat::Png, Layout::La8, b"GRAY"),
        ];
        for (format, layout, space) in cases {
            // A profile over one APP2 segment's worth, in two segments.
            let meta = Metadata {
                orientation: Some(6),
                icc: Some(icc(space, 70_000)),
            };
            let bytes = encode_with(&gradient(400, 300, layout), format, 90, &meta).expect("encode");
            let header = probe(bytes.as_slice()).expect("probe");
            let out = transcode(&bytes, &header, Dims::new(112, 84), &opts()).expect("transcode");
            let back =
                decode_scaled(&out, &probe(out.as_slice()).expect("probe"), None, 1 << 30).expect("decode");
            // Stored as before (landscape), to be shown turned, as the original.
            assert_eq!((back.pixels.width, back.pixels.height), (112, 84));
            assert_eq!(back.meta, meta, "{format:?} {layout:?}");
        }
        // Without metadata, none is invented; orientation 1 is not written;
        // a profile of another colour space (CMYK converted to RGB) is dropped.
        let plain = encode(&gradient(400, 300, Layout::Rgb8), ImageFormat::Jpeg, 90).expect("encode");
        let h = probe(plain.as_slice()).expect("probe");
        let out = transcode(&plain, &h, Dims::new(112, 84), &opts()).expect("transcode");
        let back =
            decode_scaled(&out, &probe(out.as_slice()).expect("probe"), None, 1 << 30).expect("decode");
        assert_eq!(back.meta, Metadata::default());
        let m = Metadata::new(Some(1), Some(icc(b"CMYK", 200)), Layout::Rgb8);
        assert_eq!(m, Metadata::default());
    }

    #[test]
    fn dct_scale_is_the_smallest_at_or_above_the_target_on_both_sides() {
        // 1/4 gives 960x600: tall enough but too narrow for 980 wide.
        assert_eq!(dct_scale(3840, 2400, Dims::new(980, 588)), 4);
        assert_eq!(dct_scale(3840, 2400, Dims::new(960, 600)), 2);
        assert_eq!(dct_scale(3840, 2400, Dims::new(1120, 700)), 4);
        assert_eq!(dct_scale(3840, 2400, Dims::new(480, 300)), 1);
        assert_eq!(dct_scale(3840, 2400, Dims::new(481, 300)), 2);
        // Odd sides round up: 1001/8 -> 126, 667/8 -> 84.
        assert_eq!(dct_scale(1001, 667, Dims::new(126, 84)), 1);
        assert_eq!(dct_scale(1001, 667, Dims::new(127, 84)), 2);
        assert_eq!(dct_scale(1001, 667, Dims::new(1001, 667)), 8);
        assert_eq!(dct_scale(100, 100, Dims::new(200, 50)), 8);
    }

    #[test]
    fn jpeg_decodes_at_the_chosen_scale_not_the_decoders_own() {
        // Asked for 410x240, jpeg-decoder alone would take 1/4 (400x250:
        // tall enough, too narrow) and the resize would then upscale.
        let (bytes, header) = jpeg(&photo(1600, 1000, Layout::Rgb8), 90);
        let d = decode_scaled(&bytes, &header, Some(Dims::new(410, 240)), 1 << 30).expect("decode");
        assert_eq!((d.pixels.width, d.pixels.height), (800, 500));
        assert_eq!(d.extent, (800.0, 500.0));
        let d = decode_scaled(&bytes, &header, Some(Dims::new(400, 250)), 1 << 30).expect("decode");
        assert_eq!((d.pixels.width, d.pixels.height), (400, 250));
        // Odd sides: the buffer rounds up, the extent is the picture's.
        let (bytes, header) = jpeg(&photo(1001, 667, Layout::Rgb8), 90);
        let d = decode_scaled(&bytes, &header, Some(Dims::new(120, 80)), 1 << 30).expect("decode");
        assert_eq!((d.pixels.width, d.pixels.height), (126, 84));
        assert_eq!(d.extent, (125.125, 83.375));
        assert_eq!(d.pixels.data.len(), 126 * 84 * 3);
    }

    #[test]
    fn dct_scaled_path_matches_full_decode_then_resize() {
        // PSNR threshold: 30 dB is "visually equivalent" for photographs;
        // the scaled path measures 42-53 dB on these pictures.
        const MIN_PSNR_DB: f64 = 30.0;
        let rule = SizingRule::QWEN2_5_VL;
        // (width, height, layout, budget, DCT scale in eighths)
        let cases = [
            (1200, 800, Layout::Rgb8, 256, 4),
            (1001, 667, Layout::Rgb8, 40, 2),
            (777, 1203, Layout::Rgb8, 9, 1),
            (1203, 797, Layout::L8, 100, 4),
        ];
        for (w, h, layout, budget, eighths) in cases {
            let (bytes, header) = jpeg(&photo(w, h, layout), 95);
            let to = rule
                .fit_to_budget(w, h, budget)
                .expect("rule")
                .expect("over budget");
            assert_eq!(dct_scale(w as u16, h as u16, to), eighths, "{w}x{h} -> {to:?}");
            let scaled = decode_scaled(&bytes, &header, Some(to), 1 << 30).expect("decode");
            assert!(
                scaled.pixels.width < w
                    && scaled.pixels.width >= to.width
                    && scaled.pixels.height >= to.height,
                "{w}x{h} -> {to:?}: decoded {}x{}",
                scaled.pixels.width,
                scaled.pixels.height
            );
            let fast = resize(scaled, to, ResizeFilter::CatmullRom).expect("resize");
            let reference = full_decode_then_resize(&bytes, &header, to);
            assert_eq!(
                (fast.width, fast.height, fast.layout),
                (to.width, to.height, layout)
            );
            let db = psnr(&fast, &reference);
            assert!(db >= MIN_PSNR_DB, "{w}x{h} {layout:?} -> {to:?}: {db:.1} dB");
            // The whole job gives the same size and pixels as the two steps.
            let out = transcode(&bytes, &header, to, &opts()).expect("transcode");
            let h2 = probe(out.as_slice()).expect("probe");
            assert_eq!(
                (h2.format, h2.width, h2.height),
                (ImageFormat::Jpeg, to.width, to.height)
            );
        }
    }

    #[test]
    fn odd_sized_scaled_decode_is_cropped_to_the_picture() {
        // 1001 px at 1/8 is 125.125 px: the 126th column is mostly edge
        // padding. Resizing all 126 columns would stretch the picture; the
        // extent keeps it in place, which shows against the reference.
        let (bytes, header) = jpeg(&photo(1001, 667, Layout::Rgb8), 95);
        let to = Dims::new(112, 56);
        let reference = full_decode_then_resize(&bytes, &header, to);
        let scaled = decode_scaled(&bytes, &header, Some(to), 1 << 30).expect("decode");
        assert_eq!(scaled.extent, (125.125, 83.375));
        let uncropped = Decoded::from(scaled.pixels.clone());
        let cropped = psnr(
            &resize(scaled, to, ResizeFilter::CatmullRom).expect("resize"),
            &reference,
        );
        let stretched = psnr(
            &resize(uncropped, to, ResizeFilter::CatmullRom).expect("resize"),
            &reference,
        );
        assert!(
            cropped > stretched + 1.0,
            "cropped {cropped:.1} dB, stretched {stretched:.1} dB"
        );
    }

    #[test]
    fn alpha_is_premultiplied_in_place_as_the_resizer_would() {
        for layout in [Layout::La8, Layout::Rgba8] {
            let src = photo(640, 400, layout);
            let to = Dims::new(196, 112);
            let ours = resize(Decoded::from(src.clone()), to, ResizeFilter::CatmullRom).expect("resize");
            // fast_image_resize's own alpha handling (into a copy of the source).
            let pt = layout.fir();
            let img = fir::images::Image::from_vec_u8(src.width, src.height, src.data, pt).expect("image");
            let mut dst = fir::images::Image::new(to.width, to.height, pt);
            let alg = fir::ResizeAlg::Convolution(fir::FilterType::CatmullRom);
            fir::Resizer::new()
                .resize(
                    &img,
                    &mut dst,
                    &fir::ResizeOptions::new().resize_alg(alg).use_alpha(true),
                )
                .expect("resize");
            assert_eq!(ours.data, dst.into_vec(), "{layout:?}");
            assert_eq!(ours.layout, layout);
        }
    }

    #[test]
    fn colour_conversions_in_place() {
        let mut cmyk = vec![0, 0, 0, 0, 255, 255, 255, 255, 55, 155, 255, 128, 10, 20, 30, 255];
        cmyk_to_rgb_in_place(&mut cmyk);
        // Ink amounts: 0 is white paper, full K is black.
        assert_eq!(cmyk, vec![255, 255, 255, 0, 0, 0, 99, 49, 0, 0, 0, 0]);
        let mut l16 = vec![0x12, 0x34, 0xFF, 0x00, 0x00, 0xFF];
        l16_to_l8_in_place(&mut l16);
        assert_eq!(l16, vec![0x12, 0xFF, 0x00]);
    }

    #[test]
    fn cmyk_jpegs_come_out_as_rgb() {
        // Magenta and yellow ink on white: red, as Adobe CMYK and as YCCK.
        let (w, h) = (96u16, 64u16);
        let ink: Vec<u8> = (0..usize::from(w) * usize::from(h))
            .flat_map(|_| [0, 255, 255, 0])
            .collect();
        for color in [jpeg_encoder::ColorType::Cmyk, jpeg_encoder::ColorType::CmykAsYcck] {
            let mut bytes = Vec::new();
            jpeg_encoder::Encoder::new(&mut bytes, 95)
                .encode(&ink, w, h, color)
                .expect("encode");
            let header = probe(bytes.as_slice()).expect("probe");
            assert_eq!(header.color, 4);
            let to = Dims::new(56, 28);
            let out = transcode(&bytes, &header, to, &opts()).expect("transcode");
            let px = decode(&out, &probe(out.as_slice()).expect("probe"), None, 1 << 30).expect("decode");
            assert_eq!((px.width, px.height, px.layout), (56, 28, Layout::Rgb8));
            let centre = &px.data[(14 * 56 + 28) * 3..][..3];
            assert!(
                centre[0] > 230 && centre[1] < 25 && centre[2] < 25,
                "{color:?}: {centre:?}"
            );
        }
    }

    /// Horizontal and vertical sampling factors of each component in the
    /// frame header of a baseline JPEG.
    fn jpeg_sampling(bytes: &[u8]) -> Vec<u8> {
        let sof = bytes.windows(2).position(|w| w == [0xFF, 0xC0]).expect("SOF0");
        let comps = usize::from(bytes[sof + 9]);
        (0..comps).map(|i| bytes[sof + 11 + 3 * i]).collect()
    }

    #[test]
    fn jpeg_output_is_420_at_every_quality() {
        for q in [50, 90, 100] {
            let out = encode(&photo(64, 48, Layout::Rgb8), ImageFormat::Jpeg, q).expect("encode");
            assert_eq!(jpeg_sampling(&out), vec![0x22, 0x11, 0x11], "quality {q}");
        }
        let grey = encode(&photo(64, 48, Layout::L8), ImageFormat::Jpeg, 90).expect("encode");
        assert_eq!(jpeg_sampling(&grey).len(), 1);
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
        // A flipped bit in the image data fails its chunk CRC.
        let mut flipped = png.clone();
        let idat = flipped.windows(4).position(|w| w == b"IDAT").expect("IDAT");
        flipped[idat + 20] ^= 0x10;
        assert!(matches!(
            decode(&flipped, &ph, None, 1 << 30),
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
