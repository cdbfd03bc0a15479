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

use std::io::{Read, Seek, SeekFrom, Write};
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

/// Reads a converted model (gzipped or not) from `src`, streaming: the weights
/// go from the file straight into their tensors, and the NNEF text is parsed
/// on a second thread while they are read (tract's parser takes about as long
/// as reading MobileNetV2's weights). An archive with entries this reader does
/// not know (a sub-model directory) is read again from the start by tract's
/// own reader.
pub(super) fn read<R: Read + Seek>(mut src: R) -> Result<Unpacked, String> {
    let t = std::time::Instant::now();
    let mut magic = Vec::with_capacity(2);
    (&mut src).take(2).read_to_end(&mut magic).map_err(|e| e.to_string())?;
    src.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    // Building the reader's operator registries takes a few milliseconds of
    // its own; it overlaps the unpacking, which does not need them.
    let (nnef, unpacked) = std::thread::scope(|scope| {
        let building = scope.spawn(reader);
        let buffered = std::io::BufReader::with_capacity(1 << 16, &mut src);
        let stream: Box<dyn Read + '_> =
            if magic == [0x1f, 0x8b] { Box::new(flate2::read::GzDecoder::new(buffered)) } else { Box::new(buffered) };
        let unpacked = unpack(stream, MAX_UNPACKED);
        (building.join(), unpacked)
    });
    let nnef = nnef.map_err(|p| format!("building the NNEF reader: {}", super::panic_text(p)))?;
    let (sidecar, proto) = unpacked?;
    let proto = match proto {
        Some(proto) => proto,
        None => {
            // tract's reader, but fed the unpacked tar through the same cap (it would
            // otherwise unpack a gzip bomb by itself). Its tensors are not checked by
            // `check_tensor_header`: that is tract's reader.
            src.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
            let buffered = std::io::BufReader::with_capacity(1 << 16, &mut src);
            let stream: Box<dyn Read + '_> = if magic == [0x1f, 0x8b] {
                Box::new(flate2::read::GzDecoder::new(buffered))
            } else {
                Box::new(buffered)
            };
            let capped = Capped { inner: stream, left: MAX_UNPACKED, cap: MAX_UNPACKED };
            nnef.proto_model_for_read(&mut std::io::BufReader::new(capped)).map_err(tract_err)?
        }
    };
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

/// The sidecar, then tract's NNEF document as tract's reader would build it
/// from the same archive; `None` for the document when the archive holds an
/// entry other than `graph.nnef`, `graph.quant` and `.dat` tensors (a
/// sub-model directory, say), which only tract's reader assembles.
fn unpack(stream: impl Read, cap: u64) -> Result<(Sidecar, Option<tract_nnef::ast::ProtoModel>), String> {
    use std::collections::HashMap;
    use std::sync::Arc;
    use tract_nnef::ast::{Identifier, ProtoModel};
    use tract_nnef::resource::{GraphQuantLoader, Resource, ResourceLoader, GRAPH_NNEF_FILENAME, GRAPH_QUANT_FILENAME};

    let mut archive = tar::Archive::new(Capped { inner: stream, left: cap, cap });
    let mut entries = archive.entries().map_err(|e| format!("not a tar archive: {e}"))?;
    let sidecar = match entries.next() {
        Some(entry) => read_sidecar(entry.map_err(|e| format!("not a tar archive: {e}"))?)?,
        None => return Err("empty archive".into()),
    };
    if sidecar.format > FORMAT {
        return Err(format!(
            "its {SIDECAR} has format {} and this edgeinfer reads up to {FORMAT}; convert it again with this version",
            sidecar.format
        ));
    }
    let mut tensors = HashMap::new();
    let mut resources: HashMap<String, Arc<dyn Resource>> = HashMap::new();
    // The loader takes a framework it does not use; an empty one costs nothing to build.
    let empty = tract_nnef::framework::Nnef {
        stdlib: Vec::new(),
        registries: Vec::new(),
        resource_loaders: Vec::new(),
        allow_extended_identifier_syntax: true,
        extern_all_constants: false,
    };
    let doc = std::thread::scope(|scope| {
        let mut parsing = None;
        for entry in entries {
            let mut entry = entry.map_err(|e| e.to_string())?;
            let raw = entry.path().map_err(|e| e.to_string())?.into_owned();
            let path = raw.strip_prefix("./").unwrap_or(&raw).to_path_buf();
            // As tract's reader: names starting with a dot are skipped (macOS tar's extras).
            if path.components().any(|c| c.as_os_str().to_string_lossy().starts_with('.')) {
                continue;
            }
            let known = path == Path::new(GRAPH_NNEF_FILENAME)
                || path == Path::new(GRAPH_QUANT_FILENAME)
                || path.extension().is_some_and(|e| e == "dat");
            if path.components().count() > 1 || !known {
                return Ok(None);
            }
            let what = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
            if path == Path::new(GRAPH_NNEF_FILENAME) {
                let mut text = String::new();
                entry.read_to_string(&mut text).map_err(|e| what(&e))?;
                parsing = Some(scope.spawn(move || tract_nnef::ast::parse::parse_document(&text)));
            } else if path.extension().is_some_and(|e| e == "dat") {
                // Read first, then checked: tract allocates the tensor from its header's shape.
                let mut raw = Vec::new();
                entry.read_to_end(&mut raw).map_err(|e| what(&e))?;
                check_tensor_header(&raw).map_err(|e| what(&e))?;
                let tensor = tract_nnef::tensors::read_tensor(raw.as_slice()).map_err(|e| what(&e))?;
                let id = tract_nnef::resource::resource_path_to_id(&path).map_err(|e| what(&e))?;
                if tensors.insert(Identifier::from(&*id), Arc::new(tensor)).is_some() {
                    return Err(format!("{} is in the archive twice", path.display()));
                }
            } else {
                let table = GraphQuantLoader.try_load(&path, &mut entry, &empty).map_err(|e| what(&e))?;
                resources.extend(table);
            }
        }
        let parsing = parsing.ok_or_else(|| format!("no {GRAPH_NNEF_FILENAME} in the archive"))?;
        let doc = parsing.join().map_err(|p| format!("parsing {GRAPH_NNEF_FILENAME}: {}", super::panic_text(p)))?;
        doc.map(Some).map_err(|e| format!("{GRAPH_NNEF_FILENAME}: {}", tract_err(e)))
    })?;
    let Some(doc) = doc else { return Ok((sidecar, None)) };
    let quantization = match resources.remove(GRAPH_QUANT_FILENAME) {
        Some(q) => {
            let q = q
                .downcast_arc::<HashMap<String, tract_nnef::ast::QuantFormat>>()
                .map_err(|_| format!("{GRAPH_QUANT_FILENAME} is not a quantization table"))?;
            Some(q.iter().map(|(k, v)| (Identifier(k.clone()), v.clone())).collect())
        }
        None => None,
    };
    let proto = ProtoModel { doc, tensors, quantization, resources };
    proto.validate().map_err(tract_err)?;
    Ok((sidecar, Some(proto)))
}

/// Most bytes a converted model may unpack to (its `graph.nnef` and tensors): a few
/// kilobytes of gzip can claim gigabytes.
const MAX_UNPACKED: u64 = 2 << 30;

/// A reader that fails once more than `cap` bytes came through it.
struct Capped<R> {
    inner: R,
    left: u64,
    cap: u64,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            let why = format!("the archive unpacks to more than {} bytes", self.cap);
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Checks an NNEF tensor file's header against the bytes that follow it before tract
/// allocates the tensor from the header's shape: every element takes at least one bit
/// of data (a string at least its 4-byte length), and the declared data is all there.
fn check_tensor_header(raw: &[u8]) -> Result<(), String> {
    const HEADER: usize = 128;
    let data =
        raw.len().checked_sub(HEADER).ok_or_else(|| format!("{} bytes is shorter than a tensor header", raw.len()))?;
    let u32_at = |at: usize| u32::from_le_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]]);
    let (declared, rank, bits) = (u32_at(4) as usize, u32_at(8) as usize, u32_at(44));
    let item_type = u16::from_le_bytes([raw[48], raw[49]]);
    if rank > 8 {
        return Err(format!("tensor rank {rank} (at most 8)"));
    }
    let elements = (0..rank).try_fold(1usize, |n, i| n.checked_mul(u32_at(12 + 4 * i) as usize));
    let elements = elements.ok_or("the tensor's shape overflows")?;
    // Strings (tract's vendor type 0x1000) have a length prefix per element.
    let per_element_bits = if item_type == 0x1000 { 32 } else { 1 };
    if declared > data || elements.checked_mul(per_element_bits).is_none_or(|b| b > data.saturating_mul(8)) {
        return Err(format!(
            "the header claims {elements} elements ({declared} bytes, {bits} bits each) but {data} bytes follow it"
        ));
    }
    Ok(())
}

fn read_sidecar<R: Read>(mut first: tar::Entry<'_, R>) -> Result<Sidecar, String> {
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

    #[test]
    fn an_archive_that_unpacks_past_the_limit_is_refused() {
        let (_, bytes) = archive(true);
        let plain = {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(bytes.as_slice()).read_to_end(&mut out).unwrap();
            out.len() as u64
        };
        let gz = flate2::read::GzDecoder::new(bytes.as_slice());
        let Err(err) = unpack(gz, plain / 2) else { panic!("an archive over the cap was accepted") };
        assert!(err.contains("unpacks to more than"), "{err}");
        assert!(unpack(flate2::read::GzDecoder::new(bytes.as_slice()), plain).is_ok());
    }

    #[test]
    fn a_tensor_header_claiming_more_than_its_bytes_is_refused_before_allocating() {
        let mut raw = vec![0u8; 128 + 16];
        raw[..2].copy_from_slice(&[0x4e, 0xef]);
        raw[4..8].copy_from_slice(&16u32.to_le_bytes());
        raw[8..12].copy_from_slice(&2u32.to_le_bytes());
        raw[44..48].copy_from_slice(&32u32.to_le_bytes());
        raw[12..16].copy_from_slice(&2u32.to_le_bytes());
        raw[16..20].copy_from_slice(&2u32.to_le_bytes());
        check_tensor_header(&raw).expect("2x2 f32 in 16 bytes");
        assert!(tract_nnef::tensors::read_tensor(raw.as_slice()).is_ok());
        // 4096 x 4096 strings (tract would build 16M of them) in 16 bytes.
        raw[12..16].copy_from_slice(&4096u32.to_le_bytes());
        raw[16..20].copy_from_slice(&4096u32.to_le_bytes());
        raw[48..50].copy_from_slice(&0x1000u16.to_le_bytes());
        raw[44..48].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = check_tensor_header(&raw).unwrap_err();
        assert!(err.contains("16777216 elements"), "{err}");
        raw[8..12].copy_from_slice(&9u32.to_le_bytes());
        assert!(check_tensor_header(&raw).unwrap_err().contains("rank 9"));
        assert!(check_tensor_header(&raw[..100]).unwrap_err().contains("shorter than a tensor header"));
    }

    /// x + w, with w a constant big enough to be written as a `.dat` entry.
    fn archive(compress: bool) -> (TypedModel, Vec<u8>) {
        use tract_core::internal::*;
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, 64])).unwrap();
        let w: Vec<f32> = (0..64).map(|i| i as f32 * 0.25 - 3.0).collect();
        let w = model.add_const("w", tract_ndarray::Array2::from_shape_vec((1, 64), w).unwrap()).unwrap();
        let y = model.wire_node("y", tract_core::ops::math::add(), &[x, w]).unwrap();
        model.select_output_outlets(&y).unwrap();
        let mut meta = super::super::tests::meta_for_tests();
        meta.outputs.push(super::super::OutputMeta { name: "y".into(), quantization: None });
        let sidecar =
            Sidecar { format: FORMAT, edgeinfer_version: "test".into(), tract_version: TRACT_VERSION.into(), meta };
        let mut bytes = Vec::new();
        if compress {
            let mut gz = flate2::write::GzEncoder::new(&mut bytes, flate2::Compression::fast());
            write_archive(&model, &sidecar, &mut gz).unwrap();
            gz.finish().unwrap();
        } else {
            write_archive(&model, &sidecar, &mut bytes).unwrap();
        }
        (model, bytes)
    }

    /// A graph's nodes, wiring and properties (sorted: tract keeps them in a HashMap).
    fn shown(m: &TypedModel) -> String {
        let props: std::collections::BTreeMap<_, _> = m.properties.iter().map(|(k, v)| (k, format!("{v:?}"))).collect();
        format!("{:?} {:?} {:?} {props:?}", m.nodes(), m.inputs, m.outputs)
    }

    #[test]
    fn the_streaming_reader_builds_what_tracts_reader_builds() {
        let (model, plain) = archive(false);
        let nnef = reader();
        let (sidecar, ours) = unpack(&plain[..], MAX_UNPACKED).unwrap();
        assert_eq!(sidecar.meta.outputs.len(), 1);
        let ours = ours.expect("a flat archive is read by the streaming reader");
        let tracts = nnef.proto_model_for_read(&mut &plain[..]).unwrap();
        assert_eq!(ours.doc, tracts.doc);
        assert_eq!(ours.tensors.len(), 1, "{:?}", ours.tensors.keys());
        assert_eq!(ours.tensors, tracts.tensors);
        assert_eq!(ours.quantization, tracts.quantization);
        let keys = |r: &std::collections::HashMap<String, _>| {
            let mut k: Vec<String> = r.keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(keys(&ours.resources), keys(&tracts.resources));

        // Both forms read back to the same graph, from any Read + Seek.
        for compress in [false, true] {
            let (_, bytes) = archive(compress);
            let tracts = nnef.model_for_read(&mut &bytes[..]).unwrap();
            let read_back = read(std::io::Cursor::new(bytes)).unwrap().model;
            assert_eq!(shown(&read_back), shown(&tracts), "compressed: {compress}");
            let input = tract_core::prelude::tensor2(&[[1f32; 64]]);
            let run = |m: TypedModel| {
                use tract_core::prelude::*;
                m.into_runnable().unwrap().run(tvec!(input.clone().into())).unwrap().remove(0)
            };
            assert_eq!(run(read_back), run(model.clone()), "compressed: {compress}");
        }
    }

    #[test]
    fn archives_with_sub_directories_are_left_to_tracts_reader() {
        let (model, plain) = archive(false);
        let mut rebuilt = tar::Builder::new(Vec::new());
        let mut source = tar::Archive::new(&plain[..]);
        for (i, entry) in source.entries().unwrap().enumerate() {
            let mut entry = entry.unwrap();
            let mut header = entry.header().clone();
            let path = entry.path().unwrap().into_owned();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            rebuilt.append_data(&mut header, path, &data[..]).unwrap();
            if i == 0 {
                let mut h = tar::Header::new_gnu();
                h.set_size(2);
                h.set_cksum();
                rebuilt.append_data(&mut h, "extra/notes.txt", &b"hi"[..]).unwrap();
            }
        }
        let bytes = rebuilt.into_inner().unwrap();
        let (_, proto) = unpack(&bytes[..], MAX_UNPACKED).unwrap();
        assert!(proto.is_none());
        let read_back = read(std::io::Cursor::new(&bytes)).unwrap().model;
        let tracts = reader().model_for_read(&mut &plain[..]).unwrap();
        assert_eq!(shown(&read_back), shown(&tracts));
        assert_eq!(read_back.output_outlets().unwrap().len(), model.output_outlets().unwrap().len());
    }
}
