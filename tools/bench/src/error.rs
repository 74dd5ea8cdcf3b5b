//! Typed errors of every subcommand.

use std::fmt;
use std::path::PathBuf;

/// Anything that stops a subcommand.
#[derive(Debug)]
pub enum BenchError {
    /// Bad flags or flag values.
    Usage(String),
    /// A file could not be read or written.
    Io { path: PathBuf, source: std::io::Error },
    /// A trace line that is not a valid request.
    Trace {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// JSON that does not have the expected shape.
    Json { what: String, message: String },
    /// An image that cannot be used.
    Image { path: PathBuf, message: String },
    /// An HTTP exchange failed.
    Http(String),
    /// A process could not be started or did not become ready.
    Process(String),
    /// A fit or statistic that cannot be computed from the data.
    Numeric(String),
    /// Drawing a plot failed.
    Plot(String),
}

impl BenchError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub fn json(what: impl Into<String>, e: impl fmt::Display) -> Self {
        Self::Json {
            what: what.into(),
            message: e.to_string(),
        }
    }
}

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Usage(m) => f.write_str(m),
            Self::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Self::Trace { path, line, message } => write!(f, "{}:{line}: {message}", path.display()),
            Self::Json { what, message } => write!(f, "{what}: {message}"),
            Self::Image { path, message } => write!(f, "image {}: {message}", path.display()),
            Self::Http(m) => write!(f, "http: {m}"),
            Self::Process(m) => f.write_str(m),
            Self::Numeric(m) => f.write_str(m),
            Self::Plot(m) => write!(f, "plot: {m}"),
        }
    }
}

impl std::error::Error for BenchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, BenchError>;
