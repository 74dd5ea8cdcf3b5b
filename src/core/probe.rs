//! Image format sniffing and header-only size reading.
//!
//! The header is read through [`ByteSource`], so for a base64 payload only
//! the quanta holding the markers are decoded: a JPEG with hundreds of KB of
//! metadata before its frame header costs a handful of small reads.

use super::base64buf::Base64Payload;
use std::fmt;

/// Formats the filter can resize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Png,
    Jpeg,
}

impl ImageFormat {
    pub fn mime(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpeg",
        }
    }
}

/// What the header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
    /// JPEG: number of components (1 grey, 3 YCbCr, 4 CMYK/YCCK);
    /// PNG: the colour type byte of IHDR.
    pub color: u8,
    /// Bits per sample.
    pub bit_depth: u8,
}

/// Why the header could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeError {
    /// A recognised format the filter does not resize (gif, webp, svg, ...).
    Unsupported(&'static str),
    /// Not an image format the filter recognises.
    Unknown,
    /// The header is malformed or cut short.
    Corrupt(&'static str),
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unsupported(kind) => write!(
                f,
                "unsupported image type {kind} (only PNG and JPEG are supported)"
            ),
            Self::Unknown => f.write_str("data is not a PNG or JPEG image"),
            Self::Corrupt(why) => write!(f, "corrupt image header: {why}"),
        }
    }
}

/// Random-access bytes: a decoded buffer or a base64 payload read in place.
pub trait ByteSource {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes `[offset, offset+len)`, clipped to the source.
    fn read_at(&self, offset: usize, len: usize) -> Vec<u8>;
}

impl ByteSource for [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn read_at(&self, offset: usize, len: usize) -> Vec<u8> {
        let end = offset.saturating_add(len).min(<[u8]>::len(self));
        self.get(offset..end).map(<[u8]>::to_vec).unwrap_or_default()
    }
}

impl ByteSource for Base64Payload<'_> {
    fn len(&self) -> usize {
        self.decoded_len()
    }
    fn read_at(&self, offset: usize, len: usize) -> Vec<u8> {
        Base64Payload::read_at(self, offset, len)
    }
}

const PNG_SIG: &[u8] = b"\x89PNG\r\n\x1a\n";
/// Marker segments a JPEG may have before its frame header (bounded, so a
/// crafted file cannot make the probe loop for long).
const MAX_JPEG_SEGMENTS: usize = 4096;

/// Reads the format and size from the header only.
pub fn probe<S: ByteSource + ?Sized>(src: &S) -> Result<ImageHeader, ProbeError> {
    let head = src.read_at(0, 32);
    if head.starts_with(PNG_SIG) {
        return probe_png(src);
    }
    if head.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return probe_jpeg(src);
    }
    Err(sniff_other(&head))
}

fn sniff_other(head: &[u8]) -> ProbeError {
    let starts = |p: &[u8]| head.starts_with(p);
    if starts(b"GIF87a") || starts(b"GIF89a") {
        ProbeError::Unsupported("gif")
    } else if starts(b"RIFF") && head.get(8..12) == Some(b"WEBP") {
        ProbeError::Unsupported("webp")
    } else if starts(b"BM") {
        ProbeError::Unsupported("bmp")
    } else if starts(b"II*\0") || starts(b"MM\0*") {
        ProbeError::Unsupported("tiff")
    } else if head.get(4..12).is_some_and(|b| b.starts_with(b"ftyp")) {
        ProbeError::Unsupported("heif/avif")
    } else if head.trim_ascii_start().starts_with(b"<") {
        ProbeError::Unsupported("svg")
    } else {
        ProbeError::Unknown
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes([
        *b.get(at)?,
        *b.get(at + 1)?,
        *b.get(at + 2)?,
        *b.get(at + 3)?,
    ]))
}

fn probe_png<S: ByteSource + ?Sized>(src: &S) -> Result<ImageHeader, ProbeError> {
    let b = src.read_at(0, 33);
    if b.get(12..16) != Some(b"IHDR") || be32(&b, 8) != Some(13) {
        return Err(ProbeError::Corrupt("PNG does not start with IHDR"));
    }
    let (width, height) = match (be32(&b, 16), be32(&b, 20)) {
        (Some(w), Some(h)) if w > 0 && h > 0 => (w, h),
        (Some(_), Some(_)) => return Err(ProbeError::Corrupt("PNG has a zero dimension")),
        _ => return Err(ProbeError::Corrupt("PNG header is truncated")),
    };
    let bit_depth = *b.get(24).ok_or(ProbeError::Corrupt("PNG header is truncated"))?;
    let color = *b.get(25).ok_or(ProbeError::Corrupt("PNG header is truncated"))?;
    Ok(ImageHeader {
        format: ImageFormat::Png,
        width,
        height,
        color,
        bit_depth,
    })
}

fn is_sof(marker: u8) -> bool {
    matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC)
}

fn probe_jpeg<S: ByteSource + ?Sized>(src: &S) -> Result<ImageHeader, ProbeError> {
    let truncated = ProbeError::Corrupt("JPEG ends before its frame header");
    let mut pos = 2usize;
    for _ in 0..MAX_JPEG_SEGMENTS {
        let m = src.read_at(pos, 4);
        if m.len() < 2 {
            return Err(truncated);
        }
        if m[0] != 0xFF {
            return Err(ProbeError::Corrupt("JPEG marker expected"));
        }
        let marker = m[1];
        match marker {
            0xFF => {
                pos += 1; // fill byte
                continue;
            }
            0x01 | 0xD0..=0xD8 => {
                pos += 2;
                continue;
            }
            0xD9 | 0xDA => return Err(ProbeError::Corrupt("JPEG has no frame header before its scan")),
            _ => {}
        }
        let seg_len = usize::from(be16(&m, 2).ok_or(truncated.clone())?);
        if seg_len < 2 {
            return Err(ProbeError::Corrupt("JPEG segment length below 2"));
        }
        if is_sof(marker) {
            let f = src.read_at(pos + 4, 6);
            let (bit_depth, height, width, comps) = match (f.first(), be16(&f, 1), be16(&f, 3), f.get(5)) {
                (Some(&p), Some(h), Some(w), Some(&c)) => (p, h, w, c),
                _ => return Err(truncated),
            };
            if width == 0 || height == 0 {
                return Err(ProbeError::Corrupt("JPEG frame has a zero dimension"));
            }
            if !matches!(marker, 0xC0..=0xC2) {
                return Err(ProbeError::Unsupported("jpeg (lossless/arithmetic coding)"));
            }
            return Ok(ImageHeader {
                format: ImageFormat::Jpeg,
                width: u32::from(width),
                height: u32::from(height),
                color: comps,
                bit_depth,
            });
        }
        pos += 2 + seg_len;
        if pos >= src.len() {
            return Err(truncated);
        }
    }
    Err(ProbeError::Corrupt(
        "JPEG has too many segments before its frame header",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg_with_app_segments(n: usize, seg: usize) -> Vec<u8> {
        let mut v = vec![0xFF, 0xD8];
        for _ in 0..n {
            v.extend_from_slice(&[0xFF, 0xE1]);
            v.extend_from_slice(&((seg + 2) as u16).to_be_bytes());
            v.extend(std::iter::repeat_n(0xAB, seg));
        }
        v.extend_from_slice(&[0xFF, 0xFF, 0xC2, 0x00, 0x11, 0x08, 0x09, 0x60, 0x0F, 0x00, 0x03]);
        v.extend_from_slice(&[0u8; 9]);
        v
    }

    #[test]
    fn jpeg_frame_found_after_large_metadata() {
        // ~786 KB of APPn segments before SOF2, as in real camera files.
        let bytes = jpeg_with_app_segments(12, 65_000);
        let h = probe(bytes.as_slice()).expect("probe");
        assert_eq!(
            (h.format, h.width, h.height, h.color),
            (ImageFormat::Jpeg, 3840, 2400, 3)
        );
        // The same through a base64 payload read in place.
        let text = base64::Engine::encode(&super::super::base64buf::ENCODER, &bytes);
        let p = Base64Payload::new(text.as_bytes()).expect("b64");
        assert_eq!(probe(&p), Ok(h));
    }

    /// A base64 payload that counts what the probe decodes.
    struct Counting<'a> {
        inner: Base64Payload<'a>,
        reads: std::cell::Cell<usize>,
        bytes: std::cell::Cell<usize>,
    }

    impl ByteSource for Counting<'_> {
        fn len(&self) -> usize {
            self.inner.decoded_len()
        }
        fn read_at(&self, offset: usize, len: usize) -> Vec<u8> {
            let out = self.inner.read_at(offset, len);
            self.reads.set(self.reads.get() + 1);
            self.bytes.set(self.bytes.get() + out.len());
            out
        }
    }

    #[test]
    fn header_after_megabytes_of_metadata_costs_a_few_small_reads() {
        // Shaped like a real 3840x2400 progressive wallpaper: 114 APP1
        // (XMP) segments, APP13, APP14 and DQT, 7.3 MB before SOF2.
        let mut bytes = vec![0xFF, 0xD8];
        let mut segment = |marker: u8, len: usize| {
            bytes.extend_from_slice(&[0xFF, marker]);
            bytes.extend_from_slice(&((len + 2) as u16).to_be_bytes());
            bytes.extend((0..len).map(|i| (i % 251) as u8));
        };
        for _ in 0..114 {
            segment(0xE1, 64_000);
        }
        segment(0xED, 5_000);
        segment(0xEE, 12);
        segment(0xDB, 130);
        bytes.extend_from_slice(&[0xFF, 0xC2, 0x00, 0x11, 0x08, 0x09, 0x60, 0x0F, 0x00, 0x03]);
        bytes.extend_from_slice(&[1, 0x11, 0, 2, 0x11, 1, 3, 0x11, 1]);
        bytes.extend(std::iter::repeat_n(0x55, 1_000_000)); // scan data
        assert!(bytes.len() > 8_000_000);
        let text = base64::Engine::encode(&super::super::base64buf::ENCODER, &bytes);
        let src = Counting {
            inner: Base64Payload::new(text.as_bytes()).expect("b64"),
            reads: Default::default(),
            bytes: Default::default(),
        };
        let h = probe(&src).expect("probe");
        assert_eq!(
            (h.format, h.width, h.height, h.color, h.bit_depth),
            (ImageFormat::Jpeg, 3840, 2400, 3, 8)
        );
        // One 4-byte read per segment, plus the signature and the frame.
        assert!(src.reads.get() <= 122, "{} reads", src.reads.get());
        assert!(src.bytes.get() < 1_000, "{} bytes decoded", src.bytes.get());
    }

    #[test]
    fn truncated_and_foreign_inputs() {
        let bytes = jpeg_with_app_segments(2, 1000);
        assert_eq!(
            probe(&bytes[..1500]),
            Err(ProbeError::Corrupt("JPEG ends before its frame header"))
        );
        assert_eq!(probe(&b"GIF89a......"[..]), Err(ProbeError::Unsupported("gif")));
        assert_eq!(
            probe(&b"RIFF\0\0\0\0WEBPVP8 "[..]),
            Err(ProbeError::Unsupported("webp"))
        );
        assert_eq!(
            probe(&b"<svg xmlns='x'>"[..]),
            Err(ProbeError::Unsupported("svg"))
        );
        assert_eq!(probe(&b"hello world"[..]), Err(ProbeError::Unknown));
        assert_eq!(
            probe(PNG_SIG),
            Err(ProbeError::Corrupt("PNG does not start with IHDR"))
        );
    }

    #[test]
    fn png_header() {
        let mut b = PNG_SIG.to_vec();
        b.extend_from_slice(&13u32.to_be_bytes());
        b.extend_from_slice(b"IHDR");
        b.extend_from_slice(&100_000u32.to_be_bytes());
        b.extend_from_slice(&100_000u32.to_be_bytes());
        b.extend_from_slice(&[8, 6, 0, 0, 0]);
        let h = probe(b.as_slice()).expect("probe");
        assert_eq!(
            (h.width, h.height, h.color, h.bit_depth),
            (100_000, 100_000, 6, 8)
        );
    }
}
