//! The HTTP camera source (feature `http-source`) against small HTTP servers
//! on 127.0.0.1 (MJPEG streams, snapshots, errors, stalls), plus one run of
//! the real daemon on an HTTP stream.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgeinfer::config::{HttpMode, SourceConfig};
use edgeinfer::message::Input;
use edgeinfer::source::{http, SourceCtx, SourceEnd, SourceError};
use image::RgbImage;

use crate::cameras::{ctx, BLUE, RED};

const GREEN: [u8; 3] = [30, 200, 40];
const WHITE: [u8; 3] = [250, 250, 250];

/// A solid-colour JPEG made with the image crate.
fn jpeg(rgb: [u8; 3], w: u32, h: u32) -> Vec<u8> {
    let img = RgbImage::from_pixel(w, h, image::Rgb(rgb));
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90).encode_image(&img).unwrap();
    out
}

fn mean(img: &RgbImage) -> [f64; 3] {
    let mut sum = [0f64; 3];
    for p in img.pixels() {
        for (s, v) in sum.iter_mut().zip(p.0) {
            *s += v as f64;
        }
    }
    let n = (img.width() * img.height()) as f64;
    sum.map(|s| s / n)
}

fn near(img: &RgbImage, want: [u8; 3], tol: f64) -> bool {
    mean(img).iter().zip(want).all(|(m, w)| (m - w as f64).abs() <= tol)
}

fn frames(ctx: &SourceCtx) -> Vec<RgbImage> {
    ctx.queue.close();
    std::iter::from_fn(|| ctx.queue.pop())
        .map(|i| match i {
            Input::Frame(f) => f.image,
            other => panic!("not a frame: {other:?}"),
        })
        .collect()
}

fn http_cfg(url: &str, mode: HttpMode, interval_ms: u64, timeout_ms: u64) -> SourceConfig {
    SourceConfig::Http {
        url: url.into(),
        mode,
        interval_ms,
        timeout_ms,
        max_fps: None,
        username: None,
        password_env: None,
        password_file: None,
    }
}

/// Runs the source on a thread; returns its result and how long it ran.
fn run_http(cfg: SourceConfig, ctx: &SourceCtx) -> (Result<SourceEnd, SourceError>, Duration) {
    let c = ctx.clone();
    let started = Instant::now();
    let end = std::thread::spawn(move || http::run(&cfg, &c)).join().unwrap();
    (end, started.elapsed())
}

/// A one-thread HTTP server on 127.0.0.1: each connection's request head is
/// recorded and handed with the stream to `handle` (which gets the request's index).
struct Server {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(handle: impl Fn(usize, TcpStream) + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let handle = Arc::new(handle);
        std::thread::spawn(move || {
            for (i, conn) in listener.incoming().enumerate() {
                let Ok(stream) = conn else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                seen.lock().unwrap().push(head);
                let h = handle.clone();
                std::thread::spawn(move || h(i, stream));
            }
        });
        Server { port, requests }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

const MJPEG_HEAD: &str =
    "HTTP/1.1 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary=frame\r\nConnection: close\r\n\r\n";

fn part(s: &mut TcpStream, body: &[u8], with_length: bool, content_type: &str) {
    let mut head = format!("--frame\r\nContent-Type: {content_type}\r\n");
    if with_length {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    s.write_all(b"\r\n").unwrap();
}

fn respond(s: &mut TcpStream, status: &str, content_type: &str, body: &[u8]) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
}

#[test]
fn http_stream_yields_frames_in_order_skips_a_corrupt_part_and_fails_when_closed() {
    let server = Server::start(|_, mut s| {
        s.write_all(MJPEG_HEAD.as_bytes()).unwrap();
        s.write_all(b"a preamble line\r\n").unwrap();
        part(&mut s, &jpeg(RED, 32, 24), true, "image/jpeg");
        part(&mut s, &jpeg(GREEN, 32, 24), true, "image/jpeg");
        part(&mut s, b"\xff\xd8 this is not a JPEG \xff\xd9", true, "image/jpeg");
        part(&mut s, &jpeg(BLUE, 32, 24), true, "image/jpeg");
        // No Content-Length: the reader scans to the next boundary.
        part(&mut s, &jpeg(WHITE, 32, 24), false, "image/jpeg");
        s.write_all(b"--frame\r\n").unwrap();
        // Then the server goes away mid-stream.
    });
    let url = format!("http://viewer:s3cr%40t@127.0.0.1:{}/stream", server.port);
    let ctx = ctx();
    let (end, _) = run_http(http_cfg(&url, HttpMode::Stream, 1000, 5000), &ctx);
    let err = end.unwrap_err().0;
    assert!(err.contains(&format!("http://viewer:***@127.0.0.1:{}/stream", server.port)), "{err}");
    assert!(!err.contains("s3cr"), "the password leaked: {err}");
    let got = frames(&ctx);
    assert_eq!(got.len(), 4, "red, green, blue, white");
    for (img, want) in got.iter().zip([RED, GREEN, BLUE, WHITE]) {
        assert_eq!(img.dimensions(), (32, 24));
        assert!(near(img, want, 8.0), "{:?} vs {want:?}", mean(img));
    }
    assert_eq!(ctx.metrics.bad_frames.load(Relaxed), 1);
    // Credentials went out as basic auth, decoded from the URL: `viewer:s3cr@t`.
    let req = server.requests.lock().unwrap()[0].clone();
    assert!(req.starts_with("GET /stream HTTP/1.1"), "{req}");
    assert!(req.lines().any(|l| l.eq_ignore_ascii_case("authorization: Basic dmlld2VyOnMzY3JAdA==")), "{req}");
}

#[test]
fn http_stream_max_fps_skips_parts_without_decoding_them() {
    let server = Server::start(|_, mut s| {
        s.write_all(MJPEG_HEAD.as_bytes()).unwrap();
        for i in 0..10 {
            // Every other part is garbage: skipped parts are never decoded, so never counted bad.
            let body = if i % 2 == 0 { jpeg(RED, 16, 16) } else { b"garbage".to_vec() };
            part(&mut s, &body, true, "image/jpeg");
        }
        s.write_all(b"--frame--\r\n").unwrap();
    });
    let ctx = ctx();
    let mut cfg = http_cfg(&server.url("/"), HttpMode::Stream, 1000, 5000);
    if let SourceConfig::Http { max_fps, .. } = &mut cfg {
        *max_fps = Some(0.5);
    }
    let (end, _) = run_http(cfg, &ctx);
    assert!(end.unwrap_err().0.contains("ended the stream"));
    // Ten parts arrive within far less than two seconds: only the first passes the gate.
    assert_eq!(frames(&ctx).len(), 1);
    assert_eq!(ctx.metrics.dropped_max_fps.load(Relaxed), 9);
    assert_eq!(ctx.metrics.bad_frames.load(Relaxed), 0);
}

#[test]
fn http_stream_wrong_content_type_is_a_clear_error() {
    let server = Server::start(|_, mut s| respond(&mut s, "200 OK", "text/html; charset=utf-8", b"<html>login</html>"));
    let (end, _) = run_http(http_cfg(&server.url("/"), HttpMode::Stream, 1000, 5000), &ctx());
    let err = end.unwrap_err().0;
    assert!(err.contains("multipart/x-mixed-replace") && err.contains("`text/html; charset=utf-8`"), "{err}");
    let server = Server::start(|_, mut s| respond(&mut s, "200 OK", "image/jpeg", &jpeg(RED, 8, 8)));
    let (end, _) = run_http(http_cfg(&server.url("/capture"), HttpMode::Stream, 1000, 5000), &ctx());
    assert!(end.unwrap_err().0.contains("mode = \"snapshot\""));
    let server = Server::start(|_, mut s| respond(&mut s, "401 Unauthorized", "text/plain", b"no"));
    let (end, _) = run_http(http_cfg(&server.url("/"), HttpMode::Stream, 1000, 5000), &ctx());
    let err = end.unwrap_err().0;
    assert!(err.contains("HTTP 401"), "{err}");
}

#[test]
fn http_snapshots_survive_a_500_and_fail_after_repeated_errors() {
    let server = Server::start(|i, mut s| match i {
        0 => respond(&mut s, "200 OK", "image/jpeg", &jpeg(RED, 40, 30)),
        1 => respond(&mut s, "500 Internal Server Error", "text/plain", b"sensor busy"),
        2 => respond(&mut s, "200 OK", "image/jpeg", &jpeg(GREEN, 40, 30)),
        3 => respond(&mut s, "200 OK", "text/html", b"<html>not an image</html>"),
        4 => respond(&mut s, "200 OK", "image/jpeg", &jpeg(BLUE, 40, 30)),
        _ => respond(&mut s, "500 Internal Server Error", "text/plain", b"gone"),
    });
    let ctx = ctx();
    let (end, ran) = run_http(http_cfg(&server.url("/capture"), HttpMode::Snapshot, 50, 2000), &ctx);
    let err = end.unwrap_err().0;
    assert!(err.contains("HTTP 500") && err.contains("5 snapshots failed in a row"), "{err}");
    let got = frames(&ctx);
    assert_eq!(got.len(), 3);
    for (img, want) in got.iter().zip([RED, GREEN, BLUE]) {
        assert!(near(img, want, 8.0), "{:?} vs {want:?}", mean(img));
    }
    // One 500, one HTML page, then five 500s in a row.
    assert_eq!(ctx.metrics.bad_frames.load(Relaxed), 7);
    assert_eq!(server.requests.lock().unwrap().len(), 10);
    // Ten requests 50 ms apart take at least 9 intervals.
    assert!(ran >= Duration::from_millis(400), "{ran:?}");
}

#[test]
fn http_timeouts_are_honoured_for_silent_servers_and_stalled_streams() {
    // Accepts, reads the request, never answers.
    let silent = Server::start(|_, s| {
        std::thread::sleep(Duration::from_secs(20));
        drop(s);
    });
    let (end, ran) = run_http(http_cfg(&silent.url("/stream"), HttpMode::Stream, 1000, 300), &ctx());
    let err = end.unwrap_err().0;
    assert!(err.contains("300 ms"), "{err}");
    assert!(ran >= Duration::from_millis(250) && ran < Duration::from_secs(5), "{ran:?}");

    // One frame, then silence.
    let stalls = Server::start(|_, mut s| {
        s.write_all(MJPEG_HEAD.as_bytes()).unwrap();
        part(&mut s, &jpeg(RED, 16, 16), true, "image/jpeg");
        std::thread::sleep(Duration::from_secs(20));
    });
    let ctx = ctx();
    let (end, ran) = run_http(http_cfg(&stalls.url("/"), HttpMode::Stream, 1000, 300), &ctx);
    let err = end.unwrap_err().0;
    assert!(err.contains("no data for 300 ms"), "{err}");
    assert!(ran < Duration::from_secs(5), "{ran:?}");
    assert_eq!(frames(&ctx).len(), 1);

    // Nothing listening at all.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (end, _) = run_http(http_cfg(&format!("http://127.0.0.1:{port}/"), HttpMode::Snapshot, 10, 300), &ctx.clone());
    assert!(end.unwrap_err().0.contains(&format!("127.0.0.1:{port}")));
}

#[test]
fn http_source_stops_promptly_while_a_read_is_blocked() {
    let stalls = Server::start(|_, mut s| {
        s.write_all(MJPEG_HEAD.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_secs(20));
    });
    let ctx = ctx();
    let stop = ctx.stop.clone();
    let cfg = http_cfg(&stalls.url("/"), HttpMode::Stream, 1000, 30_000);
    let c = ctx.clone();
    let handle = std::thread::spawn(move || {
        let r = http::run(&cfg, &c);
        (r, Instant::now())
    });
    std::thread::sleep(Duration::from_millis(300));
    let stopped_at = Instant::now();
    stop.store(true, Relaxed);
    let (end, returned_at) = handle.join().unwrap();
    assert_eq!(end.unwrap(), SourceEnd::Stopped);
    assert!(returned_at - stopped_at < Duration::from_secs(2), "{:?}", returned_at - stopped_at);
}

/// The real daemon on an HTTP MJPEG stream of the shipped digit samples (sent
/// as PNG parts, so no JPEG loss) gives what `infer` gives for the same files.
#[test]
fn daemon_classifies_an_http_stream_like_infer_does() {
    let mut files: Vec<_> = std::fs::read_dir(crate::model("samples/digits"))
        .unwrap()
        .map(|e| e.unwrap().path().to_str().unwrap().to_string())
        .collect();
    files.sort();
    let bodies: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    let server = Server::start(move |i, mut s| {
        if i > 0 {
            return; // One stream only: a reconnect would repeat the digits.
        }
        s.write_all(MJPEG_HEAD.as_bytes()).unwrap();
        for body in &bodies {
            // Paced, so the newest-frame-wins slot never drops one.
            std::thread::sleep(Duration::from_millis(300));
            part(&mut s, body, true, "image/png");
            count.fetch_add(1, Relaxed);
        }
        std::thread::sleep(Duration::from_secs(60));
    });
    let mut daemon = crate::support::Daemon::start(&format!(
        r#"
device = "httpcam"
[[pipelines]]
name = "digits"
model = "{{models}}/digits_cnn_int8.onnx"
source = {{ type = "http", url = "{}", timeout_ms = 120000 }}
postprocess = {{ type = "classify", top_k = 3 }}
  [[pipelines.outputs]]
  type = "stdout"
"#,
        server.url("/stream")
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    while daemon.stdout().lines().count() < files.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    daemon.signal("TERM");
    assert_eq!(daemon.wait(Duration::from_secs(30)), Some(0), "stderr: {}", daemon.stderr());
    assert_eq!(served.load(Relaxed), files.len());
    let results: Vec<serde_json::Value> = daemon.stdout().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(results.len(), files.len(), "stderr: {}", daemon.stderr());

    let infer = Command::new(env!("CARGO_BIN_EXE_edgeinfer"))
        .args(["infer", crate::model("digits_cnn_int8.onnx").to_str().unwrap(), "--top-k", "3"])
        .args(&files)
        .output()
        .unwrap();
    assert!(infer.status.success(), "{}", String::from_utf8_lossy(&infer.stderr));
    let expected: Vec<serde_json::Value> =
        String::from_utf8_lossy(&infer.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for (got, want) in results.iter().zip(&expected) {
        let got = got["result"]["classes"].as_array().unwrap();
        let want = want["top"].as_array().unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g["label"], w["label"]);
            assert!((g["score"].as_f64().unwrap() - w["score"].as_f64().unwrap()).abs() < 1e-6, "{g} vs {w}");
        }
    }
}

#[test]
fn http_credentials_can_come_from_a_password_file() {
    let server = Server::start(|i, mut s| match i {
        0 => respond(&mut s, "200 OK", "image/jpeg", &jpeg(RED, 8, 8)),
        _ => respond(&mut s, "503 Service Unavailable", "text/plain", b""),
    });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cam.pw"), "p@ss word\nignored\n").unwrap();
    let mut ctx = ctx();
    ctx.base_dir = dir.path().to_path_buf();
    let mut cfg = http_cfg(&server.url("/capture"), HttpMode::Snapshot, 20, 2000);
    if let SourceConfig::Http { username, password_file, .. } = &mut cfg {
        *username = Some("admin".into());
        *password_file = Some("cam.pw".into());
    }
    let (end, _) = run_http(cfg, &ctx);
    let err = end.unwrap_err().0;
    assert!(err.contains("admin:***@127.0.0.1") && err.contains("HTTP 503") && !err.contains("p@ss"), "{err}");
    assert_eq!(frames(&ctx).len(), 1);
    // base64("admin:p@ss word")
    let req = server.requests.lock().unwrap()[0].clone();
    assert!(req.lines().any(|l| l.eq_ignore_ascii_case("authorization: Basic YWRtaW46cEBzcyB3b3Jk")), "{req}");

    // Both ways at once, or a password without a user, is a config error naming the key.
    for (extra, key) in [
        ("url = \"http://a:b@cam/\", username = \"u\"", "username"),
        ("url = \"http://cam/\", password_env = \"PW\"", "username"),
        ("url = \"https://cam/\"", "url"),
    ] {
        let toml = format!(
            "[[pipelines]]\nname = \"p\"\nmodel = \"{}\"\nsource = {{ type = \"http\", {extra} }}\n\
             [[pipelines.outputs]]\ntype = \"stdout\"\n",
            crate::model("digits_cnn_int8.onnx").display()
        );
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml).unwrap();
        let e = edgeinfer::config::Config::load(&path).unwrap_err().to_string();
        assert!(e.contains(key), "{extra}: {e}");
        assert!(!e.contains(":b@"), "{e}");
    }
}
