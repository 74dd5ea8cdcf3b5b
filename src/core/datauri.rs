//! `data:` URLs of images.

/// A `data:<mime>[;params];base64,<payload>` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataUri<'a> {
    /// The declared media type, lower-cased.
    pub mime: String,
    /// The base64 text.
    pub payload: &'a str,
}

/// What an image URL is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageUrl<'a> {
    /// http(s) or any non-data URL: left alone, never fetched.
    Remote,
    Data(DataUri<'a>),
}

/// Why a `data:` URL is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataUriError {
    /// No comma, or not base64-encoded.
    Malformed(&'static str),
    /// Declared type is not an image type the filter handles.
    UnsupportedType(String),
}

impl std::fmt::Display for DataUriError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Malformed(why) => write!(f, "malformed data URL: {why}"),
            Self::UnsupportedType(t) => {
                write!(
                    f,
                    "unsupported image type `{t}` (only image/png and image/jpeg are supported)"
                )
            }
        }
    }
}

/// Classifies an image URL.
pub fn parse(url: &str) -> Result<ImageUrl<'_>, DataUriError> {
    let Some(prefix) = url.get(..5) else {
        return Ok(ImageUrl::Remote);
    };
    if !prefix.eq_ignore_ascii_case("data:") {
        return Ok(ImageUrl::Remote);
    }
    let rest = &url[5..];
    let (meta, payload) = rest.split_once(',').ok_or(DataUriError::Malformed("no comma"))?;
    let mut parts = meta.split(';');
    let mime = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
    if !parts.any(|p| p.trim().eq_ignore_ascii_case("base64")) {
        return Err(DataUriError::Malformed("not base64-encoded"));
    }
    match mime.as_str() {
        "image/png" | "image/jpeg" | "image/jpg" | "image/pjpeg" => {
            Ok(ImageUrl::Data(DataUri { mime, payload }))
        }
        _ => Err(DataUriError::UnsupportedType(mime)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() {
        assert_eq!(parse("https://x/y.png"), Ok(ImageUrl::Remote));
        assert_eq!(parse("http://x"), Ok(ImageUrl::Remote));
        assert_eq!(parse("dat"), Ok(ImageUrl::Remote));
        for (u, mime) in [
            ("data:image/png;base64,AAAA", "image/png"),
            ("DATA:Image/JPEG;base64,AAAA", "image/jpeg"),
            ("data:image/jpg;name=a.jpg;base64,AAAA", "image/jpg"),
        ] {
            assert_eq!(
                parse(u),
                Ok(ImageUrl::Data(DataUri {
                    mime: mime.into(),
                    payload: "AAAA"
                }))
            );
        }
        assert_eq!(
            parse("data:image/webp;base64,AAAA"),
            Err(DataUriError::UnsupportedType("image/webp".into()))
        );
        assert_eq!(
            parse("data:image/svg+xml;base64,AA"),
            Err(DataUriError::UnsupportedType("image/svg+xml".into()))
        );
        assert_eq!(
            parse("data:image/png,rawbytes"),
            Err(DataUriError::Malformed("not base64-encoded"))
        );
        assert_eq!(
            parse("data:image/png;base64"),
            Err(DataUriError::Malformed("no comma"))
        );
    }
}
