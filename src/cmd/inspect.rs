//! `edgeinfer inspect`: what a model wants and gives, and how it loads.

use std::io::Write;

use crate::engine::{self, LoadOptions, Model, Origin, TensorSpec};

/// Loads the model (without warm-up) and describes it, as text or JSON.
pub fn run(model: &Model, json: bool, out: &mut dyn Write) -> std::io::Result<()> {
    let info = model.info();
    if json {
        let v = serde_json::json!({
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
            "inputs": model.inputs(),
            "outputs": model.outputs(),
            "op_counts": info.op_counts,
            "rewrites": info.rewrites,
            "value_info_ignored": info.value_info_ignored,
            "optimized_nodes": info.optimized_nodes,
            "optimized_ops": info.optimized_ops,
            "timings_ms": info.timings,
        });
        return writeln!(out, "{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    }
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
    let others: Vec<String> = info.other_opsets.iter().map(|(d, v)| format!("{d} {v}")).collect();
    writeln!(
        out,
        "opset        {}{}",
        info.opset,
        if others.is_empty() { String::new() } else { format!(" (+ {})", others.join(", ")) }
    )?;
    writeln!(out, "quantization {}", info.quantization)?;
    writeln!(out, "kernels      {}", info.int8_path)?;
    writeln!(out, "inputs")?;
    for s in model.inputs() {
        writeln!(out, "  {}", describe(s))?;
    }
    writeln!(out, "outputs")?;
    for s in model.outputs() {
        writeln!(out, "  {}", describe(s))?;
    }
    let ops: Vec<String> = info.op_counts.iter().map(|(op, n)| format!("{op} {n}")).collect();
    writeln!(out, "operators    {} nodes: {}", info.op_counts.values().sum::<usize>(), ops.join(", "))?;
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
        writeln!(out, "depthwise    {ours} convolutions on edgeinfer's 3x3 kernel, {tracts} on tract's")?;
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

fn describe(s: &TensorSpec) -> String {
    let q =
        s.quantization.map(|q| format!("  quant scale {} zero_point {}", q.scale, q.zero_point)).unwrap_or_default();
    format!("{:<16} {} {:?}{q}", s.name, s.elem_type, s.shape)
}

/// Load options for inspection: no warm-up, since only the structure matters.
pub fn load_options(mut opts: LoadOptions) -> LoadOptions {
    opts.skip_warmup = true;
    opts
}
