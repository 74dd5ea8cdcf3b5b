//! OpenAI-style error replies.

use serde_json::json;
use std::fmt;

/// A request the server refuses, with its HTTP status and error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    /// Machine-readable code (`invalid_base64`, `corrupt_image`, ...).
    pub code: &'static str,
    pub message: String,
    /// The request field at fault, if any.
    pub param: Option<&'static str>,
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            code,
            message: message.into(),
            param: None,
        }
    }

    /// A problem with image `index` (document order, from 0).
    pub fn image(index: usize, code: &'static str, detail: impl fmt::Display) -> Self {
        Self {
            status: 400,
            code,
            message: format!("image {index}: {detail}"),
            param: Some("messages"),
        }
    }

    pub fn with_status(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            param: None,
        }
    }

    /// The OpenAI error type for the status.
    pub fn kind(&self) -> &'static str {
        match self.status {
            404 => "not_found_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// `{"error": {"message", "type", "param", "code"}}`.
    pub fn to_json(&self) -> Vec<u8> {
        let v = json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                "code": self.code,
            }
        });
        serde_json::to_vec(&v).unwrap_or_else(|_| b"{\"error\":{}}".to_vec())
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape() {
        let e = ApiError::image(2, "invalid_base64", "bad byte");
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).expect("json");
        assert_eq!(v["error"]["message"], "image 2: bad byte");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "invalid_base64");
        assert_eq!(v["error"]["param"], "messages");
        let e = ApiError::with_status(503, "injected_fault", "x");
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).expect("json");
        assert_eq!(v["error"]["type"], "server_error");
        assert!(v["error"]["param"].is_null());
    }
}
