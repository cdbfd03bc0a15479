//! HTTP cameras: an MJPEG stream (`multipart/x-mixed-replace`, IP cameras and
//! the ESP32-CAM's `:81/stream`) parsed part by part, or a JPEG snapshot
//! fetched every `interval_ms` (the ESP32-CAM's `/capture`). Plain HTTP only.
//! Credentials in the URL are sent as basic auth and never shown: every log
//! line and error uses the URL with the password replaced by `***`.

use std::io::{self, BufRead, BufReader, Read};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime};

use super::config::{HttpMode, SourceConfig};
use super::{FrameGate, SourceCtx, SourceEnd, SourceError};
use crate::message::{Frame, Input};

/// Largest JPEG (stream part or snapshot) accepted.
pub const MAX_PART_BYTES: usize = 16 * 1024 * 1024;
/// Largest block of headers one stream part may carry.
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Snapshot failures in a row after which the source counts as failed (and is restarted with backoff).
pub const SNAPSHOT_FAILURES: u32 = 5;

/// Runs the camera until its stream fails, too many snapshots fail, or the daemon stops.
pub fn run(cfg: &SourceConfig, ctx: &SourceCtx) -> Result<SourceEnd, SourceError> {
    let SourceConfig::Http { url, mode, interval_ms, timeout_ms, max_fps, username, password_env, password_file } = cfg
    else {
        return Err(SourceError("not an http source".into()));
    };
    let mut target = Target::parse(url).map_err(SourceError)?;
    if let Some(user) = username {
        // Read on every (re)start, so a rotated password is picked up.
        let password = match (password_env, password_file) {
            (Some(var), _) => std::env::var(var)
                .map_err(|_| SourceError(format!("password_env: the environment variable `{var}` is not set")))?,
            (None, Some(file)) => {
                let path = ctx.base_dir.join(file);
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| SourceError(format!("password_file: {}: {e}", path.display())))?;
                text.lines().next().unwrap_or("").to_string()
            }
            (None, None) => String::new(),
        };
        target.set_credentials(user, password.as_bytes());
    }
    let (mode, interval, timeout_ms, max_fps) = (*mode, Duration::from_millis(*interval_ms), *timeout_ms, *max_fps);
    let agent = agent(Duration::from_millis(timeout_ms));
    let worker = ctx.clone();
    until_stopped(ctx, move || {
        let mut gate = FrameGate::new(max_fps);
        match mode {
            HttpMode::Stream => stream(&agent, &target, timeout_ms, &mut gate, &worker),
            HttpMode::Snapshot => snapshot(&agent, &target, interval, timeout_ms, &mut gate, &worker),
        }
    })
}

/// Runs the blocking HTTP work on a thread of its own so shutdown never waits
/// for a read timeout: once stopped, this returns at once and the thread ends
/// at its next read (its pushes fail on the closed queue).
fn until_stopped(
    ctx: &SourceCtx,
    work: impl FnOnce() -> Result<SourceEnd, SourceError> + Send + 'static,
) -> Result<SourceEnd, SourceError> {
    let (tx, rx) = channel();
    std::thread::Builder::new()
        .name(format!("http-{}", ctx.pipeline))
        .spawn(move || {
            let _ = tx.send(work());
        })
        .map_err(|e| SourceError(format!("cannot start the HTTP reader thread: {e}")))?;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(end) => return end,
            Err(RecvTimeoutError::Timeout) if ctx.stopped() => return Ok(SourceEnd::Stopped),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Err(SourceError("the HTTP reader thread panicked".into())),
        }
    }
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        // Status codes are ours to report, with the redacted URL.
        .http_status_as_error(false)
        .user_agent(format!("edgeinfer/{}", env!("CARGO_PKG_VERSION")))
        .timeout_resolve(Some(timeout))
        .timeout_connect(Some(timeout))
        .timeout_send_request(Some(timeout))
        .timeout_recv_response(Some(timeout))
        .timeout_per_read(Some(timeout))
        .build()
        .into()
}

fn stream(
    agent: &ureq::Agent,
    target: &Target,
    timeout_ms: u64,
    gate: &mut FrameGate,
    ctx: &SourceCtx,
) -> Result<SourceEnd, SourceError> {
    let shown = target.shown();
    let response = target.get(agent, timeout_ms).map_err(SourceError)?;
    if response.status() != 200 {
        return Err(SourceError(format!("GET {shown}: HTTP {}", response.status())));
    }
    let content_type = header(&response, "content-type").unwrap_or_default();
    let Some(boundary) = multipart_boundary(&content_type) else {
        let hint = if content_type.starts_with("image/") { " (a single image: use mode = \"snapshot\")" } else { "" };
        return Err(SourceError(format!(
            "GET {shown}: expected an MJPEG stream (multipart/x-mixed-replace with a boundary), \
             got content type `{content_type}`{hint}"
        )));
    };
    log::info!("pipeline `{}`: receiving the MJPEG stream {shown}", ctx.pipeline);
    let body = BufReader::with_capacity(64 * 1024, response.into_body().into_reader());
    let mut parts = MultipartReader::new(body, &boundary);
    loop {
        if ctx.stopped() {
            return Ok(SourceEnd::Stopped);
        }
        let failed = |e: io::Error| SourceError(format!("{shown}: {}", io_message(&e, timeout_ms)));
        let Some(head) = parts.next_part().map_err(failed)? else {
            return Err(SourceError(format!("{shown}: the server ended the stream")));
        };
        let captured = SystemTime::now();
        // Asked before the part is read, so frames over max_fps are skipped, not decoded.
        let admitted = gate.admit(Instant::now());
        let jpeg = parts.read_body(&head, admitted).map_err(failed)?;
        if ctx.stopped() {
            return Ok(SourceEnd::Stopped);
        }
        let Some(jpeg) = jpeg else {
            ctx.metrics.dropped_max_fps.fetch_add(1, Relaxed);
            continue;
        };
        match crate::preprocess::decode_image(jpeg) {
            Ok(image) => {
                if !ctx.push(Input::Frame(Frame { image, captured, origin: None })) {
                    return Ok(SourceEnd::Stopped);
                }
            }
            Err(e) => ctx.bad_frame(&format!("{shown}: stream part of {} bytes: {e}", jpeg.len())),
        }
    }
}

fn snapshot(
    agent: &ureq::Agent,
    target: &Target,
    interval: Duration,
    timeout_ms: u64,
    gate: &mut FrameGate,
    ctx: &SourceCtx,
) -> Result<SourceEnd, SourceError> {
    let shown = target.shown();
    log::info!("pipeline `{}`: fetching {shown} every {} ms", ctx.pipeline, interval.as_millis());
    let mut failures = 0;
    let mut next = Instant::now();
    loop {
        if !ctx.sleep_until(next) {
            return Ok(SourceEnd::Stopped);
        }
        let now = Instant::now();
        // A slow answer delays the next request rather than causing a burst of them.
        next = (next + interval).max(now);
        // max_fps below the polling rate skips the request itself.
        if !gate.admit(now) {
            continue;
        }
        let captured = SystemTime::now();
        let why = match fetch_image(agent, target, timeout_ms) {
            Ok(bytes) => match crate::preprocess::decode_image(&bytes) {
                Ok(image) => {
                    failures = 0;
                    if !ctx.push(Input::Frame(Frame { image, captured, origin: None })) {
                        return Ok(SourceEnd::Stopped);
                    }
                    continue;
                }
                Err(e) => format!("GET {shown}: {} bytes that are not an image: {e}", bytes.len()),
            },
            Err(why) => why,
        };
        if ctx.stopped() {
            return Ok(SourceEnd::Stopped);
        }
        failures += 1;
        ctx.bad_frame(&why);
        if failures >= SNAPSHOT_FAILURES {
            return Err(SourceError(format!("{why} ({failures} snapshots failed in a row)")));
        }
    }
}

fn fetch_image(agent: &ureq::Agent, target: &Target, timeout_ms: u64) -> Result<Vec<u8>, String> {
    let shown = target.shown();
    let mut response = target.get(agent, timeout_ms)?;
    if response.status() != 200 {
        return Err(format!("GET {shown}: HTTP {}", response.status()));
    }
    if let Some(ct) = header(&response, "content-type") {
        if ct.starts_with("multipart/") {
            return Err(format!("GET {shown}: this is an MJPEG stream (`{ct}`); use mode = \"stream\""));
        }
        if !(ct.starts_with("image/") || ct.starts_with("application/octet-stream")) {
            return Err(format!("GET {shown}: expected an image, got content type `{ct}`"));
        }
    }
    response
        .body_mut()
        .with_config()
        .limit(MAX_PART_BYTES as u64)
        .read_to_vec()
        .map_err(|e| format!("GET {shown}: {}", ureq_message(&e, timeout_ms)))
}

/// A header's value, lower-cased (only used for media types).
fn header(response: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    response.headers().get(name).and_then(|v| v.to_str().ok()).map(|v| v.trim().to_ascii_lowercase())
}

fn ureq_message(e: &ureq::Error, timeout_ms: u64) -> String {
    match e {
        ureq::Error::Timeout(_) => format!("no answer within {timeout_ms} ms (timeout_ms)"),
        ureq::Error::Io(io) => io_message(io, timeout_ms),
        other => other.to_string(),
    }
}

fn io_message(e: &io::Error, timeout_ms: u64) -> String {
    let inner_timeout =
        e.get_ref().and_then(|i| i.downcast_ref::<ureq::Error>()).is_some_and(|u| matches!(u, ureq::Error::Timeout(_)));
    if inner_timeout || matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) {
        return format!("no data for {timeout_ms} ms (timeout_ms); the stream stalled");
    }
    if e.kind() == io::ErrorKind::UnexpectedEof {
        return "the connection closed in the middle of a part".into();
    }
    if let Some(u) = e.get_ref().and_then(|i| i.downcast_ref::<ureq::Error>()) {
        return ureq_message(u, timeout_ms);
    }
    e.to_string()
}

/// The `boundary` of a `multipart/x-mixed-replace` content type, unquoted.
pub fn multipart_boundary(content_type: &str) -> Option<String> {
    let mut fields = content_type.split(';');
    if !fields.next()?.trim().eq_ignore_ascii_case("multipart/x-mixed-replace") {
        return None;
    }
    fields.find_map(|f| {
        let (name, value) = f.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let value = value.trim().trim_matches('"');
        (!value.is_empty()).then(|| value.to_string())
    })
}

/// A camera URL as sent (no credentials), as shown (password redacted) and its basic-auth header.
#[derive(Clone)]
pub struct Target {
    url: String,
    shown: String,
    auth: Option<String>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

/// Query parameters whose values are hidden in messages (cameras that take `?user=..&pwd=..`).
const SECRET_PARAMS: [&str; 4] = ["pass", "pwd", "token", "secret"];

impl Target {
    /// Splits `http://[user[:password]@]host[:port]/path`; percent-escapes in the credentials are decoded.
    pub fn parse(url: &str) -> Result<Target, String> {
        let Some(rest) = url.strip_prefix("http://") else {
            return Err(format!("`{}` is not an http:// URL (HTTPS is not supported yet)", redact_unparsed(url)));
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        let path = if path.is_empty() { "/" } else { path };
        let (target, userinfo) = match authority.rsplit_once('@') {
            Some((userinfo, host)) => (host, Some(userinfo)),
            None => (authority, None),
        };
        let shown_path = redact_query(path);
        if target.is_empty() {
            return Err(format!("`{}`: no host", redact_unparsed(url)));
        }
        let url = format!("http://{target}{path}");
        let Some(userinfo) = userinfo else {
            return Ok(Target { url, shown: format!("http://{target}{shown_path}"), auth: None });
        };
        let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
        let shown = if password.is_empty() {
            format!("http://{user}@{target}{shown_path}")
        } else {
            format!("http://{user}:***@{target}{shown_path}")
        };
        let mut credentials =
            percent_decode(user).ok_or_else(|| format!("`{shown}`: bad %-escape in the user name"))?;
        credentials.push(b':');
        credentials.extend(percent_decode(password).ok_or_else(|| format!("`{shown}`: bad %-escape in the password"))?);
        Ok(Target { url, shown, auth: Some(format!("Basic {}", base64(&credentials))) })
    }

    /// The URL for messages: no password.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// True when the URL carried `user[:password]@`.
    pub fn has_credentials(&self) -> bool {
        self.auth.is_some()
    }

    /// Sends basic auth as `user` with `password` (from `password_env` / `password_file`).
    pub fn set_credentials(&mut self, user: &str, password: &[u8]) {
        let mut credentials = format!("{user}:").into_bytes();
        credentials.extend_from_slice(password);
        self.auth = Some(format!("Basic {}", base64(&credentials)));
        let rest = self.shown.strip_prefix("http://").unwrap_or(&self.shown);
        self.shown =
            if password.is_empty() { format!("http://{user}@{rest}") } else { format!("http://{user}:***@{rest}") };
    }

    fn get(&self, agent: &ureq::Agent, timeout_ms: u64) -> Result<ureq::http::Response<ureq::Body>, String> {
        let mut request = agent.get(&self.url);
        if let Some(auth) = &self.auth {
            request = request.header("Authorization", auth);
        }
        request.call().map_err(|e| format!("GET {}: {}", self.shown, ureq_message(&e, timeout_ms)))
    }
}

/// `url` with any password (userinfo or secret query parameter) replaced by `***`.
pub fn redact(url: &str) -> String {
    Target::parse(url).map(|t| t.shown).unwrap_or_else(|_| redact_unparsed(url))
}

/// A URL that is not ours to parse: everything between the scheme and an `@` is hidden.
fn redact_unparsed(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], redact_query(&url[at..])),
        _ => redact_query(url),
    }
}

fn redact_query(path: &str) -> String {
    let Some((before, query)) = path.split_once('?') else { return path.to_string() };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if SECRET_PARAMS.iter().any(|s| k.to_ascii_lowercase().contains(s)) => format!("{k}=***"),
            _ => pair.to_string(),
        })
        .collect();
    format!("{before}?{}", pairs.join("&"))
}

/// The bytes of a %-escaped URL part; `None` when a `%` is not followed by two
/// hex digits (percent-encoding would pass such a `%` through as it is).
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let well_formed =
        s.split('%').skip(1).all(|after| after.get(..2).is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit())));
    well_formed.then(|| percent_encoding::percent_decode_str(s).collect())
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Headers of one stream part that matter here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartHead {
    /// `Content-Length`, when the server sends it.
    pub content_length: Option<usize>,
    /// `Content-Type`, when the server sends it.
    pub content_type: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delimiter {
    Next,
    Close,
}

/// Reads `multipart/x-mixed-replace` parts one at a time from a body: a
/// delimiter line, headers, then the body by `Content-Length` or, without
/// one, up to the next delimiter. Part and header sizes are bounded.
pub struct MultipartReader<R> {
    inner: R,
    delimiter: Vec<u8>,
    /// Some cameras put the dashes in the header's boundary and then do not add two more.
    bare: Option<Vec<u8>>,
    at_headers: bool,
    ended: bool,
    line: Vec<u8>,
    body: Vec<u8>,
}

impl<R: BufRead> MultipartReader<R> {
    /// A reader for parts separated by `--boundary` lines.
    pub fn new(inner: R, boundary: &str) -> Self {
        let bare = boundary.starts_with("--").then(|| boundary.as_bytes().to_vec());
        MultipartReader {
            inner,
            delimiter: format!("--{boundary}").into_bytes(),
            bare,
            at_headers: false,
            ended: false,
            line: Vec::new(),
            body: Vec::new(),
        }
    }

    /// Reads up to the end of the next part's headers. `None` at the closing
    /// delimiter or when the stream ends between parts.
    pub fn next_part(&mut self) -> io::Result<Option<PartHead>> {
        if self.ended {
            return Ok(None);
        }
        if !self.at_headers {
            // Preamble, the CRLF after a body, or the rest of a part whose Content-Length was short.
            let mut skipped = 0;
            loop {
                self.line.clear();
                let n = (&mut self.inner).take(MAX_HEADER_BYTES as u64).read_until(b'\n', &mut self.line)?;
                if n == 0 {
                    self.ended = true;
                    return Ok(None);
                }
                match self.delimiter_kind(&self.line) {
                    Some(Delimiter::Next) => break,
                    Some(Delimiter::Close) => {
                        self.ended = true;
                        return Ok(None);
                    }
                    None => {
                        skipped += n;
                        if skipped > MAX_PART_BYTES {
                            return Err(invalid(format!(
                                "no multipart boundary `{}` within {} MiB",
                                String::from_utf8_lossy(&self.delimiter),
                                MAX_PART_BYTES >> 20
                            )));
                        }
                    }
                }
            }
        }
        self.at_headers = false;
        let mut head = PartHead::default();
        let mut header_bytes = 0;
        loop {
            self.line.clear();
            let n = (&mut self.inner).take(MAX_HEADER_BYTES as u64).read_until(b'\n', &mut self.line)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the stream ended inside part headers"));
            }
            header_bytes += n;
            if header_bytes > MAX_HEADER_BYTES {
                return Err(invalid(format!("part headers longer than {} KiB", MAX_HEADER_BYTES >> 10)));
            }
            let text = String::from_utf8_lossy(&self.line);
            let text = text.trim();
            if text.is_empty() {
                return Ok(Some(head));
            }
            if let Some((name, value)) = text.split_once(':') {
                let value = value.trim();
                match name.trim().to_ascii_lowercase().as_str() {
                    "content-length" => {
                        let n = value.parse().map_err(|_| invalid(format!("bad part Content-Length `{value}`")))?;
                        head.content_length = Some(n);
                    }
                    "content-type" => head.content_type = Some(value.to_ascii_lowercase()),
                    _ => {}
                }
            }
        }
    }

    /// Reads the body of the part `next_part` returned: into the returned
    /// slice when `keep`, else consumed and dropped (`None`).
    pub fn read_body(&mut self, head: &PartHead, keep: bool) -> io::Result<Option<&[u8]>> {
        self.body.clear();
        match head.content_length {
            Some(n) if n > MAX_PART_BYTES => {
                return Err(invalid(format!("a part of {n} bytes is over the {} MiB limit", MAX_PART_BYTES >> 20)));
            }
            Some(n) if keep => {
                self.body.resize(n, 0);
                self.inner.read_exact(&mut self.body)?;
            }
            Some(n) => {
                let skipped = io::copy(&mut (&mut self.inner).take(n as u64), &mut io::sink())?;
                if skipped < n as u64 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the stream ended inside a part"));
                }
            }
            None => self.scan_to_delimiter(keep)?,
        }
        Ok(keep.then_some(&self.body[..]))
    }

    /// A body without Content-Length: everything up to the CRLF before the next delimiter line.
    fn scan_to_delimiter(&mut self, keep: bool) -> io::Result<()> {
        let mut total = 0;
        loop {
            let start = self.body.len();
            let room = (MAX_PART_BYTES + 2).saturating_sub(total) as u64;
            let n = (&mut self.inner).take(room).read_until(b'\n', &mut self.body)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the stream ended inside a part"));
            }
            total += n;
            if let Some(kind) = self.delimiter_kind(&self.body[start..]) {
                self.body.truncate(start);
                if self.body.ends_with(b"\r\n") {
                    self.body.truncate(start - 2);
                } else if self.body.ends_with(b"\n") {
                    self.body.truncate(start - 1);
                }
                self.at_headers = true;
                self.ended = kind == Delimiter::Close;
                return Ok(());
            }
            if total > MAX_PART_BYTES {
                return Err(invalid(format!("a part is over the {} MiB limit", MAX_PART_BYTES >> 20)));
            }
            if !keep {
                self.body.clear();
            }
        }
    }

    fn delimiter_kind(&self, line: &[u8]) -> Option<Delimiter> {
        // Transport padding (spaces, tabs) may follow a delimiter.
        let end = line.iter().rposition(|b| !matches!(b, b'\r' | b'\n' | b' ' | b'\t')).map_or(0, |i| i + 1);
        let line = &line[..end];
        for d in std::iter::once(&self.delimiter).chain(self.bare.as_ref()) {
            if line == &d[..] {
                return Some(Delimiter::Next);
            }
            if line.len() == d.len() + 2 && line.starts_with(d) && line.ends_with(b"--") {
                return Some(Delimiter::Close);
            }
        }
        None
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(stream: &[u8], boundary: &str) -> (Vec<Vec<u8>>, Option<String>) {
        let mut r = MultipartReader::new(stream, boundary);
        let mut out = Vec::new();
        loop {
            match r.next_part() {
                Ok(Some(h)) => match r.read_body(&h, true) {
                    Ok(b) => out.push(b.unwrap_or_default().to_vec()),
                    Err(e) => return (out, Some(e.to_string())),
                },
                Ok(None) => return (out, None),
                Err(e) => return (out, Some(e.to_string())),
            }
        }
    }

    #[test]
    fn parts_with_and_without_content_length_and_a_preamble() {
        let s = b"preamble\r\n--xx\r\nContent-Type: image/jpeg\r\nContent-Length: 4\r\n\r\nAB\nC\r\n\
                  --xx\r\nContent-Type: image/jpeg\r\n\r\nline1\r\n--xx-not\r\nend\r\n--xx  \r\n\r\nZ\r\n--xx--\r\n";
        let (got, err) = parts(s, "xx");
        assert_eq!(err, None);
        assert_eq!(got, vec![b"AB\nC".to_vec(), b"line1\r\n--xx-not\r\nend".to_vec(), b"Z".to_vec()]);
    }

    #[test]
    fn dashes_in_the_boundary_header_and_a_short_content_length_resync() {
        // The part claims 2 bytes but has 5: the rest is skipped up to the next delimiter.
        let s = b"--frame\r\nContent-Length: 2\r\n\r\nABCDE\r\n--frame\r\n\r\nok\r\n--frame--";
        let (got, err) = parts(s, "--frame");
        assert_eq!(err, None);
        assert_eq!(got, vec![b"AB".to_vec(), b"ok".to_vec()]);
    }

    #[test]
    fn oversized_parts_and_headers_are_errors() {
        let s = format!("--b\r\nContent-Length: {}\r\n\r\n", MAX_PART_BYTES + 1);
        let (_, err) = parts(s.as_bytes(), "b");
        assert!(err.unwrap().contains("over the 16 MiB limit"));
        let s = format!("--b\r\nX-Junk: {}\r\n\r\n", "j".repeat(MAX_HEADER_BYTES + 10));
        let (_, err) = parts(s.as_bytes(), "b");
        assert!(err.unwrap().contains("headers longer"));
        let (got, err) = parts(b"--b\r\n\r\nhalf a jpeg", "b");
        assert!(got.is_empty());
        assert!(err.unwrap().contains("ended inside a part"));
    }

    #[test]
    fn skipped_parts_are_consumed_without_keeping_them() {
        let s = b"--b\r\n\r\nfirst\r\n--b\r\nContent-Length: 3\r\n\r\nsnd\r\n--b\r\n\r\nthird\r\n--b--";
        let mut r = MultipartReader::new(&s[..], "b");
        let h = r.next_part().unwrap().unwrap();
        assert_eq!(r.read_body(&h, false).unwrap(), None);
        let h = r.next_part().unwrap().unwrap();
        assert_eq!(r.read_body(&h, false).unwrap(), None);
        let h = r.next_part().unwrap().unwrap();
        assert_eq!(r.read_body(&h, true).unwrap(), Some(&b"third"[..]));
        assert_eq!(r.next_part().unwrap(), None);
    }

    #[test]
    fn boundary_comes_from_the_content_type() {
        assert_eq!(multipart_boundary("multipart/x-mixed-replace; boundary=frame").as_deref(), Some("frame"));
        assert_eq!(multipart_boundary("multipart/x-mixed-replace;boundary=\"a b\"").as_deref(), Some("a b"));
        assert_eq!(multipart_boundary("Multipart/X-Mixed-Replace; charset=x; Boundary=--z").as_deref(), Some("--z"));
        assert_eq!(multipart_boundary("multipart/x-mixed-replace"), None);
        assert_eq!(multipart_boundary("image/jpeg"), None);
    }

    #[test]
    fn credentials_become_basic_auth_and_never_show() {
        let t = Target::parse("http://martin:secret@cam.local:8080/stream?x=1").unwrap();
        assert_eq!(t.url, "http://cam.local:8080/stream?x=1");
        assert_eq!(t.shown(), "http://martin:***@cam.local:8080/stream?x=1");
        assert_eq!(t.auth.as_deref(), Some("Basic bWFydGluOnNlY3JldA=="));
        assert!(!format!("{t:?}").contains("secret"));
        // Escapes are decoded before encoding: `p@ss:w` as a password.
        let t = Target::parse("http://u:p%40ss%3Aw@h/").unwrap();
        assert_eq!(t.auth.as_deref(), Some(format!("Basic {}", base64(b"u:p@ss:w")).as_str()));
        assert!(!t.shown().contains("p%40ss"));
        let t = Target::parse("http://10.0.0.5/videostream.cgi?user=admin&pwd=hunter2").unwrap();
        assert_eq!(t.shown(), "http://10.0.0.5/videostream.cgi?user=admin&pwd=***");
        assert_eq!(t.url, "http://10.0.0.5/videostream.cgi?user=admin&pwd=hunter2");
        assert_eq!(Target::parse("http://cam").unwrap().url, "http://cam/");
        assert!(Target::parse("https://u:pw@cam/").unwrap_err().contains("https://***@cam/"));
        let mut t = Target::parse("http://cam/capture").unwrap();
        assert!(!t.has_credentials());
        t.set_credentials("admin", b"pw");
        assert_eq!(t.shown(), "http://admin:***@cam/capture");
        assert_eq!(t.auth.as_deref(), Some(format!("Basic {}", base64(b"admin:pw")).as_str()));
        assert_eq!(percent_decode("a%41%3a%c3%A9"), Some("aA:é".as_bytes().to_vec()));
        for bad in ["%zz", "%4", "100%", "%+f", "%é0"] {
            assert_eq!(percent_decode(bad), None, "{bad}");
        }
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
    }
}
