//! `vlm-transcode`: the vlm-budget filter's image shrink as a native HTTP
//! service, for `transcode: "offload"`.
//!
//! The filter sends one image per call (`POST /v1/transcode`, the image's
//! bytes, the target in headers: see `vlm_budget::core::offload`); the
//! service runs the filter's own `transcode` on a thread pool and answers
//! with the resized image's bytes, or an OpenAI-style JSON error. The
//! Envoy worker that sent it serves other streams meanwhile.

pub mod server;

use vlm_budget::core::offload::Target;
use vlm_budget::core::probe::{probe, ImageFormat, ProbeError};
use vlm_budget::core::transcode::{transcode, TranscodeError, TranscodeOptions};

/// What the service accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request body (the image's bytes).
    pub max_body_bytes: u64,
    /// Images whose header claims more pixels are refused before decoding.
    pub max_pixels: u64,
    /// Transcodes running at once (the thread pool's size).
    pub threads: usize,
    /// Requests waiting for a thread beyond which new ones get 503.
    pub max_queue: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 * 1024 * 1024,
            max_pixels: 40_000_000,
            threads: std::thread::available_parallelism().map_or(2, usize::from),
            max_queue: 256,
        }
    }
}

/// A refused request: status, code and message, sent as
/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(400, code, message)
    }

    /// The OpenAI error type for the status.
    pub fn kind(&self) -> &'static str {
        match self.status {
            404 => "not_found_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        let v = serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": null,
                "code": self.code,
            }
        });
        serde_json::to_vec(&v).unwrap_or_else(|_| b"{\"error\":{}}".to_vec())
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

/// A checked request: the image's format and the target, ready for the
/// thread pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    pub format: ImageFormat,
    pub target: Target,
    header: vlm_budget::core::probe::ImageHeader,
}

/// Checks a request before any decoding: the target headers, the image's
/// format and size from its header alone, the pixel limit, and that the
/// target is no larger than the image on either side.
pub fn check<'a>(
    get: impl Fn(&str) -> Option<&'a str>,
    body: &[u8],
    limits: &Limits,
) -> Result<Checked, ApiError> {
    let target = Target::from_headers(get).map_err(|e| ApiError::bad("invalid_request", e.to_string()))?;
    if body.is_empty() {
        return Err(ApiError::bad(
            "invalid_request",
            "the body must be a PNG or JPEG image",
        ));
    }
    let header = probe(body).map_err(|e| match e {
        ProbeError::Unsupported(_) | ProbeError::Unknown => {
            ApiError::bad("unsupported_image_type", e.to_string())
        }
        ProbeError::Corrupt(_) => ApiError::bad("corrupt_image", e.to_string()),
    })?;
    let pixels = u64::from(header.width) * u64::from(header.height);
    if pixels > limits.max_pixels {
        return Err(ApiError::bad(
            "image_too_large",
            format!(
                "{}x{} is {pixels} pixels, above the {}-pixel limit",
                header.width, header.height, limits.max_pixels
            ),
        ));
    }
    let to = target.to;
    if to.width > header.width || to.height > header.height {
        return Err(ApiError::bad(
            "invalid_request",
            format!(
                "target {}x{} is larger than the {}x{} image",
                to.width, to.height, header.width, header.height
            ),
        ));
    }
    Ok(Checked {
        format: header.format,
        target,
        header,
    })
}

/// Decodes, resizes and re-encodes a checked image: the filter's own
/// transcode with the filter's settings, so the bytes are the ones the
/// filter would splice.
pub fn run(checked: &Checked, body: &[u8], limits: &Limits) -> Result<Vec<u8>, ApiError> {
    let opts = TranscodeOptions {
        jpeg_quality: checked.target.jpeg_quality,
        filter: checked.target.filter,
        max_pixels: limits.max_pixels,
    };
    transcode(body, &checked.header, checked.target.to, &opts).map_err(|e| match e {
        TranscodeError::Decode(_) => ApiError::bad("corrupt_image", e.to_string()),
        _ => ApiError::new(500, "image_processing_failed", e.to_string()),
    })
}

/// One request, start to end, without the network: check, then transcode.
pub fn handle<'a>(
    get: impl Fn(&str) -> Option<&'a str>,
    body: &[u8],
    limits: &Limits,
) -> Result<(ImageFormat, Vec<u8>), ApiError> {
    let checked = check(get, body, limits)?;
    Ok((checked.format, run(&checked, body, limits)?))
}

#[cfg(test)]
mod tests;
