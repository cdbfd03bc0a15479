//! `edgeinfer convert`: an ONNX model into an analysed NNEF file that boards
//! load faster and without the ONNX parser (see `engine::convert`).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::engine::Converted;

/// `model.onnx` -> `model.nnef.tgz`, next to it.
pub fn default_output(model: &Path) -> PathBuf {
    let stem = model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    model.with_file_name(format!("{stem}.nnef.tgz"))
}

/// Reports what was written and how the converted file loads, as text or JSON.
pub fn print(onnx: &Path, c: &Converted, json: bool, out: &mut dyn Write) -> std::io::Result<()> {
    let info = c.model.info();
    let t = info.timings;
    if json {
        let v = serde_json::json!({
            "output": c.path,
            "size_bytes": c.size_bytes,
            "onnx": onnx,
            "onnx_sha256": info.sha256,
            "onnx_size_bytes": info.size_bytes,
            "convert_ms": c.convert_ms,
            "inputs": c.model.inputs(),
            "outputs": c.model.outputs(),
            "int8_path": info.int8_path,
            "load_ms": t.init_ms(),
            "timings_ms": t,
        });
        return writeln!(out, "{}", serde_json::to_string(&v).unwrap_or_default());
    }
    writeln!(
        out,
        "wrote {} ({} bytes) from {} ({} bytes, sha256 {}) in {:.0} ms",
        c.path.display(),
        c.size_bytes,
        onnx.display(),
        info.size_bytes,
        &info.sha256[..16.min(info.sha256.len())],
        c.convert_ms
    )?;
    for s in c.model.inputs() {
        writeln!(out, "  input  {} {} {:?}", s.name, s.elem_type, s.shape)?;
    }
    for s in c.model.outputs() {
        writeln!(out, "  output {} {} {:?}", s.name, s.elem_type, s.shape)?;
    }
    writeln!(
        out,
        "loads in {:.1} ms (read {:.1}, analyse {:.1}, optimize {:.1}), then a first inference of {:.1} ms",
        t.init_ms(),
        t.read_ms,
        t.analyse_ms,
        t.optimize_ms,
        t.warmup_ms
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_output_replaces_the_extension() {
        assert_eq!(default_output(Path::new("models/m_int8.onnx")), Path::new("models/m_int8.nnef.tgz"));
        assert_eq!(default_output(Path::new("m")), Path::new("m.nnef.tgz"));
    }
}
