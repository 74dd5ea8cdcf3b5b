//! HTTP/1.1 front: `POST /v1/transcode`, `GET /health`, `GET /metrics`.
//!
//! Connections are served by a small async runtime; transcodes run on
//! tokio's blocking threads, at most `Limits::threads` at once. Requests
//! beyond `Limits::max_queue` waiting for a thread get 503 `overloaded`
//! (the filter then shrinks the image itself).

use super::{check, run, ApiError, Limits};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use vlm_budget::core::offload::PATH;

/// The service's state, shared by its connections.
pub struct Service {
    limits: Limits,
    permits: Semaphore,
    waiting: AtomicUsize,
    served: AtomicU64,
    refused: AtomicU64,
    busy: AtomicU64,
}

impl Service {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            permits: Semaphore::new(limits.threads.max(1)),
            limits,
            waiting: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            busy: AtomicU64::new(0),
        })
    }

    fn metrics(&self) -> String {
        format!(
            "# TYPE vlm_transcode_images_total counter\nvlm_transcode_images_total {}\n\
             # TYPE vlm_transcode_errors_total counter\nvlm_transcode_errors_total {}\n\
             # TYPE vlm_transcode_overloaded_total counter\nvlm_transcode_overloaded_total {}\n\
             # TYPE vlm_transcode_waiting gauge\nvlm_transcode_waiting {}\n",
            self.served.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
            self.busy.load(Ordering::Relaxed),
            self.waiting.load(Ordering::Relaxed),
        )
    }
}

/// Binds `addr`.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves connections from `listener` until the process ends.
pub async fn serve(listener: TcpListener, service: Arc<Service>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("vlm-transcode: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| route(service.clone(), req));
            // A broken connection ends that connection only.
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

type Body = Full<Bytes>;

fn error(e: &ApiError) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(e.to_json())));
    *resp.status_mut() = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn text(body: String, content_type: &'static str) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

async fn route(service: Arc<Service>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let resp = match (req.method(), path.as_str()) {
        (&Method::POST, PATH) => match transcode(&service, req).await {
            Ok(resp) => resp,
            Err(e) => {
                service.refused.fetch_add(1, Ordering::Relaxed);
                error(&e)
            }
        },
        (&Method::GET, "/health") => text("ok\n".into(), "text/plain"),
        (&Method::GET, "/metrics") => text(service.metrics(), "text/plain; version=0.0.4"),
        (m, p @ (PATH | "/health" | "/metrics")) => error(&ApiError::new(
            405,
            "method_not_allowed",
            format!("{m} is not allowed on {p}"),
        )),
        (_, p) => error(&ApiError::new(404, "not_found", format!("no route for {p}"))),
    };
    Ok(resp)
}

async fn transcode(service: &Service, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let limits = service.limits;
    let too_large = || {
        ApiError::new(
            413,
            "body_too_large",
            format!("the image is larger than {} bytes", limits.max_body_bytes),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes) {
        return Err(too_large());
    }
    let (parts, body) = req.into_parts();
    let limit = usize::try_from(limits.max_body_bytes).unwrap_or(usize::MAX);
    let body: Bytes = match Limited::new(body, limit).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
        Err(e) => {
            return Err(ApiError::bad(
                "invalid_request",
                format!("cannot read the body: {e}"),
            ))
        }
    };
    let headers = &parts.headers;
    let checked = check(|k| headers.get(k).and_then(|v| v.to_str().ok()), &body, &limits)?;
    // A free thread, or a place in the queue, or 503.
    let _permit = match service.permits.try_acquire() {
        Ok(p) => p,
        Err(_) => {
            if service.waiting.fetch_add(1, Ordering::AcqRel) >= limits.max_queue {
                service.waiting.fetch_sub(1, Ordering::AcqRel);
                service.busy.fetch_add(1, Ordering::Relaxed);
                return Err(ApiError::new(
                    503,
                    "overloaded",
                    "too many images waiting; try again",
                ));
            }
            let permit = service.permits.acquire().await;
            service.waiting.fetch_sub(1, Ordering::AcqRel);
            permit.map_err(|_| ApiError::new(503, "overloaded", "shutting down"))?
        }
    };
    let out = tokio::task::spawn_blocking(move || run(&checked, &body, &limits))
        .await
        .map_err(|e| {
            ApiError::new(
                500,
                "image_processing_failed",
                format!("the transcode stopped: {e}"),
            )
        })??;
    service.served.fetch_add(1, Ordering::Relaxed);
    let mut resp = Response::new(Full::new(Bytes::from(out)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(checked.format.mime()));
    Ok(resp)
}
