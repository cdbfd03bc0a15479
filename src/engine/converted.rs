//! Converted models: tract's typed graph serialised as NNEF (with tract's core
//! and ONNX-operator extensions) in a tar archive, gzipped as `.nnef.tgz` or
//! plain as `.nnef.tar`, plus one entry of our own, `edgeinfer.json`, that
//! keeps what NNEF does not: the ONNX names of inputs and outputs, their
//! quantization, how the shapes were pinned and the original file's facts.
//!
//! Loading one needs no ONNX parser: only tract-core, tract-nnef and
//! tract-onnx-opl, which is what a runtime-only build keeps. The sidecar is the
//! archive's first entry so it is read without unpacking the rest; tract's
//! NNEF reader skips files it has no loader for, so the archive stays a valid
//! NNEF model for tract's own tools.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use tract_core::prelude::{Framework, TypedModel};
use tract_onnx_opl::WithOnnx;

use super::{tract_err, ModelMeta, TRACT_VERSION};

/// The sidecar's name inside the archive.
pub const SIDECAR: &str = "edgeinfer.json";

/// Version of the sidecar layout; a reader refuses newer ones.
pub const FORMAT: u32 = 1;

/// The tar mtime of every entry (1980-01-01), so that converting twice gives the same bytes.
const MTIME: u64 = 315_532_800;

/// The `edgeinfer.json` entry.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct Sidecar {
    /// [`FORMAT`] of the writer.
    pub format: u32,
    /// edgeinfer that wrote the archive.
    pub edgeinfer_version: String,
    /// tract that wrote the archive.
    pub tract_version: String,
    /// The ONNX facts and pinned shapes.
    pub meta: ModelMeta,
}

/// True for a path whose name says it is a converted model.
pub fn is_converted(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    name.ends_with(".nnef.tgz") || name.ends_with(".nnef.tar")
}

/// The name a converted model goes by: its file name without `.nnef.tgz` / `.nnef.tar`.
pub fn stem(path: &Path) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let lower = name.to_lowercase();
    for ext in [".nnef.tgz", ".nnef.tar"] {
        if lower.ends_with(ext) {
            return name[..name.len() - ext.len()].to_string();
        }
    }
    name
}

/// NNEF with the operator sets an ONNX model can reach in tract, and ours (`nnef_ops`).
fn framework() -> tract_nnef::framework::Nnef {
    let mut nnef = tract_nnef::nnef().with_onnx().with_registry(super::nnef_ops::registry());
    // ONNX tensor names ("input.1", "serving_default:0") are not NNEF identifiers.
    nnef.allow_extended_identifier_syntax(true);
    nnef
}

/// [`framework`] for reading only. tract's `Nnef::default()` parses tract's
/// NNEF standard library text for its writer, and its `tract_nnef` registry
/// parses that text again; a reader needs only the registry. Building it by
/// hand skips one of the two parses, most of the fixed cost of loading a
/// small converted or cached model. A test checks it stays the default's twin.
fn reader() -> tract_nnef::framework::Nnef {
    use tract_nnef::resource::{DatLoader, GraphNnefLoader, GraphQuantLoader, ResourceLoader, TypedModelLoader};
    tract_nnef::framework::Nnef {
        stdlib: Vec::new(),
        registries: vec![tract_nnef::ops::tract_nnef(), tract_nnef::ops::tract_core()],
        resource_loaders: vec![
            GraphNnefLoader.into_boxed(),
            DatLoader.into_boxed(),
            GraphQuantLoader.into_boxed(),
            TypedModelLoader::new(false).into_boxed(),
        ],
        allow_extended_identifier_syntax: true,
        extern_all_constants: false,
    }
    .with_onnx()
    .with_registry(super::nnef_ops::registry())
}

/// Writes the sidecar entry, then tract's NNEF entries, as one tar stream.
fn write_archive(model: &TypedModel, sidecar: &Sidecar, mut w: impl Write) -> Result<(), String> {
    let json = serde_json::to_vec_pretty(sidecar).map_err(|e| e.to_string())?;
    let mut header = tar::Header::new_gnu();
    header.set_path(SIDECAR).map_err(|e| e.to_string())?;
    header.set_size(json.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(MTIME);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    // tract's writer owns its tar builder, which ends the archive; our entry goes
    // before it as raw tar blocks (header, data, zero padding to 512 bytes).
    let pad = (512 - json.len() % 512) % 512;
    w.write_all(header.as_bytes())
        .and_then(|_| w.write_all(&json))
        .and_then(|_| w.write_all(&vec![0u8; pad]))
        .map_err(|e| e.to_string())?;
    framework().write_to_tar_with_config(model, &mut w, false, true).map_err(tract_err)?;
    w.flush().map_err(|e| e.to_string())
}

/// Serialises a typed model and its meta into `out` (gzipped when `compress`),
/// through a temporary file and a rename, so a reader never sees half a file.
/// Returns the size written.
pub(super) fn write_file(model: &TypedModel, meta: &ModelMeta, out: &Path, compress: bool) -> Result<u64, String> {
    let sidecar = Sidecar {
        format: FORMAT,
        edgeinfer_version: env!("CARGO_PKG_VERSION").into(),
        tract_version: TRACT_VERSION.into(),
        meta: meta.clone(),
    };
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(
        ".{file_name}.tmp-{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
    ));
    let result = (|| {
        let file = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        let mut buffered = std::io::BufWriter::new(file);
        if compress {
            let mut gz = flate2::write::GzEncoder::new(&mut buffered, flate2::Compression::default());
            write_archive(model, &sidecar, &mut gz)?;
            gz.finish().map_err(|e| e.to_string())?;
        } else {
            write_archive(model, &sidecar, &mut buffered)?;
        }
        let file = buffered.into_inner().map_err(|e| e.to_string())?;
        file.sync_all().map_err(|e| e.to_string())?;
        let size = file.metadata().map_err(|e| e.to_string())?.len();
        std::fs::rename(&tmp, out).map_err(|e| format!("renaming into {}: {e}", out.display()))?;
        Ok(size)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// What reading an archive gave, with its two stages timed.
pub(super) struct Unpacked {
    pub model: TypedModel,
    pub sidecar: Sidecar,
    /// Unpacking: the sidecar, the NNEF text and the weights.
    pub unpack_ms: f64,
    /// Building tract's graph from the NNEF document.
    pub build_ms: f64,
}

/// Reads a converted model from its bytes (gzipped or not).
pub(super) fn read(bytes: &[u8]) -> Result<Unpacked, String> {
    let t = std::time::Instant::now();
    let sidecar = read_sidecar(bytes)?;
    if sidecar.format > FORMAT {
        return Err(format!(
            "its {SIDECAR} has format {} and this edgeinfer reads up to {FORMAT}; convert it again with this version",
            sidecar.format
        ));
    }
    let nnef = reader();
    let proto = nnef.proto_model_for_read(&mut &bytes[..]).map_err(tract_err)?;
    let unpack_ms = super::ms(t.elapsed());
    let t = std::time::Instant::now();
    let model = nnef.model_for_proto_model(&proto).map_err(tract_err)?;
    let build_ms = super::ms(t.elapsed());
    let (ins, outs) = (model.inputs.len(), model.outputs.len());
    if ins != sidecar.meta.inputs.len() || outs != sidecar.meta.outputs.len() {
        return Err(format!(
            "the NNEF graph has {ins} input(s) and {outs} output(s), its {SIDECAR} names {} and {}",
            sidecar.meta.inputs.len(),
            sidecar.meta.outputs.len()
        ));
    }
    Ok(Unpacked { model, sidecar, unpack_ms, build_ms })
}

fn read_sidecar(bytes: &[u8]) -> Result<Sidecar, String> {
    let stream: Box<dyn Read + '_> =
        if bytes.starts_with(&[0x1f, 0x8b]) { Box::new(flate2::read::GzDecoder::new(bytes)) } else { Box::new(bytes) };
    let mut archive = tar::Archive::new(stream);
    let mut entries = archive.entries().map_err(|e| format!("not a tar archive: {e}"))?;
    let mut first = match entries.next() {
        Some(entry) => entry.map_err(|e| format!("not a tar archive: {e}"))?,
        None => return Err("empty archive".into()),
    };
    let name = first.path().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    if name.trim_start_matches("./") != SIDECAR {
        return Err(format!(
            "no {SIDECAR} first in the archive (found `{name}`): not made by `edgeinfer convert`; an NNEF model from elsewhere lacks the input names and pinned shapes edgeinfer needs"
        ));
    }
    let mut text = String::new();
    first.read_to_string(&mut text).map_err(|e| format!("{SIDECAR}: {e}"))?;
    serde_json::from_str(&text).map_err(|e| format!("{SIDECAR}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reader_is_the_default_framework_without_the_writers_stdlib() {
        let (full, reader) = (framework(), reader());
        assert!(!full.stdlib.is_empty() && reader.stdlib.is_empty());
        let ids = |n: &tract_nnef::framework::Nnef| n.registries.iter().map(|r| r.id.0.to_string()).collect::<Vec<_>>();
        assert_eq!(ids(&reader), ids(&full));
        let loaders = |n: &tract_nnef::framework::Nnef| {
            n.resource_loaders.iter().map(|l| l.name().to_string()).collect::<Vec<_>>()
        };
        assert_eq!(loaders(&reader), loaders(&full));
        assert_eq!(reader.allow_extended_identifier_syntax, full.allow_extended_identifier_syntax);
        assert_eq!(reader.extern_all_constants, full.extern_all_constants);
    }
}
