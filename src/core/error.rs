//! Errors a request can end in, and their OpenAI-style JSON body.

use std::fmt;

/// Why a request is refused (or, with `fail_open`, forwarded unchanged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterError {
    BodyTooLarge {
        limit: u64,
    },
    InvalidJson(String),
    InvalidRequest(String),
    /// The body is compressed (`content-encoding` other than `identity`):
    /// the filter cannot read it. The value is the header's.
    UnsupportedEncoding(String),
    TooManyImages {
        count: usize,
        limit: u64,
    },
    /// The encode cluster failed after the retries (`encode_failure: fail`).
    EncoderUnavailable(String),
    /// The prefill cluster failed after the retries (`prefill_failure: fail`).
    PrefillUnavailable(String),
    /// A problem with the image at `index` (document order, from 0).
    Image {
        index: usize,
        kind: ImageErrorKind,
        detail: String,
    },
}

/// The kinds of image problems, each with its error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageErrorKind {
    InvalidDataUri,
    InvalidBase64,
    UnsupportedType,
    Corrupt,
    TooManyPixels,
    ProcessingFailed,
}

impl ImageErrorKind {
    pub fn code(self) -> &'static str {
        match self {
            Self::InvalidDataUri => "invalid_image_url",
            Self::InvalidBase64 => "invalid_base64",
            Self::UnsupportedType => "unsupported_image_type",
            Self::Corrupt => "corrupt_image",
            Self::TooManyPixels => "image_too_large",
            Self::ProcessingFailed => "image_processing_failed",
        }
    }
}

impl FilterError {
    /// Stable, machine-readable code (also the metric suffix).
    pub fn code(&self) -> &'static str {
        match self {
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::InvalidJson(_) => "invalid_json",
            Self::InvalidRequest(_) => "invalid_request",
            Self::UnsupportedEncoding(_) => "unsupported_content_encoding",
            Self::TooManyImages { .. } => "too_many_images",
            Self::EncoderUnavailable(_) => "encoder_unavailable",
            Self::PrefillUnavailable(_) => "prefill_unavailable",
            Self::Image { kind, .. } => kind.code(),
        }
    }

    /// Every code, for defining metrics up front.
    pub const CODES: [&'static str; 13] = [
        "encoder_unavailable",
        "prefill_unavailable",
        "body_too_large",
        "invalid_json",
        "invalid_request",
        "unsupported_content_encoding",
        "too_many_images",
        "invalid_image_url",
        "invalid_base64",
        "unsupported_image_type",
        "corrupt_image",
        "image_too_large",
        "image_processing_failed",
    ];

    /// HTTP status of the local reply.
    pub fn status(&self) -> u32 {
        match self {
            Self::Image {
                kind: ImageErrorKind::ProcessingFailed,
                ..
            } => 500,
            Self::EncoderUnavailable(_) | Self::PrefillUnavailable(_) => 502,
            Self::UnsupportedEncoding(_) => 415,
            _ => 400,
        }
    }

    /// `{"error": {"message", "type", "param", "code"}}`, as OpenAI and vLLM answer.
    pub fn to_json(&self) -> Vec<u8> {
        let kind = if self.status() >= 500 {
            "server_error"
        } else {
            "invalid_request_error"
        };
        let param = match self {
            Self::Image { .. } | Self::TooManyImages { .. } => serde_json::Value::from("messages"),
            _ => serde_json::Value::Null,
        };
        let v = serde_json::json!({
            "error": {"message": self.to_string(), "type": kind, "param": param, "code": self.code()}
        });
        serde_json::to_vec(&v).unwrap_or_else(|_| b"{\"error\":{}}".to_vec())
    }
}

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BodyTooLarge { limit } => write!(f, "request body is larger than the {limit}-byte limit"),
            Self::InvalidJson(e) => write!(f, "request body is not valid JSON: {e}"),
            Self::InvalidRequest(e) => write!(f, "invalid chat request: {e}"),
            Self::UnsupportedEncoding(e) => write!(
                f,
                "request body has content-encoding `{e}`, which this proxy cannot read: send it \
                 uncompressed (or decompress it in front of the filter)"
            ),
            Self::TooManyImages { count, limit } => {
                write!(f, "request has {count} images; at most {limit} are accepted")
            }
            Self::Image { index, detail, .. } => write!(f, "image {index}: {detail}"),
            Self::EncoderUnavailable(e) => write!(f, "the vision encoder is unavailable: {e}"),
            Self::PrefillUnavailable(e) => write!(f, "the prefill instance is unavailable: {e}"),
        }
    }
}

impl std::error::Error for FilterError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_names_problem_and_index() {
        let e = FilterError::Image {
            index: 3,
            kind: ImageErrorKind::InvalidBase64,
            detail: "bad byte".into(),
        };
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).expect("json");
        assert_eq!(v["error"]["message"], "image 3: bad byte");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "invalid_base64");
        assert!(FilterError::CODES.contains(&e.code()));
        let e = FilterError::UnsupportedEncoding("gzip".into());
        assert_eq!((e.status(), e.code()), (415, "unsupported_content_encoding"));
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).expect("json");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(FilterError::CODES.contains(&e.code()));
        let e = FilterError::PrefillUnavailable("HTTP 503".into());
        assert_eq!((e.status(), e.code()), (502, "prefill_unavailable"));
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).expect("json");
        assert_eq!(v["error"]["type"], "server_error");
        assert!(FilterError::CODES.contains(&e.code()));
    }
}
