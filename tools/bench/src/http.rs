//! A minimal HTTP/1.1 client over hyper: one connection per request (the
//! load generator is open-loop, so requests never share a connection).
//! Plain `http://` only: the tool talks to local Envoy and backends.

use crate::error::{BenchError, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use std::fmt;
use std::time::Duration;

/// `http://host:port/base`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    /// Base path without a trailing slash ("" for the root).
    pub base: String,
}

impl Url {
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| BenchError::Usage(format!("bad URL `{s}`: {why}"));
        let rest = s
            .strip_prefix("http://")
            .ok_or_else(|| bad("only http:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(bad("no host"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                (h, p.parse::<u16>().map_err(|_| bad("bad port"))?)
            }
            _ => (authority, 80),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(Self {
            host: host.to_string(),
            port,
            base: path.trim_end_matches('/').to_string(),
        })
    }

    /// The request path for `p` (which starts with '/') under the base.
    pub fn path(&self, p: &str) -> String {
        format!("{}{p}", self.base)
    }

    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.authority(), self.base)
    }
}

fn http_err(what: &str, e: impl fmt::Display) -> BenchError {
    BenchError::Http(format!("{what}: {e}"))
}

/// Sends one request on a new connection; returns the response with its body unread.
pub async fn send(
    url: &Url,
    method: Method,
    path: &str,
    body: Bytes,
    headers: &[(&str, String)],
) -> Result<Response<Incoming>> {
    let stream = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| http_err(&format!("connect {url}"), e))?;
    // Best effort: small requests go out at once.
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| http_err("handshake", e))?;
    tokio::spawn(async move {
        // The connection ends when the response is read or dropped.
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(method)
        .uri(url.path(path))
        .body(Full::new(body))
        .map_err(|e| http_err("request", e))?;
    let h = req.headers_mut();
    let host = HeaderValue::from_str(&url.authority()).map_err(|e| http_err("host header", e))?;
    h.insert(HOST, host);
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for (k, v) in headers {
        let name = hyper::header::HeaderName::from_bytes(k.as_bytes()).map_err(|e| http_err("header", e))?;
        h.insert(name, HeaderValue::from_str(v).map_err(|e| http_err("header", e))?);
    }
    sender
        .send_request(req)
        .await
        .map_err(|e| http_err(&format!("{url}{path}"), e))
}

/// A whole response: status, headers and body.
#[derive(Debug, Clone)]
pub struct Whole {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Sends a request and reads the whole response within `timeout`.
pub async fn exchange(
    url: &Url,
    method: Method,
    path: &str,
    body: Bytes,
    headers: &[(&str, String)],
    timeout: Duration,
) -> Result<Whole> {
    let fut = async {
        let resp = send(url, method, path, body, headers).await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| http_err("body", e))?
            .to_bytes();
        Ok(Whole {
            status,
            headers,
            body,
        })
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| BenchError::Http(format!("{url}{path}: no answer within {timeout:?}")))?
}

/// Headers whose names start with one of `prefixes`, lower-cased, in name order.
pub fn headers_with_prefix(h: &HeaderMap, prefixes: &[&str]) -> std::collections::BTreeMap<String, String> {
    h.iter()
        .filter(|(k, _)| prefixes.iter().any(|p| k.as_str().starts_with(p)))
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

/// Polls `GET path` until it answers 2xx or `timeout` passes.
pub async fn wait_ok(url: &Url, path: &str, timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::from("no attempt");
    while tokio::time::Instant::now() < deadline {
        match exchange(url, Method::GET, path, Bytes::new(), &[], Duration::from_secs(2)).await {
            Ok(w) if (200..300).contains(&w.status) => return Ok(()),
            Ok(w) => last = format!("status {}", w.status),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(BenchError::Process(format!(
        "{url}{path} not ready after {timeout:?}: {last}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let u = Url::parse("http://127.0.0.1:8100").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.base.as_str()),
            ("127.0.0.1", 8100, "")
        );
        assert_eq!(u.path("/v1/chat/completions"), "/v1/chat/completions");
        let u = Url::parse("http://gpu-node/vllm/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.base.as_str()),
            ("gpu-node", 80, "/vllm")
        );
        assert_eq!(u.path("/health"), "/vllm/health");
        assert_eq!(u.to_string(), "http://gpu-node:80/vllm");
        let u = Url::parse("http://[::1]:9000/").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 9000));
        assert_eq!(u.authority(), "[::1]:9000");
        for bad in ["https://x", "http://", "http://:80", "http://h:port", "ftp://h"] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }
}
