//! Plain tensors: the engine-neutral data type every module passes around,
//! plus `.npy` and JSON conversions. Nothing here knows about tract.

use std::fmt;
use std::io::{Read, Write};
use std::path::Path;

use npyz::WriterBuilder;
use thiserror::Error;

/// Element type of a tensor, independent of any inference library.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ElemType {
    /// 32-bit float.
    F32,
    /// 64-bit float.
    F64,
    /// Signed 8-bit integer.
    I8,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 16-bit integer.
    I16,
    /// Signed 32-bit integer.
    I32,
    /// Signed 64-bit integer.
    I64,
    /// Boolean.
    Bool,
    /// UTF-8 string (class labels of ONNX-ML models).
    String,
}

impl fmt::Display for ElemType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ElemType::F32 => "f32",
            ElemType::F64 => "f64",
            ElemType::I8 => "i8",
            ElemType::U8 => "u8",
            ElemType::I16 => "i16",
            ElemType::I32 => "i32",
            ElemType::I64 => "i64",
            ElemType::Bool => "bool",
            ElemType::String => "string",
        };
        f.write_str(s)
    }
}

/// The typed storage of a [`Tensor`].
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    /// 32-bit floats.
    F32(Vec<f32>),
    /// 64-bit floats.
    F64(Vec<f64>),
    /// Signed bytes.
    I8(Vec<i8>),
    /// Unsigned bytes.
    U8(Vec<u8>),
    /// 16-bit integers.
    I16(Vec<i16>),
    /// 32-bit integers.
    I32(Vec<i32>),
    /// 64-bit integers.
    I64(Vec<i64>),
    /// Booleans.
    Bool(Vec<bool>),
    /// Strings.
    String(Vec<String>),
}

/// A dense, row-major tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Elements in row-major order; `len == shape.product()`.
    pub data: Data,
}

/// Errors reading, writing or converting tensors.
#[derive(Debug, Error)]
pub enum TensorError {
    /// Shape and element count disagree.
    #[error("shape {shape:?} needs {expected} elements, got {got}")]
    ShapeMismatch {
        /// The declared shape.
        shape: Vec<usize>,
        /// Elements the shape needs.
        expected: usize,
        /// Elements supplied.
        got: usize,
    },
    /// An `.npy` file could not be read or written.
    #[error("{path}: {reason}")]
    Npy {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A JSON value is not a rectangular array of numbers.
    #[error("JSON input is not a rectangular numeric array: {0}")]
    Json(String),
}

macro_rules! data_len {
    ($data:expr, $v:ident => $e:expr) => {
        match $data {
            Data::F32($v) => $e,
            Data::F64($v) => $e,
            Data::I8($v) => $e,
            Data::U8($v) => $e,
            Data::I16($v) => $e,
            Data::I32($v) => $e,
            Data::I64($v) => $e,
            Data::Bool($v) => $e,
            Data::String($v) => $e,
        }
    };
}

impl Data {
    /// Number of elements.
    pub fn len(&self) -> usize {
        data_len!(self, v => v.len())
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type.
    pub fn elem_type(&self) -> ElemType {
        match self {
            Data::F32(_) => ElemType::F32,
            Data::F64(_) => ElemType::F64,
            Data::I8(_) => ElemType::I8,
            Data::U8(_) => ElemType::U8,
            Data::I16(_) => ElemType::I16,
            Data::I32(_) => ElemType::I32,
            Data::I64(_) => ElemType::I64,
            Data::Bool(_) => ElemType::Bool,
            Data::String(_) => ElemType::String,
        }
    }

    /// False when a float element is NaN or infinite (other types are always finite).
    pub fn all_finite(&self) -> bool {
        match self {
            Data::F32(v) => v.iter().all(|x| x.is_finite()),
            Data::F64(v) => v.iter().all(|x| x.is_finite()),
            _ => true,
        }
    }

    /// Every element as f64 (strings become NaN); for scoring and comparison.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match self {
            Data::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Data::F64(v) => v.clone(),
            Data::I8(v) => v.iter().map(|&x| x as f64).collect(),
            Data::U8(v) => v.iter().map(|&x| x as f64).collect(),
            Data::I16(v) => v.iter().map(|&x| x as f64).collect(),
            Data::I32(v) => v.iter().map(|&x| x as f64).collect(),
            Data::I64(v) => v.iter().map(|&x| x as f64).collect(),
            Data::Bool(v) => v.iter().map(|&x| if x { 1.0 } else { 0.0 }).collect(),
            Data::String(v) => v.iter().map(|s| s.parse().unwrap_or(f64::NAN)).collect(),
        }
    }
}

impl Tensor {
    /// Builds a tensor, checking that the shape fits the data.
    pub fn new(shape: Vec<usize>, data: Data) -> Result<Self, TensorError> {
        let expected: usize = shape.iter().product();
        if expected != data.len() {
            return Err(TensorError::ShapeMismatch { shape, expected, got: data.len() });
        }
        Ok(Tensor { shape, data })
    }

    /// A tensor of zeros (empty strings, false) of the given shape and type.
    pub fn zeros(shape: &[usize], elem_type: ElemType) -> Self {
        let n: usize = shape.iter().product();
        let data = match elem_type {
            ElemType::F32 => Data::F32(vec![0.0; n]),
            ElemType::F64 => Data::F64(vec![0.0; n]),
            ElemType::I8 => Data::I8(vec![0; n]),
            ElemType::U8 => Data::U8(vec![0; n]),
            ElemType::I16 => Data::I16(vec![0; n]),
            ElemType::I32 => Data::I32(vec![0; n]),
            ElemType::I64 => Data::I64(vec![0; n]),
            ElemType::Bool => Data::Bool(vec![false; n]),
            ElemType::String => Data::String(vec![String::new(); n]),
        };
        Tensor { shape: shape.to_vec(), data }
    }

    /// A float tensor.
    pub fn from_f32(shape: Vec<usize>, values: Vec<f32>) -> Result<Self, TensorError> {
        Self::new(shape, Data::F32(values))
    }

    /// The element type.
    pub fn elem_type(&self) -> ElemType {
        self.data.elem_type()
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True when the tensor holds no element.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Reads an `.npy` file (C order, little-endian numeric or bool dtypes).
    pub fn read_npy(path: &Path) -> Result<Self, TensorError> {
        let err = |reason: String| TensorError::Npy { path: path.display().to_string(), reason };
        let mut bytes = Vec::new();
        std::fs::File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(|e| err(e.to_string()))?;
        Self::from_npy_bytes(&bytes).map_err(err)
    }

    /// Parses the bytes of an `.npy` file.
    pub fn from_npy_bytes(bytes: &[u8]) -> Result<Self, String> {
        let npy = npyz::NpyFile::new(bytes).map_err(|e| format!("not a valid .npy file: {e}"))?;
        if npy.order() != npyz::Order::C {
            return Err("Fortran-ordered arrays are not supported; save with np.ascontiguousarray".into());
        }
        let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
        let descr = npy.dtype().descr();
        let bad = |e: std::io::Error| format!("reading {descr} data: {e}");
        let data = match descr.trim_matches('\'').trim_start_matches(['<', '>', '|', '=']) {
            "f4" => Data::F32(npy.into_vec().map_err(bad)?),
            "f8" => Data::F64(npy.into_vec().map_err(bad)?),
            "i1" => Data::I8(npy.into_vec().map_err(bad)?),
            "u1" => Data::U8(npy.into_vec().map_err(bad)?),
            "i2" => Data::I16(npy.into_vec().map_err(bad)?),
            "i4" => Data::I32(npy.into_vec().map_err(bad)?),
            "i8" => Data::I64(npy.into_vec().map_err(bad)?),
            "b1" => Data::Bool(npy.into_vec().map_err(bad)?),
            other => {
                return Err(format!("unsupported dtype `{other}` (use float32, float64, int8/16/32/64, uint8 or bool)"))
            }
        };
        Tensor::new(shape, data).map_err(|e| e.to_string())
    }

    /// Writes the tensor as an `.npy` file with its own element type.
    pub fn write_npy(&self, path: &Path) -> Result<(), TensorError> {
        let err = |reason: String| TensorError::Npy { path: path.display().to_string(), reason };
        let mut buf = Vec::new();
        self.write_npy_to(&mut buf).map_err(|e| err(e.to_string()))?;
        std::fs::write(path, buf).map_err(|e| err(e.to_string()))
    }

    fn write_npy_to(&self, w: &mut Vec<u8>) -> std::io::Result<()> {
        let shape: Vec<u64> = self.shape.iter().map(|&d| d as u64).collect();
        fn put<T: npyz::AutoSerialize + Clone>(w: &mut Vec<u8>, shape: &[u64], v: &[T]) -> std::io::Result<()> {
            let mut writer = npyz::WriteOptions::new().default_dtype().shape(shape).writer(w).begin_nd()?;
            writer.extend(v.iter().cloned())?;
            writer.finish()
        }
        match &self.data {
            Data::F32(v) => put(w, &shape, v),
            Data::F64(v) => put(w, &shape, v),
            Data::I8(v) => put(w, &shape, v),
            Data::U8(v) => put(w, &shape, v),
            Data::I16(v) => put(w, &shape, v),
            Data::I32(v) => put(w, &shape, v),
            Data::I64(v) => put(w, &shape, v),
            Data::Bool(v) => put(w, &shape, v),
            Data::String(_) => Err(std::io::Error::other("string tensors cannot be saved as .npy")),
        }
    }

    /// Parses a JSON array (nested for several dimensions) of numbers into an f32 tensor.
    pub fn from_json(value: &serde_json::Value) -> Result<Self, TensorError> {
        let mut shape = Vec::new();
        let mut cursor = value;
        while let serde_json::Value::Array(items) = cursor {
            shape.push(items.len());
            match items.first() {
                Some(first) => cursor = first,
                None => break,
            }
        }
        if shape.is_empty() {
            return Err(TensorError::Json("expected an array".into()));
        }
        let mut values = Vec::with_capacity(shape.iter().product());
        flatten_json(value, &shape, 0, &mut values)?;
        Tensor::from_f32(shape, values)
    }

    /// The tensor as a JSON value: a nested array following the shape.
    pub fn to_json(&self) -> serde_json::Value {
        let flat: Vec<serde_json::Value> = match &self.data {
            Data::String(v) => v.iter().map(|s| serde_json::Value::from(s.as_str())).collect(),
            Data::Bool(v) => v.iter().map(|&b| serde_json::Value::from(b)).collect(),
            Data::I64(v) => v.iter().map(|&x| serde_json::Value::from(x)).collect(),
            other => other.to_f64_vec().into_iter().map(json_number).collect(),
        };
        nest_json(&flat, &self.shape)
    }
}

/// A finite f64 as a JSON number; NaN and infinities become null (JSON has no such numbers).
pub fn json_number(x: f64) -> serde_json::Value {
    serde_json::Number::from_f64(x).map(serde_json::Value::Number).unwrap_or(serde_json::Value::Null)
}

fn flatten_json(v: &serde_json::Value, shape: &[usize], depth: usize, out: &mut Vec<f32>) -> Result<(), TensorError> {
    if depth == shape.len() {
        let x = v.as_f64().ok_or_else(|| TensorError::Json(format!("`{v}` is not a number")))?;
        out.push(x as f32);
        return Ok(());
    }
    let items =
        v.as_array().ok_or_else(|| TensorError::Json(format!("expected an array at depth {depth}, found `{v}`")))?;
    if items.len() != shape[depth] {
        return Err(TensorError::Json(format!(
            "ragged array: length {} at depth {depth}, expected {}",
            items.len(),
            shape[depth]
        )));
    }
    for item in items {
        flatten_json(item, shape, depth + 1, out)?;
    }
    Ok(())
}

fn nest_json(flat: &[serde_json::Value], shape: &[usize]) -> serde_json::Value {
    match shape.split_first() {
        None => flat.first().cloned().unwrap_or(serde_json::Value::Null),
        Some((&n, rest)) => {
            let inner: usize = rest.iter().product();
            let items = (0..n).map(|i| nest_json(&flat[i * inner..(i + 1) * inner], rest)).collect();
            serde_json::Value::Array(items)
        }
    }
}

/// Writes `bytes` to `path` through a temporary file, so a reader never sees half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trip_keeps_type_and_shape() {
        let dir = tempfile::tempdir().unwrap();
        for t in [
            Tensor::new(vec![2, 3], Data::F32(vec![1.0, -2.5, 3.0, 4.0, 5.0, 6.0])).unwrap(),
            Tensor::new(vec![3], Data::I64(vec![-1, 0, 7])).unwrap(),
            Tensor::new(vec![1, 2], Data::U8(vec![0, 255])).unwrap(),
            Tensor::new(vec![2], Data::I8(vec![-128, 127])).unwrap(),
        ] {
            let p = dir.path().join("t.npy");
            t.write_npy(&p).unwrap();
            assert_eq!(Tensor::read_npy(&p).unwrap(), t);
        }
    }

    #[test]
    fn truncated_npy_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.npy");
        Tensor::from_f32(vec![4], vec![1.0; 4]).unwrap().write_npy(&p).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert!(Tensor::from_npy_bytes(&bytes[..bytes.len() - 3]).is_err());
        assert!(Tensor::from_npy_bytes(b"hello").is_err());
    }

    #[test]
    fn json_nested_arrays_parse_with_shape() {
        let v: serde_json::Value = serde_json::from_str("[[1, 2, 3], [4, 5, 6]]").unwrap();
        let t = Tensor::from_json(&v).unwrap();
        assert_eq!(t.shape, vec![2, 3]);
        assert_eq!(t.data, Data::F32(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
        assert_eq!(t.to_json(), v.as_array().map(|_| serde_json::json!([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])).unwrap());
    }

    #[test]
    fn json_ragged_or_non_numeric_is_rejected() {
        for bad in ["[[1, 2], [3]]", "[1, \"a\"]", "3", "{\"a\": 1}"] {
            let v: serde_json::Value = serde_json::from_str(bad).unwrap();
            assert!(Tensor::from_json(&v).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn shape_mismatch_is_rejected() {
        assert!(Tensor::from_f32(vec![2, 2], vec![1.0; 3]).is_err());
    }
}
