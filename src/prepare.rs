//! Start-up checks of the daemon and `edgeinfer check`: each pipeline's model
//! loaded and its stages fitted to it ([`Prepared`]), the outputs' conditions
//! checked against what the postprocess gives, the MQTT TLS files read. The
//! daemon (`pipeline`) and a model reload (`commands`) both prepare here.

use std::sync::Arc;

use anyhow::{anyhow, Context};

use crate::config::{Config, PipelineConfig, When};
use crate::engine::symbolic::Unpinned;
use crate::engine::{EngineError, LoadOptions, Model};
use crate::postprocess::results::Postprocessor;
use crate::preprocess::stage::Preprocessor;

/// A pipeline whose model is loaded and whose stages fit it.
pub struct Prepared {
    /// Its configuration.
    pub cfg: PipelineConfig,
    /// The loaded model.
    pub model: Arc<Model>,
    /// Preprocessing, checked against the model input.
    pub pre: Preprocessor,
    /// Postprocessing, checked against the model outputs.
    pub post: Postprocessor,
    /// Labels in use.
    pub labels: Vec<String>,
}

/// Loads a pipeline's model and builds its stages; errors name the pipeline.
pub fn prepare(cfg: &Config, p: &PipelineConfig) -> anyhow::Result<Prepared> {
    let ctx = |what: &str| format!("pipeline `{}`: {what}", p.name);
    let model_path = cfg.resolve(&p.model);
    let mut opts = LoadOptions {
        qdq_as_float: p.qdq_as_float,
        threads: p.threads.unwrap_or(cfg.engine.threads),
        cache_dir: cfg.engine.cache_dir.as_ref().map(|d| cfg.resolve(d)),
        ..Default::default()
    };
    if let Some(shape) = &p.input_shape {
        opts.input_shapes.insert(String::new(), shape.clone());
    }
    let model = Model::load(&model_path, &opts).map_err(|e| match e {
        EngineError::Unpinned { path, inputs } => unpinned_in_config(&ctx("model"), &path, &inputs),
        other => anyhow::Error::new(other).context(ctx("model")),
    })?;
    if model.inputs().len() != 1 {
        return Err(anyhow!(
            "{}: the daemon feeds single-input models; this one has {}",
            ctx("model"),
            model.inputs().len()
        ));
    }
    let labels_path =
        p.labels.as_ref().map(|l| cfg.resolve(l)).or_else(|| crate::postprocess::find_labels(&model_path));
    let labels = match &labels_path {
        Some(path) => {
            crate::postprocess::read_labels(path).with_context(|| ctx(&format!("labels {}", path.display())))?
        }
        None => Vec::new(),
    };
    let pre = Preprocessor::new(&p.preprocess, &model.inputs()[0], &p.source.output())
        .map_err(|e| anyhow!("{}: {e}", ctx("preprocess")))?;
    let post = Postprocessor::new(p.postprocess.as_ref(), model.outputs(), labels.clone())
        .map_err(|e| anyhow!("{}: {e}", ctx("postprocess")))?;
    let classify = matches!(post.kind_name(), "classify");
    let scored = classify || post.anomaly_threshold().is_some();
    for (ix, o) in p.outputs.iter().enumerate() {
        let key = ctx(&format!("outputs[{ix}]"));
        if let Some(class) = &o.class {
            if o.when != When::Threshold {
                return Err(anyhow!("{key}: `class` only applies to when = \"threshold\""));
            }
            if !classify {
                return Err(anyhow!("{key}: `class` needs a classify postprocess (this one is {})", post.kind_name()));
            }
            if post.label_index(class).is_none() {
                return Err(anyhow!("{key}: class `{class}` is not among the labels {labels:?}"));
            }
        }
        if o.when == When::OnChange && !(classify || post.kind_name() == "detect") {
            return Err(anyhow!(
                "{key}: when = \"on_change\" needs a classify or detect postprocess (this one is {})",
                post.kind_name()
            ));
        }
        if o.when == When::Threshold && !scored {
            return Err(anyhow!(
                "{key}: when = \"threshold\" needs a classify or anomaly postprocess (this one is {})",
                post.kind_name()
            ));
        }
    }
    // A session is what each worker makes first; fail at start-up, not in the worker.
    model.session().with_context(|| ctx("model"))?;
    Ok(Prepared { cfg: p.clone(), model: Arc::new(model), pre, post, labels })
}

/// The error for a model left with symbolic dimensions, said the way a
/// config pins them: `input_shape`, which gives the first input's shape.
fn unpinned_in_config(ctx: &str, path: &str, inputs: &[Unpinned]) -> anyhow::Error {
    let what: Vec<String> = inputs.iter().map(|u| format!("input `{}`: {}", u.input, u.what())).collect();
    match inputs {
        [only] if only.index == 0 => anyhow!(
            "{ctx}: {path}: {}; set {} in this pipeline{}",
            what.join("; "),
            only.config_example(),
            crate::engine::symbolic::sizes_clause(&only.placeholders())
        ),
        // `input_shape` pins only the first input, and the daemon feeds single-input models anyway.
        _ => anyhow!("{ctx}: {path}: {}; the daemon feeds single-input models", what.join("; ")),
    }
}

/// `edgeinfer check`: validates the config and loads every model; one line per pipeline.
pub fn check(cfg: &Config) -> anyhow::Result<Vec<String>> {
    let mut lines = Vec::new();
    for p in &cfg.pipelines {
        let prepared = prepare(cfg, p)?;
        let input = &prepared.model.inputs()[0];
        let outputs: Vec<String> = p.outputs.iter().map(|o| format!("{:?}", o.kind).to_lowercase()).collect();
        lines.push(format!(
            "pipeline `{}`: {} source -> {} {:?} ({}, {:.0} ms to load) -> {}",
            p.name,
            p.source.kind(),
            input.name,
            input.shape,
            prepared.model.info().quantization,
            prepared.model.info().timings.init_ms() + prepared.model.info().timings.warmup_ms,
            outputs.join(", ")
        ));
    }
    match &cfg.mqtt.url {
        Some(url) => lines.push(format!("mqtt: {url}")),
        None if cfg.wants_mqtt() => {
            lines.push(format!("mqtt: embedded broker on {}", cfg.broker.listen));
            // Reads the certificate and key, and checks that they belong together.
            #[cfg(feature = "tls")]
            if let Some(t) = &cfg.broker.tls {
                crate::sink::mqtt_tls::server(t, &|p| cfg.resolve(p)).map_err(anyhow::Error::msg)?;
                lines.push(format!("broker tls: {} ({})", t.listen, cfg.resolve(&t.cert_file).display()));
            }
        }
        None => lines.push("mqtt: none (no MQTT output, source or commands)".into()),
    }
    // Reads and parses the CA, certificate and key files (no connection).
    if let Some(tls) = load_tls(cfg)? {
        lines.push(format!("mqtt tls: {}", tls.summary));
    }
    Ok(lines)
}

/// The TLS client configuration for an `mqtts://` URL (None for `mqtt://` and the embedded broker).
pub(crate) fn load_tls(cfg: &Config) -> anyhow::Result<Option<crate::sink::mqtt_tls::Tls>> {
    match &cfg.mqtt.url {
        Some(url) if crate::config::is_tls_url(url) => {
            let settings = cfg.mqtt.tls.clone().unwrap_or_default();
            Ok(Some(crate::sink::mqtt_tls::load(&settings, &|p| cfg.resolve(p))?))
        }
        _ => Ok(None),
    }
}
