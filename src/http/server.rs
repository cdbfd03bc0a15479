//! The listener and its routes: `/` (the page), `/api/status` (the health
//! message plus what only the page shows), `/pipelines/NAME/view.svg` (the
//! newest frame with its boxes), `/pipelines/NAME/latency.svg` (the plot) and
//! `/metrics` (Prometheus). Every route is behind basic auth when it is
//! configured. Renders off the reactor (`spawn_blocking`) where it encodes JPEG.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine as _;
use serde_json::{json, Value};

use super::plot::{self, History};
use super::HttpConfig;
use crate::metrics::{Latest, MqttMetrics, PipelineMetrics};

/// One pipeline as the page sees it.
pub struct PipelineView {
    /// Its counters and latencies (the health message's).
    pub metrics: Arc<PipelineMetrics>,
    /// Its newest result and frame, and the model it runs.
    pub latest: Arc<Latest>,
    /// Source type (`pipe`, `lines`, ...).
    pub source: String,
}

/// What the page and `/metrics` read.
pub struct Sources {
    /// Device id.
    pub device: String,
    /// When the daemon started.
    pub started: Instant,
    /// The MQTT connection's figures.
    pub mqtt: Arc<MqttMetrics>,
    /// Every pipeline, in config order.
    pub pipelines: Vec<PipelineView>,
    /// Builds the health message as subscribers get it (without publishing it).
    pub health: Arc<dyn Fn() -> Value + Send + Sync>,
}

struct App {
    src: Sources,
    page: String,
    /// The whole `Authorization` header value that is accepted.
    auth: Option<Vec<u8>>,
    history: Vec<Mutex<History>>,
    /// The last camera view rendered per pipeline, by result sequence number.
    views: Mutex<HashMap<usize, (u64, Arc<str>)>>,
}

/// The running server; dropping it stops it.
pub struct Server {
    /// The address it listens on.
    pub addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Binds `cfg.listen`; the error names `http.listen`.
pub async fn bind(cfg: &HttpConfig) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| format!("http.listen: cannot listen on {}: {e}", cfg.listen))
}

/// Serves the page and `/metrics` on `listener` until the returned [`Server`] is dropped.
pub fn start(
    listener: tokio::net::TcpListener,
    cfg: &HttpConfig,
    credentials: Option<(String, String)>,
    src: Sources,
) -> Result<Server, String> {
    let addr = listener.local_addr().map_err(|e| format!("http.listen: {e}"))?;
    if credentials.is_none() && !addr.ip().is_loopback() {
        log::warn!(
            "status page: listening on {addr} without a password: anyone who can reach this port sees the \
             camera frames and results (set http.username and http.password_file)"
        );
    }
    log::info!("status page on http://{addr}/ (Prometheus: http://{addr}/metrics)");
    let auth = credentials.map(|(user, password)| {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        format!("Basic {token}").into_bytes()
    });
    let now = Instant::now();
    let app = Arc::new(App {
        history: src.pipelines.iter().map(|_| Mutex::new(History::new(now))).collect(),
        page: PAGE.replace("__REFRESH_MS__", &cfg.refresh_ms.to_string()),
        src,
        auth,
        views: Mutex::new(HashMap::new()),
    });
    let router = Router::new()
        .route("/", get(index))
        .route("/api/status", get(status))
        .route("/pipelines/:name/view.svg", get(camera_view))
        .route("/pipelines/:name/latency.svg", get(latency_plot))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(app.clone(), basic_auth))
        .with_state(app.clone());
    let serve = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            log::error!("status page: {e}");
        }
    });
    let sampler = tokio::spawn(async move {
        let mut tick = tokio::time::interval(plot::STEP);
        tick.tick().await;
        loop {
            tick.tick().await;
            let now = Instant::now();
            for (p, h) in app.src.pipelines.iter().zip(&app.history) {
                if let Ok(mut h) = h.lock() {
                    h.sample(&p.metrics, now);
                }
            }
        }
    });
    Ok(Server { addr, tasks: vec![serve, sampler] })
}

/// The page: one file, no framework, nothing from the internet.
const PAGE: &str = include_str!("status.html");

async fn basic_auth(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(want) = &app.auth {
        let got = req.headers().get(header::AUTHORIZATION).map(HeaderValue::as_bytes).unwrap_or_default();
        if !same_bytes(got, want) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Basic realm=\"edgeinfer\", charset=\"UTF-8\"")],
                "a user name and password are needed\n",
            )
                .into_response();
        }
    }
    next.run(req).await
}

/// Compares in time that depends on the lengths only, not on where the bytes differ.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn with_type(content_type: &'static str, body: impl IntoResponse) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-store")], body).into_response()
}

fn not_found(what: String) -> Response {
    (StatusCode::NOT_FOUND, what).into_response()
}

async fn index(State(app): State<Arc<App>>) -> Response {
    with_type("text/html; charset=utf-8", app.page.clone())
}

async fn status(State(app): State<Arc<App>>) -> Response {
    let health = (app.src.health)();
    let mut pipelines = serde_json::Map::new();
    for (p, h) in app.src.pipelines.iter().zip(&app.history) {
        let view = p.latest.view();
        let latest = view.result.as_ref().map(|r| {
            let mut v = crate::payload::result_json(r, None, SystemTime::now());
            // Not published by this route: the page shows what the model said and when.
            if let Some(o) = v.as_object_mut() {
                o.remove("published_at");
                o.remove("published_ms");
            }
            v
        });
        let m = &view.model;
        pipelines.insert(
            p.metrics.name.clone(),
            json!({
                "source": p.source,
                "model": {"name": m.name, "sha256": m.sha256, "quantization": m.quantization, "kernels": m.kernels},
                "latest": latest,
                "frame": view.frame.as_ref().map(|(img, r)| json!({"seq": r.seq, "width": img.width(), "height": img.height()})),
                "recent": h.lock().map(|h| h.recent_json()).unwrap_or(Value::Null),
            }),
        );
    }
    let body = json!({"health": health, "pipelines": pipelines});
    with_type("application/json", serde_json::to_string(&body).unwrap_or_default())
}

fn pipeline_index(app: &App, name: &str) -> Option<usize> {
    app.src.pipelines.iter().position(|p| p.metrics.name == name)
}

async fn camera_view(State(app): State<Arc<App>>, Path(name): Path<String>) -> Response {
    let Some(ix) = pipeline_index(&app, &name) else { return not_found(format!("no pipeline `{name}`\n")) };
    let Some((frame, result)) = app.src.pipelines[ix].latest.view().frame else {
        return not_found(format!("pipeline `{name}` has no frame yet\n"));
    };
    let cached = app.views.lock().ok().and_then(|v| v.get(&ix).filter(|(seq, _)| *seq == result.seq).cloned());
    let svg = match cached {
        Some((_, svg)) => svg,
        None => {
            let seq = result.seq;
            let rendered = tokio::task::spawn_blocking(move || plot::camera_view(&frame, &result)).await;
            let svg: Arc<str> = match rendered {
                Ok(Ok(svg)) => svg.into(),
                Ok(Err(e)) => return (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
                Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
            };
            if let Ok(mut v) = app.views.lock() {
                v.insert(ix, (seq, svg.clone()));
            }
            svg
        }
    };
    with_type("image/svg+xml", svg.to_string())
}

async fn latency_plot(State(app): State<Arc<App>>, Path(name): Path<String>) -> Response {
    let Some(ix) = pipeline_index(&app, &name) else { return not_found(format!("no pipeline `{name}`\n")) };
    let svg = app.history[ix].lock().map(|h| plot::latency_svg(&h, Instant::now())).unwrap_or_default();
    with_type("image/svg+xml", svg)
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let health = (app.src.health)();
    let text = super::prometheus::render(&app.src, &health);
    with_type("text/plain; version=0.0.4; charset=utf-8", text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_compare_whole() {
        assert!(same_bytes(b"Basic abc", b"Basic abc"));
        assert!(!same_bytes(b"Basic abd", b"Basic abc"));
        assert!(!same_bytes(b"Basic ab", b"Basic abc"));
        assert!(!same_bytes(b"", b"Basic abc"));
    }
}
