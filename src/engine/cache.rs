//! The start-up cache: an ONNX model's analysed and decluttered graph, kept as
//! a converted model (`.nnef.tar`, see `converted`) in a directory, so that the
//! next start skips decoding, rewriting and analysing the ONNX file.
//!
//! An entry's name carries a key over everything that shapes the graph: the
//! ONNX file's SHA-256, the tract and edgeinfer versions, the requested input
//! shapes, batch and the QDQ float path. A changed model, an upgrade or other
//! shapes therefore never hit an old entry. A cache is only ever an
//! optimisation: an entry that cannot be read is logged and ignored, an entry
//! that cannot be written is logged, and the model loads from ONNX either way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{hex, LoadOptions, TRACT_VERSION};

/// The cache key of an ONNX file (by its SHA-256) loaded with `opts`.
pub fn key(onnx_sha256: &str, opts: &LoadOptions) -> String {
    let mut h = Sha256::new();
    // 2: QLinearConv and activation Q/DQ pairs are rewritten before analysis (rewrite.rs).
    // 3: a pair is one EdgeinferQuantDequant node, no longer six float ops (quant_dequant.rs).
    // 4: constant DequantizeLinear nodes are computed before analysis (float weights in the entry).
    // 5: where our integer kernels run, an int8 graph is kept channels-first
    //    (engine::declutter), so whether they do, which EDGEINFER_ISA can change, is part of the key.
    h.update(b"edgeinfer model cache 5\n");
    h.update(format!("int8 kernels {}\n", super::isa::Isa::int8_in_graphs()));
    h.update(format!("onnx {onnx_sha256}\ntract {TRACT_VERSION}\nedgeinfer {}\n", env!("CARGO_PKG_VERSION")));
    // Sorted, so the same shapes given in another order hit the same entry.
    let shapes: BTreeMap<_, _> = opts.input_shapes.iter().collect();
    for (name, dims) in shapes {
        h.update(format!("shape {name:?} {dims:?}\n"));
    }
    h.update(format!("batch {}\nqdq_as_float {}\n", opts.batch.unwrap_or(1), opts.qdq_as_float));
    hex(&h.finalize())
}

/// Where the entry for `stem` under `key` lives.
pub fn entry_path(dir: &Path, stem: &str, key: &str) -> PathBuf {
    // The stem is for people listing the directory; the key alone decides a hit.
    let safe: String =
        stem.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' }).collect();
    dir.join(format!("{safe}-{}.nnef.tar", &key[..16]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_depends_on_model_shapes_and_float_path_only() {
        let base = LoadOptions::default();
        let k = key("aa", &base);
        assert_eq!(k, key("aa", &base.clone()));
        assert_ne!(k, key("ab", &base));
        let mut shaped = base.clone();
        shaped.input_shapes.insert("x".into(), vec![1, 3, 8, 8]);
        assert_ne!(k, key("aa", &shaped));
        let mut two = shaped.clone();
        two.input_shapes.insert("y".into(), vec![2]);
        let mut two_other_order = base.clone();
        two_other_order.input_shapes.insert("y".into(), vec![2]);
        two_other_order.input_shapes.insert("x".into(), vec![1, 3, 8, 8]);
        assert_eq!(key("aa", &two), key("aa", &two_other_order));
        assert_ne!(k, key("aa", &LoadOptions { batch: Some(2), ..base.clone() }));
        assert_eq!(k, key("aa", &LoadOptions { batch: Some(1), ..base.clone() }), "batch 1 is the default");
        assert_ne!(k, key("aa", &LoadOptions { qdq_as_float: true, ..base.clone() }));
        // Neither warm-up nor threads change the graph, so they share the entry.
        assert_eq!(k, key("aa", &LoadOptions { skip_warmup: true, threads: 2, ..base.clone() }));
    }

    #[test]
    fn entry_names_are_safe_file_names() {
        let p = entry_path(Path::new("/c"), "my model/../x", &"f".repeat(64));
        assert_eq!(p, Path::new("/c/my_model_.._x-ffffffffffffffff.nnef.tar"));
    }
}
