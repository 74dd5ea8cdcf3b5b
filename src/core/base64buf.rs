//! Base64 payloads read in place: validation without decoding, random access
//! to decoded bytes (so an image header can be read without decoding the
//! whole image), and one-pass decoding into a caller's buffer.

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use std::borrow::Cow;

/// Standard alphabet, padding optional, trailing bits tolerated (as Python's
/// `base64.b64decode`, which vLLM uses, accepts them).
const ENGINE: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Encoder for the payloads the filter writes (standard, padded).
pub const ENCODER: GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Why a payload is not valid base64.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base64Error {
    /// A byte outside the base64 alphabet at this offset of the payload.
    InvalidByte(usize),
    /// The payload length cannot be a complete base64 encoding (truncated).
    InvalidLength(usize),
    /// Padding in the middle of the payload, or more than two `=`.
    InvalidPadding,
}

impl std::fmt::Display for Base64Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::InvalidByte(at) => write!(f, "invalid base64 byte at offset {at}"),
            Self::InvalidLength(n) => write!(f, "base64 length {n} is not a whole encoding (truncated?)"),
            Self::InvalidPadding => f.write_str("misplaced base64 padding"),
        }
    }
}

/// A validated base64 payload (no whitespace, standard alphabet).
#[derive(Debug, Clone)]
pub struct Base64Payload<'a> {
    text: Cow<'a, [u8]>,
    decoded_len: usize,
}

/// Whether `b` is in the standard alphabet (padding excluded). Branch-free,
/// so that [`all_b64`] vectorises.
fn is_b64(b: u8) -> bool {
    // `| 0x20` folds 'A'..='Z' onto 'a'..='z' and no other byte onto them.
    let letter = (b | 0x20).wrapping_sub(b'a') < 26;
    let digit = b.wrapping_sub(b'0') < 10;
    letter | digit | (b == b'+') | (b == b'/')
}

/// Whether every byte of `text` is in the alphabet: one pass over
/// fixed-size blocks, each reduced without branches (a 16 MB payload is
/// checked in a few ms, also in wasm).
fn all_b64(text: &[u8]) -> bool {
    text.chunks(64)
        .all(|block| block.iter().fold(true, |ok, &b| ok & is_b64(b)))
}

/// Length without the trailing `=` padding.
fn unpadded_len(text: &[u8]) -> usize {
    text.iter().rposition(|&b| b != b'=').map_or(0, |p| p + 1)
}

impl<'a> Base64Payload<'a> {
    /// Validates `text` without decoding it. ASCII whitespace (line-wrapped
    /// encoders) is tolerated by making a compact copy.
    pub fn new(text: &'a [u8]) -> Result<Self, Base64Error> {
        let valid = all_b64(&text[..unpadded_len(text)]);
        let text: Cow<'a, [u8]> = if !valid && text.iter().any(u8::is_ascii_whitespace) {
            Cow::Owned(
                text.iter()
                    .copied()
                    .filter(|b| !b.is_ascii_whitespace())
                    .collect(),
            )
        } else {
            Cow::Borrowed(text)
        };
        let body_len = unpadded_len(&text);
        let pad = text.len() - body_len;
        if !valid {
            if let Some(at) = text[..body_len].iter().position(|&b| !is_b64(b)) {
                return Err(if text[at] == b'=' {
                    Base64Error::InvalidPadding
                } else {
                    Base64Error::InvalidByte(at)
                });
            }
        }
        if pad > 2 || (pad > 0 && text.len() % 4 != 0) {
            return Err(Base64Error::InvalidPadding);
        }
        let decoded_len = match body_len % 4 {
            0 => body_len / 4 * 3,
            2 => body_len / 4 * 3 + 1,
            3 => body_len / 4 * 3 + 2,
            _ => return Err(Base64Error::InvalidLength(text.len())),
        };
        Ok(Self { text, decoded_len })
    }

    /// Length of the decoded bytes.
    pub fn decoded_len(&self) -> usize {
        self.decoded_len
    }

    /// Length of the base64 text.
    pub fn text_len(&self) -> usize {
        self.text.len()
    }

    /// Decoded bytes `[offset, offset + len)`, clipped to the payload,
    /// decoding only the base64 quanta that cover them.
    pub fn read_at(&self, offset: usize, len: usize) -> Vec<u8> {
        let end = offset.saturating_add(len).min(self.decoded_len);
        if offset >= end {
            return Vec::new();
        }
        let first = offset / 3;
        let last = end.div_ceil(3);
        let chars = &self.text[first * 4..(last * 4).min(self.text.len())];
        let mut out = vec![0u8; (last - first) * 3];
        // The payload was validated, so decoding cannot fail; an empty read
        // is the safe answer if it ever did.
        match ENGINE.decode_slice(chars, &mut out) {
            Ok(n) => out.truncate(n),
            Err(_) => return Vec::new(),
        }
        let skip = offset - first * 3;
        let take = end - offset;
        out.drain(..skip.min(out.len()));
        out.truncate(take);
        out
    }

    /// Decodes the whole payload.
    pub fn decode(&self) -> Result<Vec<u8>, Base64Error> {
        let mut out = vec![0u8; self.decoded_len];
        let n = ENGINE
            .decode_slice(&self.text, &mut out)
            .map_err(|_| Base64Error::InvalidLength(self.text.len()))?;
        out.truncate(n);
        Ok(out)
    }
}

/// Appends the base64 encoding of `bytes` to `out` (standard, padded),
/// writing straight into `out`'s spare capacity.
pub fn encode_into(bytes: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    let n = base64::encoded_len(bytes.len(), true).unwrap_or(0);
    out.resize(start + n, 0);
    let written = ENCODER.encode_slice(bytes, &mut out[start..]).unwrap_or(0);
    out.truncate(start + written);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_access_matches_full_decode() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        for cut in [1000, 999, 998] {
            let text = ENCODER.encode(&data[..cut]);
            for unpadded in [false, true] {
                let t = if unpadded {
                    text.trim_end_matches('=').to_string()
                } else {
                    text.clone()
                };
                let p = Base64Payload::new(t.as_bytes()).expect("valid");
                assert_eq!(p.decoded_len(), cut);
                assert_eq!(p.decode().expect("decodes"), &data[..cut]);
                for (off, len) in [
                    (0, 1),
                    (1, 5),
                    (2, 3),
                    (3, 30),
                    (500, 499),
                    (cut - 1, 10),
                    (cut, 4),
                ] {
                    let want = &data[off.min(cut)..(off + len).min(cut)];
                    assert_eq!(p.read_at(off, len), want, "off {off} len {len}");
                }
            }
        }
    }

    #[test]
    fn rejects_bad_payloads() {
        assert_eq!(
            Base64Payload::new(b"ab$d").err(),
            Some(Base64Error::InvalidByte(2))
        );
        assert_eq!(
            Base64Payload::new(b"abcde").err(),
            Some(Base64Error::InvalidLength(5))
        );
        assert_eq!(
            Base64Payload::new(b"ab=d").err(),
            Some(Base64Error::InvalidPadding)
        );
        assert_eq!(
            Base64Payload::new(b"a===").err(),
            Some(Base64Error::InvalidPadding)
        );
        assert!(Base64Payload::new(b"QUJD\nREVG").is_ok());
    }

    #[test]
    fn alphabet_check_agrees_with_the_definition() {
        for b in 0..=255u8 {
            let want = b.is_ascii_alphanumeric() || b == b'+' || b == b'/';
            assert_eq!(is_b64(b), want, "byte {b}");
            // Wherever the bad byte sits in a long payload, it is found.
            let mut text = vec![b'A'; 200];
            text[137] = b;
            assert_eq!(all_b64(&text), want, "byte {b}");
        }
        let mut long = ENCODER.encode(vec![7u8; 3000]).into_bytes();
        long[2999] = b'-';
        assert_eq!(
            Base64Payload::new(&long).err(),
            Some(Base64Error::InvalidByte(2999))
        );
        // Whitespace anywhere, trailing too, is dropped.
        let p = Base64Payload::new(b" QU\r\nJD REVG\n").expect("valid");
        assert_eq!(p.decode().expect("decodes"), b"ABCDEF");
        assert_eq!(
            Base64Payload::new(b"QUJD\nRE=G").err(),
            Some(Base64Error::InvalidPadding)
        );
    }

    #[test]
    fn encode_into_appends() {
        let mut out = b"x".to_vec();
        encode_into(b"hello", &mut out);
        assert_eq!(out, b"xaGVsbG8=");
    }
}
