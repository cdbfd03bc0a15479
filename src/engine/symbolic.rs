//! Symbolic dimensions: shapes as a model declares them before its inputs are
//! pinned, which dimensions the caller's shapes and batch leave open, and a
//! shape to paste that pins them, built from the model's own names. Loading
//! (`onnx::pin_inputs`), `inspect` and `check` share it, so all three name the
//! same dimensions and give the same example.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{EngineError, LoadOptions, QuantParams};

/// One dimension as a model declares it: a size, or a symbol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ShapeDim {
    /// A fixed size.
    Fixed(usize),
    /// A symbol: the model's name for it, an expression of such names (an
    /// output's size worked out from the inputs), or [`UNNAMED`].
    Symbolic(String),
}

/// How a symbolic dimension the model gives no name is shown.
pub const UNNAMED: &str = "?";

impl ShapeDim {
    /// An unnamed symbolic dimension.
    pub fn unnamed() -> ShapeDim {
        ShapeDim::Symbolic(UNNAMED.into())
    }
}

impl fmt::Display for ShapeDim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShapeDim::Fixed(n) => write!(f, "{n}"),
            ShapeDim::Symbolic(s) => f.write_str(s),
        }
    }
}

/// A shape written the way the model's are shown: `[batch, 3, height, width]`.
pub fn shape_text(dims: &[ShapeDim]) -> String {
    format!("[{}]", dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "))
}

/// A model input or output as the file declares it, its inputs unpinned.
#[derive(Debug, Clone, Serialize)]
pub struct DeclaredTensor {
    /// Tensor name in the graph.
    pub name: String,
    /// Dimensions; `None` when the model gives none (for an output: when
    /// neither the file nor tract's analysis does).
    pub shape: Option<Vec<ShapeDim>>,
    /// Element type: `f32`, `u8`... or the ONNX name of one the engine does not take.
    #[serde(rename = "type")]
    pub elem_type: String,
    /// As [`super::TensorSpec::quantization`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization: Option<QuantParams>,
}

/// What an ONNX file declares, read without pinning its inputs (for `inspect`).
#[derive(Debug, Clone, Serialize)]
pub struct Description {
    /// The file.
    pub path: PathBuf,
    /// File stem, as [`super::ModelInfo::name`].
    pub name: String,
    /// SHA-256 of the file, hex.
    pub sha256: String,
    /// Its size.
    pub size_bytes: u64,
    /// Producer recorded in the file.
    pub producer: String,
    /// Default-domain opset.
    pub opset: i64,
    /// Other imported domains and versions.
    pub other_opsets: std::collections::BTreeMap<String, i64>,
    /// Operator counts as in the file.
    pub op_counts: std::collections::BTreeMap<String, usize>,
    /// As [`super::ModelInfo::quantization`].
    pub quantization: String,
    /// Rewrites applied before tract saw the graph.
    pub rewrites: Vec<String>,
    /// True when the file's `value_info` had to be ignored to analyse it.
    pub value_info_ignored: bool,
    /// The inputs a caller feeds, in graph order.
    pub inputs: Vec<DeclaredTensor>,
    /// The outputs, in graph order.
    pub outputs: Vec<DeclaredTensor>,
    /// Whether the output shapes were worked out by tract from the symbolic
    /// inputs (else they are the file's declaration, which may be stale).
    pub outputs_analysed: bool,
}

/// One symbolic input dimension and the size loading gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SymbolicDim {
    /// The input.
    pub input: String,
    /// Its position in the input's shape.
    pub axis: usize,
    /// The model's name for it, or [`UNNAMED`].
    pub name: String,
    /// The size it is pinned to; `None` while the caller must still give one.
    pub size: Option<usize>,
}

/// The shape a caller gave for input number `index` named `name`: by name,
/// or, for the first input, without one.
pub fn given_shape<'a>(shapes: &'a HashMap<String, Vec<usize>>, index: usize, name: &str) -> Option<&'a Vec<usize>> {
    shapes.get(name).or_else(|| if index == 0 { shapes.get("") } else { None })
}

/// Every symbolic dimension of `inputs` (name and declared shape, in graph
/// order) with the size loading gives it: from `shapes`, else from `batch`
/// (1 when `None`) for a leading one, else none yet.
pub fn symbolic_dims<'a>(
    inputs: impl IntoIterator<Item = (&'a str, Option<&'a [ShapeDim]>)>,
    shapes: &HashMap<String, Vec<usize>>,
    batch: Option<usize>,
) -> Vec<SymbolicDim> {
    let mut out = Vec::new();
    for (index, (input, dims)) in inputs.into_iter().enumerate() {
        let given = given_shape(shapes, index, input);
        for (axis, dim) in dims.unwrap_or_default().iter().enumerate() {
            let ShapeDim::Symbolic(name) = dim else { continue };
            let size = match given {
                Some(g) => g.get(axis).copied(),
                None if axis == 0 => Some(batch.unwrap_or(1)),
                None => None,
            };
            out.push(SymbolicDim { input: input.to_string(), axis, name: name.clone(), size });
        }
    }
    out
}

/// Checks that every shape in `shapes` names one of `inputs` (the empty name
/// stands for the first): `Err((name, reason))` otherwise.
pub fn check_shape_names<'a>(
    inputs: impl IntoIterator<Item = &'a str>,
    shapes: &HashMap<String, Vec<usize>>,
) -> Result<(), (String, String)> {
    let names: Vec<&str> = inputs.into_iter().collect();
    match shapes.keys().find(|key| !key.is_empty() && !names.contains(&key.as_str())) {
        Some(key) => Err((key.clone(), format!("no such input; the model's inputs are {names:?}"))),
        None => Ok(()),
    }
}

/// An input that loading cannot pin with the shapes and batch given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpinned {
    /// Its position among the inputs the caller feeds.
    pub index: usize,
    /// Its name.
    pub input: String,
    /// Its declared shape; `None` when the model declares none.
    pub declared: Option<Vec<ShapeDim>>,
    /// The size its leading dimension takes when that is symbolic (`--batch`).
    pub batch: usize,
}

impl Unpinned {
    /// The symbolic dimensions left to pin: all but a leading one.
    pub fn open_axes(&self) -> Vec<(usize, &str)> {
        let dims = self.declared.as_deref().unwrap_or_default();
        let open = dims.iter().enumerate().skip(1);
        open.filter_map(|(axis, d)| match d {
            ShapeDim::Symbolic(name) => Some((axis, name.as_str())),
            ShapeDim::Fixed(_) => None,
        })
        .collect()
    }

    /// The shape to paste, one entry per dimension: its fixed size, the
    /// batch for a symbolic leading one, and a placeholder for each other
    /// symbolic one, which is its name in capitals (`HEIGHT`), or `D2` (its
    /// position) when it has no name that reads as one. Without a declared
    /// shape: `D0`, `D1`, `...`.
    pub fn example(&self) -> Vec<String> {
        let Some(dims) = &self.declared else {
            return vec!["D0".into(), "D1".into(), "...".into()];
        };
        dims.iter()
            .enumerate()
            .map(|(axis, d)| match d {
                ShapeDim::Fixed(n) => n.to_string(),
                ShapeDim::Symbolic(_) if axis == 0 => self.batch.to_string(),
                ShapeDim::Symbolic(name) => placeholder(name, axis),
            })
            .collect()
    }

    /// `NAME=D0,D1,...` for `--input-shape`.
    pub fn cli_example(&self) -> String {
        format!("{}={}", self.input, self.example().join(","))
    }

    /// `input_shape = [D0, D1, ...]` for a pipeline's config.
    pub fn config_example(&self) -> String {
        format!("input_shape = [{}]", self.example().join(", "))
    }

    /// What is open, in words: "dimensions 2 (`height`) and 3 (`width`) are symbolic".
    pub fn what(&self) -> String {
        if self.declared.is_none() {
            return "the model declares no shape".into();
        }
        let open: Vec<String> = self
            .open_axes()
            .iter()
            .map(|&(axis, name)| if name == UNNAMED { axis.to_string() } else { format!("{axis} (`{name}`)") })
            .collect();
        match open.as_slice() {
            [one] => format!("dimension {one} is symbolic"),
            [rest @ .., last] => format!("dimensions {} and {last} are symbolic", rest.join(", ")),
            [] => "no dimension is symbolic".into(),
        }
    }

    /// The placeholders of the example, where the caller puts the sizes to
    /// run at, each once (none without a declared shape).
    pub fn placeholders(&self) -> Vec<String> {
        let example = self.example();
        let mut names: Vec<String> = Vec::new();
        for (axis, _) in self.open_axes() {
            if !names.contains(&example[axis]) {
                names.push(example[axis].clone());
            }
        }
        names
    }
}

/// A placeholder for a symbolic dimension: its name in capitals when that is
/// a plain identifier (`height` -> `HEIGHT`), else `D` and its position:
/// unnamed dimensions, ONNX Runtime's `unk__12` and expressions (`2*n`) get no
/// name a user would recognise.
fn placeholder(name: &str, axis: usize) -> String {
    let mut chars = name.chars();
    let identifier = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if identifier && !name.starts_with("unk__") {
        name.to_ascii_uppercase()
    } else {
        format!("D{axis}")
    }
}

/// The inputs loading cannot pin: those without a shape in `shapes` that
/// have a symbolic dimension past the leading one, or declare no shape.
pub fn unpinned<'a>(
    inputs: impl IntoIterator<Item = (&'a str, Option<&'a [ShapeDim]>)>,
    shapes: &HashMap<String, Vec<usize>>,
    batch: Option<usize>,
) -> Vec<Unpinned> {
    let mut out = Vec::new();
    for (index, (input, dims)) in inputs.into_iter().enumerate() {
        if given_shape(shapes, index, input).is_some() {
            continue;
        }
        let open = match dims {
            None => true,
            Some(dims) => dims.iter().skip(1).any(|d| matches!(d, ShapeDim::Symbolic(_))),
        };
        if open {
            let declared = dims.map(<[ShapeDim]>::to_vec);
            out.push(Unpinned { index, input: input.to_string(), declared, batch: batch.unwrap_or(1) });
        }
    }
    out
}

/// The one-line explanation of [`super::EngineError::Unpinned`], for the command line.
pub fn unpinned_message(inputs: &[Unpinned]) -> String {
    let what: Vec<String> = inputs.iter().map(|u| format!("input `{}`: {}", u.input, u.what())).collect();
    let flags: Vec<String> = inputs.iter().map(|u| format!("--input-shape {}", u.cli_example())).collect();
    let mut placeholders: Vec<String> = Vec::new();
    for p in inputs.iter().flat_map(Unpinned::placeholders) {
        if !placeholders.contains(&p) {
            placeholders.push(p);
        }
    }
    let config = match inputs {
        [only] if only.index == 0 => format!(" (in a config: {})", only.config_example()),
        _ => String::new(),
    };
    let open: usize = inputs.iter().map(|u| u.open_axes().len().max(1)).sum();
    format!(
        "{}; pin {} with {}{config}{}",
        what.join("; "),
        if open == 1 { "it" } else { "them" },
        flags.join(" "),
        sizes_clause(&placeholders)
    )
}

/// `, HEIGHT and WIDTH being the sizes to run at` (empty without placeholders).
pub fn sizes_clause(placeholders: &[String]) -> String {
    match placeholders {
        [] => String::new(),
        [one] => format!(", {one} being the size to run at"),
        many => format!(", {} being the sizes to run at", and_list(many)),
    }
}

/// `A`, `A and B`, `A, B and C`.
fn and_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

/// Reads a model without pinning its inputs (for `inspect`): what an ONNX
/// file declares, its outputs worked out from the symbolic inputs where tract
/// can. `None` for a converted model, which was pinned when converted, and
/// in a build without ONNX support: load those instead.
pub fn describe(path: &Path, opts: &LoadOptions) -> Result<Option<Description>, EngineError> {
    if super::is_converted(path) || !cfg!(feature = "onnx") {
        return Ok(None);
    }
    super::guarded(path, || {
        let bytes = super::read_file(path)?;
        let sha256 = super::hex(&<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        describe_onnx(path, &bytes, sha256, name, opts).map(Some)
    })
}

#[cfg(feature = "onnx")]
fn describe_onnx(
    path: &Path,
    bytes: &[u8],
    sha256: String,
    name: String,
    opts: &LoadOptions,
) -> Result<Description, EngineError> {
    super::onnx::describe(path, bytes, sha256, name, opts)
}

#[cfg(not(feature = "onnx"))]
fn describe_onnx(path: &Path, _: &[u8], _: String, _: String, _: &LoadOptions) -> Result<Description, EngineError> {
    Err(EngineError::Load {
        path: path.display().to_string(),
        reason: crate::features::not_built("onnx", "an ONNX model"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sym(s: &str) -> ShapeDim {
        ShapeDim::Symbolic(s.into())
    }

    fn image() -> Vec<ShapeDim> {
        vec![sym("batch"), ShapeDim::Fixed(3), sym("height"), sym("width")]
    }

    #[test]
    fn shapes_show_symbols_by_name_and_serialise_as_strings_next_to_numbers() {
        assert_eq!(shape_text(&image()), "[batch, 3, height, width]");
        assert_eq!(serde_json::to_value(image()).unwrap(), serde_json::json!(["batch", 3, "height", "width"]));
    }

    #[test]
    fn the_leading_dimension_follows_the_batch_and_the_rest_must_be_given() {
        let dims = image();
        let inputs = || [("image", Some(dims.as_slice()))];
        let none = HashMap::new();
        let got = symbolic_dims(inputs(), &none, None);
        let sizes: Vec<_> = got.iter().map(|d| (d.axis, d.name.as_str(), d.size)).collect();
        assert_eq!(sizes, vec![(0, "batch", Some(1)), (2, "height", None), (3, "width", None)]);
        assert_eq!(symbolic_dims(inputs(), &none, Some(4))[0].size, Some(4));

        let open = unpinned(inputs(), &none, Some(2));
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].open_axes(), vec![(2, "height"), (3, "width")]);
        assert_eq!(open[0].cli_example(), "image=2,3,HEIGHT,WIDTH");
        assert_eq!(open[0].config_example(), "input_shape = [2, 3, HEIGHT, WIDTH]");
        assert_eq!(open[0].what(), "dimensions 2 (`height`) and 3 (`width`) are symbolic");

        // A shape given by name, or without one for the first input, pins everything.
        for key in ["image", ""] {
            let given = HashMap::from([(key.to_string(), vec![1, 3, 32, 40])]);
            assert!(unpinned(inputs(), &given, None).is_empty());
            let sizes: Vec<_> = symbolic_dims(inputs(), &given, None).iter().map(|d| d.size).collect();
            assert_eq!(sizes, vec![Some(1), Some(32), Some(40)]);
        }
        // Only a symbolic batch: nothing to pin.
        let batch_only = [sym("N"), ShapeDim::Fixed(30)];
        assert!(unpinned([("x", Some(&batch_only[..]))], &none, None).is_empty());
    }

    #[test]
    fn placeholders_are_the_names_in_capitals_or_the_position() {
        let dims = [sym("?"), ShapeDim::Fixed(3), sym("?"), sym("unk__7"), sym("2*n"), sym("seq_len")];
        let open = unpinned([("x", Some(&dims[..]))], &HashMap::new(), None);
        assert_eq!(open[0].cli_example(), "x=1,3,D2,D3,D4,SEQ_LEN");
        // An unnamed one is named by its position alone.
        assert_eq!(open[0].what(), "dimensions 2, 3 (`unk__7`), 4 (`2*n`) and 5 (`seq_len`) are symbolic");
        assert_eq!(open[0].placeholders(), ["D2", "D3", "D4", "SEQ_LEN"]);
        // The same name twice is one size to choose.
        let square = [ShapeDim::Fixed(1), sym("size"), sym("size")];
        let open = unpinned([("x", Some(&square[..]))], &HashMap::new(), None);
        assert_eq!(open[0].placeholders(), ["SIZE"]);
    }

    #[test]
    fn the_message_names_every_open_input_and_dimension_with_the_example() {
        let dims = image();
        let msg = unpinned_message(&unpinned([("image", Some(dims.as_slice()))], &HashMap::new(), None));
        assert_eq!(
            msg,
            "input `image`: dimensions 2 (`height`) and 3 (`width`) are symbolic; pin them with \
             --input-shape image=1,3,HEIGHT,WIDTH (in a config: input_shape = [1, 3, HEIGHT, WIDTH]), \
             HEIGHT and WIDTH being the sizes to run at"
        );
        // Two inputs: one flag each, and no config form (a pipeline feeds one input).
        let seq = [ShapeDim::Fixed(1), sym("seq")];
        let inputs = [("a", Some(&seq[..])), ("b", None)];
        let msg = unpinned_message(&unpinned(inputs, &HashMap::new(), None));
        assert_eq!(
            msg,
            "input `a`: dimension 1 (`seq`) is symbolic; input `b`: the model declares no shape; pin them with \
             --input-shape a=1,SEQ --input-shape b=D0,D1,..., SEQ being the size to run at"
        );
    }
}
