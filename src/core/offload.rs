//! The offload wire format (`transcode: "offload"`): one call per image.
//!
//! Request: `POST /v1/transcode`, the body the image's bytes as the client
//! sent them (PNG or JPEG), the target in headers:
//! `x-vlm-target-width`, `x-vlm-target-height` (the size the filter computed
//! with the backend's rule), `x-vlm-jpeg-quality` and `x-vlm-resize-filter`
//! (the filter's own settings, so the service encodes as the filter would).
//!
//! Answer: `200` with the resized image's bytes, in the input's format and
//! exactly the target size. Anything else (another status, a body that is
//! not that image) is not used: the filter does the work itself.
//!
//! Both sides run [`crate::core::transcode::transcode`]; the filter splices
//! an offloaded result exactly as it splices its own.

use super::probe::{probe, ImageFormat};
use super::sizing::Dims;
use super::transcode::ResizeFilter;
use serde::Deserialize;
use std::fmt;

/// Where images are shrunk (`transcode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TranscodeMode {
    /// On the Envoy worker, in the filter.
    #[default]
    InFilter,
    /// By the `vlm-transcode` service behind `transcode_cluster`; in the
    /// filter when it fails.
    Offload,
}

/// Path of the service's transcode endpoint.
pub const PATH: &str = "/v1/transcode";
pub const TARGET_WIDTH: &str = "x-vlm-target-width";
pub const TARGET_HEIGHT: &str = "x-vlm-target-height";
pub const JPEG_QUALITY: &str = "x-vlm-jpeg-quality";
pub const RESIZE_FILTER: &str = "x-vlm-resize-filter";

/// What one offloaded image is to become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub to: Dims,
    pub jpeg_quality: u8,
    pub filter: ResizeFilter,
}

/// A target the service cannot accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetError {
    Missing(&'static str),
    Invalid(&'static str, String),
}

impl fmt::Display for TargetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing(h) => write!(f, "header `{h}` is required"),
            Self::Invalid(h, why) => write!(f, "header `{h}`: {why}"),
        }
    }
}

impl std::error::Error for TargetError {}

fn filter_name(f: ResizeFilter) -> &'static str {
    match f {
        ResizeFilter::CatmullRom => "catmull_rom",
        ResizeFilter::Lanczos3 => "lanczos3",
    }
}

impl Target {
    /// The request headers that carry the target.
    pub fn headers(&self) -> [(&'static str, String); 4] {
        [
            (TARGET_WIDTH, self.to.width.to_string()),
            (TARGET_HEIGHT, self.to.height.to_string()),
            (JPEG_QUALITY, self.jpeg_quality.to_string()),
            (RESIZE_FILTER, filter_name(self.filter).to_string()),
        ]
    }

    /// Reads a target from request headers (`get` returns a header's value).
    pub fn from_headers<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Result<Self, TargetError> {
        let side = |name: &'static str| -> Result<u32, TargetError> {
            let v = get(name).ok_or(TargetError::Missing(name))?;
            match v.trim().parse::<u32>() {
                Ok(n) if (1..=1 << 16).contains(&n) => Ok(n),
                _ => Err(TargetError::Invalid(
                    name,
                    format!("`{v}` is not a side of 1..=65536 pixels"),
                )),
            }
        };
        let to = Dims::new(side(TARGET_WIDTH)?, side(TARGET_HEIGHT)?);
        let jpeg_quality = match get(JPEG_QUALITY).map(str::trim) {
            None => 90,
            Some(v) => match v.parse::<u8>() {
                Ok(q) if (1..=100).contains(&q) => q,
                _ => {
                    return Err(TargetError::Invalid(
                        JPEG_QUALITY,
                        format!("`{v}` is not 1..=100"),
                    ))
                }
            },
        };
        let filter = match get(RESIZE_FILTER).map(str::trim) {
            None | Some("catmull_rom") => ResizeFilter::CatmullRom,
            Some("lanczos3") => ResizeFilter::Lanczos3,
            Some(v) => {
                return Err(TargetError::Invalid(
                    RESIZE_FILTER,
                    format!("`{v}` is not catmull_rom or lanczos3"),
                ))
            }
        };
        Ok(Self {
            to,
            jpeg_quality,
            filter,
        })
    }
}

/// Why an offload answer is not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnswerError {
    /// The call got no answer (reset, refused, dispatch failed).
    NoAnswer,
    /// An answer other than 200 (Envoy's 503 for a cluster down, 504 for a
    /// timeout, the service's own 4xx/5xx).
    Status(u32),
    /// An answer body larger than the limit.
    TooLarge { len: usize, limit: usize },
    /// The body is not an image the filter reads.
    NotAnImage(String),
    /// An image in another format than the one sent.
    WrongFormat { want: ImageFormat, got: ImageFormat },
    /// An image of another size than the target.
    WrongSize { want: Dims, got: Dims },
}

impl fmt::Display for AnswerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoAnswer => f.write_str("no answer"),
            Self::Status(s) => write!(f, "HTTP {s}"),
            Self::TooLarge { len, limit } => write!(f, "answer of {len} bytes, above {limit}"),
            Self::NotAnImage(e) => write!(f, "answer is not an image: {e}"),
            Self::WrongFormat { want, got } => {
                write!(f, "answer is {}, not {}", got.name(), want.name())
            }
            Self::WrongSize { want, got } => write!(
                f,
                "answer is {}x{}, not {}x{}",
                got.width, got.height, want.width, want.height
            ),
        }
    }
}

impl std::error::Error for AnswerError {}

/// Checks an offload answer against what was asked (`format`, `to`) and
/// hands back its bytes. Only the image's header is read; a body corrupt
/// past its header reaches the backend as an in-filter encode bug would,
/// so the service is trusted that far (it runs the filter's own code).
pub fn check_answer(
    status: Option<u32>,
    body: Option<Vec<u8>>,
    format: ImageFormat,
    to: Dims,
    limit: usize,
) -> Result<Vec<u8>, AnswerError> {
    match status {
        None => return Err(AnswerError::NoAnswer),
        Some(200) => {}
        Some(s) => return Err(AnswerError::Status(s)),
    }
    let body = body.unwrap_or_default();
    if body.len() > limit {
        return Err(AnswerError::TooLarge {
            len: body.len(),
            limit,
        });
    }
    let header = probe(body.as_slice()).map_err(|e| AnswerError::NotAnImage(e.to_string()))?;
    if header.format != format {
        return Err(AnswerError::WrongFormat {
            want: format,
            got: header.format,
        });
    }
    let got = Dims::new(header.width, header.height);
    if got != to {
        return Err(AnswerError::WrongSize { want: to, got });
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::super::transcode::{encode, Layout, Pixels};
    use super::*;
    use std::collections::HashMap;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let px = Pixels {
            width: w,
            height: h,
            layout: Layout::Rgb8,
            data: vec![7; (w * h * 3) as usize],
        };
        encode(&px, ImageFormat::Png, 90).unwrap_or_default()
    }

    #[test]
    fn target_round_trips_through_headers() {
        let t = Target {
            to: Dims::new(1288, 812),
            jpeg_quality: 85,
            filter: ResizeFilter::Lanczos3,
        };
        let map: HashMap<&str, String> = t.headers().into_iter().collect();
        let back = Target::from_headers(|k| map.get(k).map(String::as_str));
        assert_eq!(back, Ok(t));
        // Quality and filter default to the filter's defaults.
        let only: HashMap<&str, &str> = [(TARGET_WIDTH, "28"), (TARGET_HEIGHT, " 56 ")].into();
        let d = Target::from_headers(|k| only.get(k).copied());
        assert_eq!(
            d,
            Ok(Target {
                to: Dims::new(28, 56),
                jpeg_quality: 90,
                filter: ResizeFilter::CatmullRom
            })
        );
    }

    #[test]
    fn bad_targets_name_the_header() {
        let cases: [(&[(&str, &str)], &str); 7] = [
            (&[(TARGET_HEIGHT, "10")], TARGET_WIDTH),
            (&[(TARGET_WIDTH, "10")], TARGET_HEIGHT),
            (&[(TARGET_WIDTH, "0"), (TARGET_HEIGHT, "10")], TARGET_WIDTH),
            (&[(TARGET_WIDTH, "-3"), (TARGET_HEIGHT, "10")], TARGET_WIDTH),
            (&[(TARGET_WIDTH, "10"), (TARGET_HEIGHT, "99999")], TARGET_HEIGHT),
            (
                &[(TARGET_WIDTH, "10"), (TARGET_HEIGHT, "10"), (JPEG_QUALITY, "0")],
                JPEG_QUALITY,
            ),
            (
                &[
                    (TARGET_WIDTH, "10"),
                    (TARGET_HEIGHT, "10"),
                    (RESIZE_FILTER, "nearest"),
                ],
                RESIZE_FILTER,
            ),
        ];
        for (headers, name) in cases {
            let map: HashMap<&str, &str> = headers.iter().copied().collect();
            let e = Target::from_headers(|k| map.get(k).copied()).expect_err(name);
            assert!(e.to_string().contains(name), "{e}");
        }
    }

    #[test]
    fn answers_are_checked_against_the_request() {
        let to = Dims::new(56, 28);
        let good = png(56, 28);
        let check = |status, body: Option<Vec<u8>>| check_answer(status, body, ImageFormat::Png, to, 1 << 20);
        assert_eq!(check(Some(200), Some(good.clone())), Ok(good.clone()));
        assert_eq!(check(None, Some(good.clone())), Err(AnswerError::NoAnswer));
        assert_eq!(
            check(Some(503), Some(good.clone())),
            Err(AnswerError::Status(503))
        );
        assert_eq!(check(Some(204), None), Err(AnswerError::Status(204)));
        assert!(matches!(check(Some(200), None), Err(AnswerError::NotAnImage(_))));
        assert!(matches!(
            check(Some(200), Some(b"{\"error\":1}".to_vec())),
            Err(AnswerError::NotAnImage(_))
        ));
        assert_eq!(
            check(Some(200), Some(png(28, 56))),
            Err(AnswerError::WrongSize {
                want: to,
                got: Dims::new(28, 56)
            })
        );
        let jpeg = encode(
            &Pixels {
                width: 56,
                height: 28,
                layout: Layout::Rgb8,
                data: vec![9; 56 * 28 * 3],
            },
            ImageFormat::Jpeg,
            90,
        )
        .unwrap_or_default();
        assert_eq!(
            check(Some(200), Some(jpeg)),
            Err(AnswerError::WrongFormat {
                want: ImageFormat::Png,
                got: ImageFormat::Jpeg
            })
        );
        assert_eq!(
            check_answer(Some(200), Some(good.clone()), ImageFormat::Png, to, 10),
            Err(AnswerError::TooLarge {
                len: good.len(),
                limit: 10
            })
        );
    }
}
