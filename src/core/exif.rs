//! The two pieces of image metadata a resized image keeps: the EXIF
//! orientation and the ICC colour profile.
//!
//! Both change how the pixels are meant to be shown without changing the
//! pixels, so a resized image keeps them as they were: a backend that
//! honours them (EXIF transpose, colour management) shows the resized image
//! as it shows the original, and one that ignores them (vLLM's image loader:
//! Pillow's `Image.open` and `convert("RGB")`, no transpose, no colour
//! conversion) reads its pixels as it reads the original's. Token counts
//! agree either way: the Qwen rule is symmetric in width and height.

/// The `Exif\0\0` identifier in front of the TIFF structure of a JPEG APP1
/// segment.
pub const EXIF_ID: &[u8] = b"Exif\0\0";

const TAG_ORIENTATION: u16 = 0x0112;
const TYPE_SHORT: u16 = 3;

/// The orientation (1..=8, EXIF tag 0x0112 of IFD0) in an EXIF block that
/// starts at its TIFF header (an `Exif\0\0` prefix is skipped). `None` when
/// absent or malformed; every read is bounds-checked.
pub fn orientation(exif: &[u8]) -> Option<u16> {
    let tiff = exif.strip_prefix(EXIF_ID).unwrap_or(exif);
    let big = match tiff.get(..4)? {
        b"MM\0*" => true,
        b"II*\0" => false,
        _ => return None,
    };
    let u16_at = |at: usize| -> Option<u16> {
        let b: [u8; 2] = tiff.get(at..at.checked_add(2)?)?.try_into().ok()?;
        Some(if big {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    };
    let u32_at = |at: usize| -> Option<u32> {
        let b: [u8; 4] = tiff.get(at..at.checked_add(4)?)?.try_into().ok()?;
        Some(if big {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    };
    let ifd = usize::try_from(u32_at(4)?).ok()?;
    let count = usize::from(u16_at(ifd)?);
    (0..count).find_map(|i| {
        let entry = ifd.checked_add(2)?.checked_add(i.checked_mul(12)?)?;
        if u16_at(entry)? != TAG_ORIENTATION || u16_at(entry + 2)? != TYPE_SHORT || u32_at(entry + 4)? < 1 {
            return None;
        }
        // A single SHORT sits in the first two bytes of the value field.
        u16_at(entry + 8).filter(|o| (1..=8).contains(o))
    })
}

/// A TIFF structure (big-endian) with one IFD holding only the
/// orientation: what a resized image carries of the original's EXIF (the
/// rest — camera data, GPS, a thumbnail of the original size — is dropped).
pub fn orientation_tiff(orientation: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(26);
    v.extend_from_slice(b"MM\0*");
    v.extend_from_slice(&8u32.to_be_bytes());
    v.extend_from_slice(&1u16.to_be_bytes());
    v.extend_from_slice(&TAG_ORIENTATION.to_be_bytes());
    v.extend_from_slice(&TYPE_SHORT.to_be_bytes());
    v.extend_from_slice(&1u32.to_be_bytes());
    v.extend_from_slice(&orientation.to_be_bytes());
    v.extend_from_slice(&[0, 0]);
    // No next IFD.
    v.extend_from_slice(&0u32.to_be_bytes());
    v
}

/// The colour space an ICC profile describes (header bytes 16..20), e.g.
/// `b"RGB "`, `b"GRAY"`, `b"CMYK"`.
pub fn icc_colour_space(profile: &[u8]) -> Option<&[u8]> {
    if profile.len() < 128 {
        return None;
    }
    profile.get(16..20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_it_writes_and_both_byte_orders() {
        for o in 1..=8 {
            assert_eq!(orientation(&orientation_tiff(o)), Some(o));
            let mut app1 = EXIF_ID.to_vec();
            app1.extend_from_slice(&orientation_tiff(o));
            assert_eq!(orientation(&app1), Some(o));
        }
        // Little-endian, orientation as the second of two entries.
        let mut le = b"II*\0".to_vec();
        le.extend_from_slice(&8u32.to_le_bytes());
        le.extend_from_slice(&2u16.to_le_bytes());
        for (tag, value) in [(0x010Fu16, 0u16), (0x0112, 6)] {
            le.extend_from_slice(&tag.to_le_bytes());
            le.extend_from_slice(&3u16.to_le_bytes());
            le.extend_from_slice(&1u32.to_le_bytes());
            le.extend_from_slice(&value.to_le_bytes());
            le.extend_from_slice(&[0, 0]);
        }
        le.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(orientation(&le), Some(6));
    }

    #[test]
    fn malformed_blocks_read_as_absent() {
        let good = orientation_tiff(6);
        for cut in 0..good.len() - 4 {
            // Truncated before the value: absent, never a panic.
            let _ = orientation(&good[..cut]);
        }
        assert_eq!(orientation(&good[..12]), None);
        let mut bad = good.clone();
        bad[19] = 9; // out of range
        assert_eq!(orientation(&bad), None);
        let mut far = good.clone();
        far[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(orientation(&far), None);
        assert_eq!(orientation(b"XX*\0\0\0\0\x08"), None);
        assert_eq!(orientation(&[]), None);
    }

    #[test]
    fn icc_colour_space_needs_a_header() {
        let mut p = vec![0u8; 128];
        p[16..20].copy_from_slice(b"RGB ");
        assert_eq!(icc_colour_space(&p), Some(&b"RGB "[..]));
        assert_eq!(icc_colour_space(&p[..100]), None);
    }
}
