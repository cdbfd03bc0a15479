//! `edgeinfer inspect`: what a model wants and gives, and how it loads.
//!
//! Any loadable model is described as its file declares it, symbolic
//! dimensions by name: that is where a user finds out which shape to pin,
//! so it cannot ask for one first. When the given shapes and batch pin every
//! input dimension, the model is also loaded (without warm-up) and its
//! kernels, plan and load time reported.

use std::io::Write;
use std::path::Path;

use serde_json::{json, Value};

use crate::engine::symbolic::{self, shape_text, Description, ShapeDim, SymbolicDim, Unpinned};
use crate::engine::{self, EngineError, LoadOptions, Model, Origin, TensorSpec};

/// What `inspect` found: the declaration, and the loaded model once pinned.
pub struct Report {
    /// The ONNX file's declaration (`None` for a converted model, pinned when converted).
    pub description: Option<Description>,
    /// Every symbolic input dimension and the size the options give it.
    pub symbolic_dims: Vec<SymbolicDim>,
    /// Inputs the options leave with symbolic dimensions.
    pub unpinned: Vec<Unpinned>,
    /// The model, loaded and optimised; `None` while some dimension is unpinned.
    pub model: Option<Model>,
}

/// Reads the model, and loads it without warm-up when `opts` pin every input dimension.
pub fn inspect(path: &Path, opts: &LoadOptions) -> Result<Report, EngineError> {
    let description = engine::describe(path, opts)?;
    let (symbolic_dims, unpinned) =
        match &description {
            Some(d) => {
                let names = d.inputs.iter().map(|t| t.name.as_str());
                symbolic::check_shape_names(names, &opts.input_shapes).map_err(|(input, reason)| {
                    EngineError::Shape { path: path.display().to_string(), input, reason }
                })?;
                let inputs = || d.inputs.iter().map(|t| (t.name.as_str(), t.shape.as_deref()));
                (
                    symbolic::symbolic_dims(inputs(), &opts.input_shapes, opts.batch),
                    symbolic::unpinned(inputs(), &opts.input_shapes, opts.batch),
                )
            }
            None => (Vec::new(), Vec::new()),
        };
    let model = if unpinned.is_empty() { Some(Model::load(path, &load_options(opts.clone()))?) } else { None };
    Ok(Report { description, symbolic_dims, unpinned, model })
}

/// Load options for inspection: no warm-up, since only the structure matters.
pub fn load_options(mut opts: LoadOptions) -> LoadOptions {
    opts.skip_warmup = true;
    opts
}

/// Writes the report as text or as one JSON object.
pub fn print(report: &Report, json: bool, out: &mut dyn Write) -> std::io::Result<()> {
    if json {
        let v = to_json(report);
        return writeln!(out, "{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    match (&report.model, &report.description) {
        (Some(model), _) => print_loaded(model, report, out),
        (None, Some(d)) => print_declared(d, report, out),
        (None, None) => Ok(()),
    }
}

/// `--input-shape` flags (and, for a single-input model, the config key) that pin what is open.
fn pin_example(unpinned: &[Unpinned]) -> Option<(String, Option<String>)> {
    if unpinned.is_empty() {
        return None;
    }
    let cli: Vec<String> = unpinned.iter().map(|u| format!("--input-shape {}", u.cli_example())).collect();
    // `input_shape` pins a pipeline's one input; the daemon feeds no other kind of model.
    let config = match unpinned {
        [only] if only.index == 0 => Some(only.config_example()),
        _ => None,
    };
    Some((cli.join(" "), config))
}

fn to_json(report: &Report) -> Value {
    let pin_example = pin_example(&report.unpinned).map(|(cli, config)| json!({ "cli": cli, "config": config }));
    let d = report.description.as_ref();
    let Some(model) = &report.model else {
        let Some(d) = d else { return json!({}) };
        // Not loaded: `shape` is the declaration, symbols and all.
        return json!({
            "model": d.name,
            "path": d.path,
            "sha256": d.sha256,
            "size_bytes": d.size_bytes,
            "onnx_path": d.path,
            "origin": Origin::Onnx,
            "producer": d.producer,
            "opset": d.opset,
            "other_opsets": d.other_opsets,
            "quantization": d.quantization,
            "pinned": false,
            "inputs": d.inputs,
            "outputs": d.outputs,
            "outputs_analysed": d.outputs_analysed,
            "symbolic_dims": report.symbolic_dims,
            "pin_example": pin_example,
            "op_counts": d.op_counts,
            "rewrites": d.rewrites,
            "value_info_ignored": d.value_info_ignored,
        });
    };
    // A pinned tensor's declaration, where it has symbols (else it is `shape` again).
    let with_declared = |spec: &TensorSpec, list: Option<&Vec<symbolic::DeclaredTensor>>| {
        let mut v = json!(spec);
        if let (Some(obj), Some(dims)) = (v.as_object_mut(), symbolic_declaration(&spec.name, list)) {
            obj.insert("declared_shape".into(), json!(dims));
        }
        v
    };
    let info = model.info();
    let inputs: Vec<Value> = model.inputs().iter().map(|s| with_declared(s, d.map(|d| &d.inputs))).collect();
    let outputs: Vec<Value> = model.outputs().iter().map(|s| with_declared(s, d.map(|d| &d.outputs))).collect();
    json!({
        "model": info.name,
        "path": info.path,
        "sha256": info.sha256,
        "size_bytes": info.size_bytes,
        "onnx_path": info.onnx_path,
        "origin": info.origin,
        "cache": info.cache,
        "threads": info.threads,
        "producer": info.producer,
        "opset": info.opset,
        "other_opsets": info.other_opsets,
        "quantization": info.quantization,
        "int8_path": info.int8_path,
        "isa": engine::isa::Isa::current().name(),
        "pinned": true,
        "inputs": inputs,
        "outputs": outputs,
        "outputs_analysed": d.map(|d| d.outputs_analysed),
        "symbolic_dims": report.symbolic_dims,
        "pin_example": pin_example,
        "op_counts": info.op_counts,
        "rewrites": info.rewrites,
        "value_info_ignored": info.value_info_ignored,
        "optimized_nodes": info.optimized_nodes,
        "optimized_ops": info.optimized_ops,
        "timings_ms": info.timings,
    })
}

fn opset_line(opset: i64, others: &std::collections::BTreeMap<String, i64>) -> String {
    let others: Vec<String> = others.iter().map(|(d, v)| format!("{d} {v}")).collect();
    let others = if others.is_empty() { String::new() } else { format!(" (+ {})", others.join(", ")) };
    format!("opset        {opset}{others}")
}

fn operators_line(op_counts: &std::collections::BTreeMap<String, usize>) -> String {
    let ops: Vec<String> = op_counts.iter().map(|(op, n)| format!("{op} {n}")).collect();
    format!("operators    {} nodes: {}", op_counts.values().sum::<usize>(), ops.join(", "))
}

fn quant_text(q: Option<engine::QuantParams>) -> String {
    q.map(|q| format!("  quant scale {} zero_point {}", q.scale, q.zero_point)).unwrap_or_default()
}

/// A tensor line of a model that is not loaded: its declared shape.
fn declared_line(t: &symbolic::DeclaredTensor) -> String {
    let shape = t.shape.as_deref().map(shape_text).unwrap_or_else(|| "(no shape declared)".into());
    format!("{:<16} {} {shape}{}", t.name, t.elem_type, quant_text(t.quantization))
}

/// The declared shape of tensor `name` when it has symbolic dimensions.
fn symbolic_declaration<'a>(name: &str, declared: Option<&'a Vec<symbolic::DeclaredTensor>>) -> Option<&'a [ShapeDim]> {
    declared
        .and_then(|l| l.iter().find(|t| t.name == name))
        .and_then(|t| t.shape.as_deref())
        .filter(|dims| dims.iter().any(|d| matches!(d, ShapeDim::Symbolic(_))))
}

/// A tensor line of a loaded model: its pinned shape, and the declared one where that has symbols.
fn loaded_line(s: &TensorSpec, declared: Option<&Vec<symbolic::DeclaredTensor>>) -> String {
    let symbols = symbolic_declaration(&s.name, declared)
        .map(|dims| format!("  declared {}", shape_text(dims)))
        .unwrap_or_default();
    format!("{:<16} {} {:?}{symbols}{}", s.name, s.elem_type, s.shape, quant_text(s.quantization))
}

/// The text for a model whose symbolic dimensions are not all pinned.
fn print_declared(d: &Description, report: &Report, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(out, "model        {} ({} bytes, sha256 {})", d.path.display(), d.size_bytes, &d.sha256[..16])?;
    writeln!(out, "producer     {}", if d.producer.is_empty() { "-" } else { &d.producer })?;
    writeln!(out, "{}", opset_line(d.opset, &d.other_opsets))?;
    writeln!(out, "quantization {}", d.quantization)?;
    writeln!(out, "inputs")?;
    for t in &d.inputs {
        writeln!(out, "  {}", declared_line(t))?;
    }
    writeln!(out, "outputs")?;
    for t in &d.outputs {
        writeln!(out, "  {}", declared_line(t))?;
    }
    writeln!(out, "{}", operators_line(&d.op_counts))?;
    for r in &d.rewrites {
        writeln!(out, "rewrite      {r}")?;
    }
    if d.value_info_ignored {
        writeln!(out, "note         the model's value_info conflicted with its graph and was ignored")?;
    }
    if !d.outputs_analysed {
        writeln!(out, "note         output shapes as the file declares them: tract cannot work them out unpinned")?;
    }
    for (ix, u) in report.unpinned.iter().enumerate() {
        let label = if ix == 0 { "to pin      " } else { "            " };
        writeln!(out, "{label} {}", to_pin_text(u, &report.symbolic_dims))?;
    }
    if let Some((cli, config)) = pin_example(&report.unpinned) {
        writeln!(out, "example      {cli}")?;
        if let Some(config) = config {
            writeln!(out, "             {config}  (in a pipeline's config)")?;
        }
        let mut sizes: Vec<String> = Vec::new();
        for p in report.unpinned.iter().flat_map(Unpinned::placeholders) {
            if !sizes.contains(&p) {
                sizes.push(p);
            }
        }
        if !sizes.is_empty() {
            writeln!(out, "             {}: the sizes to run at", sizes.join(", "))?;
        }
    }
    writeln!(out, "not loaded   kernels, plan and load time need every dimension pinned")?;
    Ok(())
}

/// `image: height (dim 2), width (dim 3); batch (dim 0) = 1 (--batch)`.
fn to_pin_text(u: &Unpinned, dims: &[SymbolicDim]) -> String {
    if u.declared.is_none() {
        return format!("{}: the whole shape (the model declares none)", u.input);
    }
    let open: Vec<String> = u.open_axes().iter().map(|&(axis, name)| dim_label(name, axis)).collect();
    let batch = dims
        .iter()
        .find(|d| d.input == u.input && d.axis == 0)
        .and_then(|d| d.size.map(|size| format!("; {} = {size} (--batch)", dim_label(&d.name, 0))))
        .unwrap_or_default();
    format!("{}: {}{batch}", u.input, open.join(", "))
}

/// `height (dim 2)`, or `dim 2` for a dimension the model gives no name.
fn dim_label(name: &str, axis: usize) -> String {
    if name == symbolic::UNNAMED {
        format!("dim {axis}")
    } else {
        format!("{name} (dim {axis})")
    }
}

/// The text for a loaded model: what it declares and how it was pinned, kernels, plan and load time.
fn print_loaded(model: &Model, report: &Report, out: &mut dyn Write) -> std::io::Result<()> {
    let info = model.info();
    let declared = report.description.as_ref();
    match info.origin {
        Origin::Converted => {
            writeln!(out, "model        {} (converted)", info.path.display())?;
            writeln!(
                out,
                "from         {} ({} bytes, sha256 {})",
                info.onnx_path.display(),
                info.size_bytes,
                &info.sha256[..16]
            )?;
        }
        _ => writeln!(
            out,
            "model        {} ({} bytes, sha256 {})",
            info.path.display(),
            info.size_bytes,
            &info.sha256[..16]
        )?,
    }
    if let Some(cache) = &info.cache {
        writeln!(out, "cache        {cache}")?;
    }
    writeln!(out, "producer     {}", if info.producer.is_empty() { "-" } else { &info.producer })?;
    writeln!(out, "{}", opset_line(info.opset, &info.other_opsets))?;
    writeln!(out, "quantization {}", info.quantization)?;
    writeln!(out, "kernels      {}", info.int8_path)?;
    writeln!(out, "inputs")?;
    for s in model.inputs() {
        writeln!(out, "  {}", loaded_line(s, declared.map(|d| &d.inputs)))?;
    }
    writeln!(out, "outputs")?;
    for s in model.outputs() {
        writeln!(out, "  {}", loaded_line(s, declared.map(|d| &d.outputs)))?;
    }
    writeln!(out, "{}", operators_line(&info.op_counts))?;
    for r in &info.rewrites {
        writeln!(out, "rewrite      {r}")?;
    }
    if info.value_info_ignored {
        writeln!(out, "note         the model's value_info conflicted with its graph and was ignored")?;
    }
    writeln!(out, "optimized    {} nodes in tract's plan", info.optimized_nodes)?;
    let count = |op: &str| info.optimized_ops.get(op).copied().unwrap_or(0);
    let (ours, tracts) = (count(engine::DEPTHWISE_OP), count(engine::TRACT_DEPTHWISE_OP));
    if ours + tracts > 0 {
        writeln!(out, "depthwise    {ours} convolutions on edgeinfer's kernels (3x3, 5x5), {tracts} on tract's")?;
    }
    let int8_convs = count(engine::INT8_CONV_OP);
    if int8_convs > 0 {
        let noun = if int8_convs == 1 { "convolution" } else { "convolutions" };
        let isa = engine::isa::Isa::current().describe();
        writeln!(out, "int8 convs   {int8_convs} {noun} on edgeinfer's integer kernels ({isa})")?;
    }
    let pointwise = count(engine::POINTWISE_OP);
    if pointwise > 0 {
        let noun = if pointwise == 1 { "convolution" } else { "convolutions" };
        writeln!(out, "1x1 convs    {pointwise} float {noun} on edgeinfer's 1x1 kernel (AVX-512)")?;
    }
    let t = info.timings;
    writeln!(
        out,
        "load         {:.1} ms (read {:.1}, analyse {:.1}, optimize {:.1})",
        t.init_ms(),
        t.read_ms,
        t.analyse_ms,
        t.optimize_ms
    )?;
    Ok(())
}
