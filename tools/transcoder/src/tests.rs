use super::*;
use std::collections::HashMap;
use vlm_budget::core::offload::{JPEG_QUALITY, RESIZE_FILTER, TARGET_HEIGHT, TARGET_WIDTH};
use vlm_budget::core::pipeline::Job;
use vlm_budget::core::sizing::Dims;
use vlm_budget::core::transcode::{encode, Layout, Pixels, ResizeFilter};

fn picture(w: u32, h: u32, format: ImageFormat) -> Vec<u8> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let data = (0..w * h * 3)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((i % 251) as u8).wrapping_add((state >> 61) as u8)
        })
        .collect();
    let px = Pixels {
        width: w,
        height: h,
        layout: Layout::Rgb8,
        data,
    };
    encode(&px, format, 90).unwrap_or_default()
}

fn headers(w: u32, h: u32) -> HashMap<&'static str, String> {
    [
        (TARGET_WIDTH, w.to_string()),
        (TARGET_HEIGHT, h.to_string()),
        (JPEG_QUALITY, "90".to_string()),
        (RESIZE_FILTER, "catmull_rom".to_string()),
    ]
    .into()
}

fn call(
    h: &HashMap<&'static str, String>,
    body: &[u8],
    limits: &Limits,
) -> Result<(ImageFormat, Vec<u8>), ApiError> {
    handle(|k| h.get(k).map(String::as_str), body, limits)
}

#[test]
fn resizes_exactly_as_the_filter_does() {
    let limits = Limits::default();
    for format in [ImageFormat::Jpeg, ImageFormat::Png] {
        let img = picture(900, 600, format);
        let (got_format, out) = call(&headers(448, 308), &img, &limits).expect("transcoded");
        assert_eq!(got_format, format);
        let header = probe(out.as_slice()).expect("an image");
        assert_eq!((header.format, header.width, header.height), (format, 448, 308));
        // The filter's own step on the same bytes gives the same bytes.
        let job = Job {
            index: 0,
            span: 0..0,
            header: probe(img.as_slice()).expect("probe"),
            to: Dims::new(448, 308),
            payload: (),
        };
        let opts = TranscodeOptions {
            jpeg_quality: 90,
            filter: ResizeFilter::CatmullRom,
            max_pixels: limits.max_pixels,
        };
        assert_eq!(job.transcode(&img, &opts).ok(), Some(out), "{format:?}");
    }
}

fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend_from_slice(&13u32.to_be_bytes());
    out.extend_from_slice(b"IHDR");
    out.extend_from_slice(&ihdr);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&[0; 64]);
    out
}

/// The filter's bad-input matrix, as the service meets it: every case a
/// 4xx with the filter's code, none a crash.
#[test]
fn bad_input_gets_a_clear_4xx() {
    let limits = Limits {
        max_pixels: 20_000_000,
        ..Limits::default()
    };
    let png = picture(600, 400, ImageFormat::Png);
    let jpeg = picture(600, 400, ImageFormat::Jpeg);
    let mut corrupt_jpeg = jpeg.clone();
    let sos = corrupt_jpeg
        .windows(2)
        .position(|w| w == [0xFF, 0xDA])
        .unwrap_or(0);
    for i in (sos + 40..corrupt_jpeg.len() - 2).step_by(7) {
        corrupt_jpeg[i] = 0xFF;
    }
    let ok = headers(280, 196);
    type Case<'a> = (&'a str, HashMap<&'static str, String>, Vec<u8>, &'a str);
    let cases: Vec<Case> = vec![
        ("empty", ok.clone(), Vec::new(), "invalid_request"),
        (
            "json",
            ok.clone(),
            b"{\"messages\":[]}".to_vec(),
            "unsupported_image_type",
        ),
        (
            "webp",
            ok.clone(),
            b"RIFF\0\0\0\0WEBPVP8 \0\0\0\0\0\0\0\0".to_vec(),
            "unsupported_image_type",
        ),
        (
            "gif",
            ok.clone(),
            b"GIF89a\x01\x00\x01\x00\x00\x00\x00".to_vec(),
            "unsupported_image_type",
        ),
        (
            "svg",
            ok.clone(),
            b"<svg xmlns='http://www.w3.org/2000/svg'/>".to_vec(),
            "unsupported_image_type",
        ),
        (
            "truncated_png",
            ok.clone(),
            png[..png.len() / 2].to_vec(),
            "corrupt_image",
        ),
        (
            "truncated_jpeg",
            ok.clone(),
            jpeg[..jpeg.len() / 3].to_vec(),
            "corrupt_image",
        ),
        (
            "corrupt_jpeg_header",
            ok.clone(),
            b"\xff\xd8\xff\xe0\x00\x10JFIF".to_vec(),
            "corrupt_image",
        ),
        (
            "pixel_bomb",
            ok.clone(),
            png_claiming(100_000, 100_000),
            "image_too_large",
        ),
        ("no_target", HashMap::new(), png.clone(), "invalid_request"),
        ("zero_target", headers(0, 196), png.clone(), "invalid_request"),
        (
            "target_above_image",
            headers(700, 196),
            png.clone(),
            "invalid_request",
        ),
        (
            "bad_quality",
            [
                (TARGET_WIDTH, "28".into()),
                (TARGET_HEIGHT, "28".into()),
                (JPEG_QUALITY, "0".into()),
            ]
            .into(),
            png.clone(),
            "invalid_request",
        ),
        (
            "bad_filter",
            [
                (TARGET_WIDTH, "28".into()),
                (TARGET_HEIGHT, "28".into()),
                (RESIZE_FILTER, "box".into()),
            ]
            .into(),
            png.clone(),
            "invalid_request",
        ),
    ];
    for (name, h, body, code) in cases {
        let e = call(&h, &body, &limits).expect_err(name);
        assert_eq!((e.status, e.code), (400, code), "{name}: {e}");
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).expect("json");
        assert_eq!(v["error"]["code"], code, "{name}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{name}");
        assert!(!e.message.is_empty(), "{name}");
    }
    // Scan corruption past the header: a 400, or (jpeg-decoder recovers
    // some) a picture of the target size; never a crash.
    match call(&ok, &corrupt_jpeg, &limits) {
        Err(e) => assert_eq!((e.status, e.code), (400, "corrupt_image"), "{e}"),
        Ok((_, out)) => {
            let h = probe(out.as_slice()).expect("an image");
            assert_eq!((h.width, h.height), (280, 196));
        }
    }
}

#[test]
fn mutated_images_never_crash() {
    let limits = Limits::default();
    let h = headers(120, 84);
    let mut state = 7u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for format in [ImageFormat::Png, ImageFormat::Jpeg] {
        let img = picture(240, 168, format);
        for _ in 0..150 {
            let mut m = img.clone();
            for _ in 0..1 + next() % 8 {
                let at = (next() % m.len() as u64) as usize;
                m[at] = next() as u8;
            }
            if next() % 4 == 0 {
                m.truncate((next() % m.len() as u64) as usize);
            }
            match call(&h, &m, &limits) {
                Ok((f, out)) => {
                    let p = probe(out.as_slice()).expect("an image");
                    assert_eq!((p.format, p.width, p.height), (f, 120, 84));
                }
                Err(e) => assert!((400..500).contains(&e.status), "{e}"),
            }
        }
    }
}

mod http {
    use super::*;
    use crate::server::{self, Service};
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::Request;
    use hyper_util::rt::TokioIo;
    use std::net::SocketAddr;

    /// Sends one request on a new connection: (status, content-type, body).
    async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> (u16, String, Vec<u8>) {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let resp = tx.send_request(req).await.expect("response");
        let status = resp.status().as_u16();
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = resp
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .to_vec();
        (status, ct, body)
    }

    fn post(addr: SocketAddr, h: &[(&str, String)], body: Vec<u8>) -> Request<Full<Bytes>> {
        let mut b = Request::post(format!("http://{addr}{}", vlm_budget::core::offload::PATH));
        for (k, v) in h {
            b = b.header(*k, v.as_str());
        }
        b.body(Full::new(Bytes::from(body))).expect("request")
    }

    #[test]
    fn serves_the_wire_format_and_refuses_the_rest() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let limits = Limits {
                max_body_bytes: 200_000,
                threads: 2,
                ..Limits::default()
            };
            let listener = server::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            tokio::spawn(server::serve(listener, Service::new(limits)));
            let img = picture(600, 400, ImageFormat::Jpeg);
            let h: Vec<(&str, String)> = headers(280, 196).into_iter().collect();
            let (status, ct, body) = send(addr, post(addr, &h, img.clone())).await;
            assert_eq!((status, ct.as_str()), (200, "image/jpeg"));
            assert_eq!(
                Some(body),
                call(&headers(280, 196), &img, &limits).ok().map(|r| r.1),
                "the same bytes as the library call"
            );
            // Too large: by the declared length, and by the bytes read.
            let (status, ct, body) = send(addr, post(addr, &h, vec![0; 300_000])).await;
            assert_eq!((status, ct.as_str()), (413, "application/json"));
            let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
            assert_eq!(v["error"]["code"], "body_too_large");
            let (status, _, body) = send(addr, post(addr, &h, b"not an image".to_vec())).await;
            assert_eq!(status, 400);
            let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
            assert_eq!(v["error"]["code"], "unsupported_image_type");
            let get = |p: &str| {
                Request::get(format!("http://{addr}{p}"))
                    .body(Full::new(Bytes::new()))
                    .expect("request")
            };
            assert_eq!(send(addr, get("/health")).await.0, 200);
            assert_eq!(send(addr, get(vlm_budget::core::offload::PATH)).await.0, 405);
            assert_eq!(send(addr, get("/nope")).await.0, 404);
            let (status, _, metrics) = send(addr, get("/metrics")).await;
            assert_eq!(status, 200);
            let m = String::from_utf8_lossy(&metrics).to_string();
            assert!(m.contains("vlm_transcode_images_total 1\n"), "{m}");
            assert!(m.contains("vlm_transcode_errors_total 2\n"), "{m}");
        });
    }
}
