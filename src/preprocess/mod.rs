//! Pure functions that turn inputs (decoded images, arrays) into tensors a
//! model accepts: resize, colour order, layout, normalisation and the
//! conversion to the model's element type, quantizing where it asks for it.

pub mod audio;
pub mod config;
pub mod stage;
pub mod window;

use image::{imageops, RgbImage};
use thiserror::Error;

use crate::engine::TensorSpec;
use crate::tensor::{Data, ElemType, Tensor};

/// Errors turning an input into a model tensor.
#[derive(Debug, Error)]
pub enum PreprocessError {
    /// The model input is not image-shaped.
    #[error(
        "input `{input}` has shape {shape:?}, which is not an image (expected [1,C,H,W] or [1,H,W,C] with C = 1 or 3)"
    )]
    NotAnImage {
        /// Input name.
        input: String,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// The image file could not be decoded.
    #[error("cannot decode image: {0}")]
    Decode(String),
    /// An array does not fit the model input.
    #[error("input `{input}`: {reason}")]
    Mismatch {
        /// Input name.
        input: String,
        /// Why.
        reason: String,
    },
}

/// How to fit an image to the model's input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ResizeMode {
    /// Scale each axis independently (aspect ratio changes).
    #[default]
    Stretch,
    /// Keep the aspect ratio and pad the rest with grey (114).
    Letterbox,
}

/// Channel order the model wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ColorOrder {
    /// Red, green, blue.
    #[default]
    Rgb,
    /// Blue, green, red (OpenCV-trained models).
    Bgr,
}

/// Memory layout of an image tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// Batch, channels, height, width.
    Nchw,
    /// Batch, height, width, channels.
    Nhwc,
}

/// Image preprocessing settings; the same keys in a config file and as flags.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagePrep {
    /// Resize mode.
    pub resize: ResizeMode,
    /// Channel order.
    pub color: ColorOrder,
    /// Layout; guessed from the input shape when absent.
    pub layout: Option<Layout>,
    /// Multiplier applied to 0..255 pixel values first (1/255 maps to 0..1).
    pub scale: f32,
    /// Per-channel mean subtracted after scaling (in the model's channel order).
    pub mean: [f32; 3],
    /// Per-channel standard deviation divided by after the mean.
    pub std: [f32; 3],
}

impl Default for ImagePrep {
    fn default() -> Self {
        ImagePrep {
            resize: ResizeMode::Stretch,
            color: ColorOrder::Rgb,
            layout: None,
            scale: 1.0 / 255.0,
            mean: [0.0; 3],
            std: [1.0; 3],
        }
    }
}

/// Where the image landed inside the model input, to map boxes back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placement {
    /// Scale factor applied to the source image (x, y).
    pub scale: (f32, f32),
    /// Padding added on the left and top, in model pixels.
    pub pad: (u32, u32),
}

/// How one image became the model input: what box decoders need to map back to source pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageGeometry {
    /// Where the image landed inside the model input.
    pub placement: Placement,
    /// Source image width and height.
    pub source: (u32, u32),
    /// Model input width and height.
    pub input: (u32, u32),
}

/// [`image_to_tensor`], plus the geometry that maps model-input pixels back to the image.
pub fn image_to_tensor_with_geometry(
    img: &RgbImage,
    spec: &TensorSpec,
    prep: &ImagePrep,
) -> Result<(Tensor, ImageGeometry), PreprocessError> {
    let (h, w, _, _) = image_geometry(spec, prep.layout)?;
    let (t, placement) = image_to_tensor(img, spec, prep)?;
    Ok((t, ImageGeometry { placement, source: (img.width(), img.height()), input: (w, h) }))
}

/// Height, width, channels and layout of an image-shaped input.
pub fn image_geometry(spec: &TensorSpec, layout: Option<Layout>) -> Result<(u32, u32, usize, Layout), PreprocessError> {
    let bad = || PreprocessError::NotAnImage { input: spec.name.clone(), shape: spec.shape.clone() };
    let s = &spec.shape;
    if s.len() != 4 || s[0] != 1 {
        return Err(bad());
    }
    let layout = match layout {
        Some(l) => l,
        None if matches!(s[1], 1 | 3) => Layout::Nchw,
        None if matches!(s[3], 1 | 3) => Layout::Nhwc,
        None => return Err(bad()),
    };
    let (c, h, w) = match layout {
        Layout::Nchw => (s[1], s[2], s[3]),
        Layout::Nhwc => (s[3], s[1], s[2]),
    };
    if !matches!(c, 1 | 3) {
        return Err(bad());
    }
    Ok((h as u32, w as u32, c, layout))
}

/// Resizes to `w` x `h` by stretching or letterboxing.
pub fn fit_image(img: &RgbImage, w: u32, h: u32, mode: ResizeMode) -> (RgbImage, Placement) {
    if img.width() == w && img.height() == h {
        return (img.clone(), Placement { scale: (1.0, 1.0), pad: (0, 0) });
    }
    match mode {
        ResizeMode::Stretch => {
            let out = imageops::resize(img, w, h, imageops::FilterType::Triangle);
            (out, Placement { scale: (w as f32 / img.width() as f32, h as f32 / img.height() as f32), pad: (0, 0) })
        }
        ResizeMode::Letterbox => {
            let s = (w as f32 / img.width() as f32).min(h as f32 / img.height() as f32);
            let nw = ((img.width() as f32 * s).round() as u32).clamp(1, w);
            let nh = ((img.height() as f32 * s).round() as u32).clamp(1, h);
            let inner = imageops::resize(img, nw, nh, imageops::FilterType::Triangle);
            let mut out = RgbImage::from_pixel(w, h, image::Rgb([114, 114, 114]));
            let (px, py) = ((w - nw) / 2, (h - nh) / 2);
            imageops::replace(&mut out, &inner, px as i64, py as i64);
            (out, Placement { scale: (s, s), pad: (px, py) })
        }
    }
}

/// Decodes image bytes (JPEG or PNG) into RGB.
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage, PreprocessError> {
    // Inputs come from outside (files, MQTT): bound what one image may cost, so a
    // crafted header cannot make a small board allocate gigabytes.
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_BYTES);
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| PreprocessError::Decode(e.to_string()))?;
    reader.limits(limits);
    reader.decode().map(|i| i.to_rgb8()).map_err(|e| PreprocessError::Decode(e.to_string()))
}

/// Largest accepted image width or height.
pub const MAX_IMAGE_SIDE: u32 = 8192;
/// Most memory one decoded image may take.
pub const MAX_IMAGE_BYTES: u64 = 128 * 1024 * 1024;

/// Turns an RGB image into the tensor `spec` describes.
pub fn image_to_tensor(
    img: &RgbImage,
    spec: &TensorSpec,
    prep: &ImagePrep,
) -> Result<(Tensor, Placement), PreprocessError> {
    let (h, w, c, layout) = image_geometry(spec, prep.layout)?;
    let (fitted, placement) = fit_image(img, w, h, prep.resize);
    let plane = (h * w) as usize;
    let mut values = vec![0f32; plane * c];
    for (x, y, px) in fitted.enumerate_pixels() {
        let rgb = px.0;
        let ordered = match prep.color {
            ColorOrder::Rgb => rgb,
            ColorOrder::Bgr => [rgb[2], rgb[1], rgb[0]],
        };
        let pos = (y * w + x) as usize;
        // ITU-R BT.601 luma for single-channel models, what most grayscale models were trained on.
        let luma = 0.299 * rgb[0] as f32 + 0.587 * rgb[1] as f32 + 0.114 * rgb[2] as f32;
        for (ch, &component) in ordered.iter().enumerate().take(c) {
            let raw = if c == 1 { luma } else { component as f32 };
            let v = (raw * prep.scale - prep.mean[ch]) / prep.std[ch];
            let ix = match layout {
                Layout::Nchw => ch * plane + pos,
                Layout::Nhwc => pos * c + ch,
            };
            values[ix] = v;
        }
    }
    let tensor = to_elem_type(values, spec, Some(prep.scale))?;
    Ok((tensor, placement))
}

/// Converts normalised float values into the element type `spec` asks for.
///
/// Integer inputs with quantization parameters are quantized with them;
/// without, u8 takes raw 0..255 pixels (undoing `pixel_scale`) and i8 takes
/// pixels shifted by -128, the convention of integer-input vision models.
pub fn to_elem_type(values: Vec<f32>, spec: &TensorSpec, pixel_scale: Option<f32>) -> Result<Tensor, PreprocessError> {
    let shape = spec.shape.clone();
    let data = match (spec.elem_type, spec.quantization) {
        (ElemType::F32, _) => Data::F32(values),
        (ElemType::F64, _) => Data::F64(values.into_iter().map(f64::from).collect()),
        (ElemType::U8, Some(q)) => {
            Data::U8(values.iter().map(|&v| quantize(v, q.scale, q.zero_point, 0.0, 255.0) as u8).collect())
        }
        (ElemType::I8, Some(q)) => {
            Data::I8(values.iter().map(|&v| quantize(v, q.scale, q.zero_point, -128.0, 127.0) as i8).collect())
        }
        (ElemType::U8, None) => {
            let unscale = pixel_scale.map(|s| 1.0 / s).unwrap_or(1.0);
            Data::U8(values.iter().map(|&v| (v * unscale).round().clamp(0.0, 255.0) as u8).collect())
        }
        (ElemType::I8, None) => {
            let unscale = pixel_scale.map(|s| 1.0 / s).unwrap_or(1.0);
            Data::I8(values.iter().map(|&v| ((v * unscale).round() - 128.0).clamp(-128.0, 127.0) as i8).collect())
        }
        (ElemType::I32, _) => Data::I32(values.iter().map(|&v| v.round() as i32).collect()),
        (ElemType::I64, _) => Data::I64(values.iter().map(|&v| v.round() as i64).collect()),
        (other, _) => {
            return Err(PreprocessError::Mismatch {
                input: spec.name.clone(),
                reason: format!("cannot feed numbers to a {other} input"),
            })
        }
    };
    Tensor::new(shape, data).map_err(|e| PreprocessError::Mismatch { input: spec.name.clone(), reason: e.to_string() })
}

/// Affine quantization with round-half-to-even, as ONNX QuantizeLinear does.
pub fn quantize(v: f32, scale: f32, zero_point: i64, lo: f32, hi: f32) -> f32 {
    ((v / scale).round_ties_even() + zero_point as f32).clamp(lo, hi)
}

/// Fits a float array (from JSON, CSV or `.npy`) to a model input: same
/// element count (a missing batch dimension is fine), converted to its type.
pub fn array_to_tensor(given: &Tensor, spec: &TensorSpec) -> Result<Tensor, PreprocessError> {
    let want: usize = spec.shape.iter().product();
    if given.len() != want {
        return Err(PreprocessError::Mismatch {
            input: spec.name.clone(),
            reason: format!(
                "expects shape {:?} ({want} values), got shape {:?} ({} values)",
                spec.shape,
                given.shape,
                given.len()
            ),
        });
    }
    if given.elem_type() == spec.elem_type {
        return Ok(Tensor { shape: spec.shape.clone(), data: given.data.clone() });
    }
    let values: Vec<f32> = given.data.to_f64_vec().into_iter().map(|v| v as f32).collect();
    to_elem_type(values, spec, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_over_the_side_limit_are_refused_before_decoding() {
        for (w, h) in [(MAX_IMAGE_SIDE + 1, 1), (1, MAX_IMAGE_SIDE + 1)] {
            let img = image::GrayImage::new(w, h);
            let mut png = Vec::new();
            img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
            let err = decode_image(&png).unwrap_err().to_string();
            assert!(err.contains("limit"), "{w}x{h}: {err}");
        }
        let ok = image::GrayImage::new(MAX_IMAGE_SIDE, 1);
        let mut png = Vec::new();
        ok.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        assert_eq!(decode_image(&png).unwrap().dimensions(), (MAX_IMAGE_SIDE, 1));
    }

    fn spec(shape: &[usize], elem_type: ElemType) -> TensorSpec {
        TensorSpec { name: "x".into(), shape: shape.to_vec(), elem_type, quantization: None }
    }

    fn two_pixel_image() -> RgbImage {
        let mut img = RgbImage::new(2, 1);
        img.put_pixel(0, 0, image::Rgb([255, 0, 10]));
        img.put_pixel(1, 0, image::Rgb([0, 128, 20]));
        img
    }

    #[test]
    fn nchw_rgb_scaled_to_unit_range() {
        let (t, _) =
            image_to_tensor(&two_pixel_image(), &spec(&[1, 3, 1, 2], ElemType::F32), &ImagePrep::default()).unwrap();
        let Data::F32(v) = t.data else { panic!() };
        let e = [1.0, 0.0, 0.0, 128.0 / 255.0, 10.0 / 255.0, 20.0 / 255.0];
        for (a, b) in v.iter().zip(e) {
            assert!((a - b).abs() < 1e-6, "{v:?}");
        }
    }

    #[test]
    fn nhwc_bgr_with_mean_and_std() {
        let prep = ImagePrep {
            color: ColorOrder::Bgr,
            layout: Some(Layout::Nhwc),
            scale: 1.0,
            mean: [10.0, 0.0, 0.0],
            std: [2.0, 1.0, 1.0],
            ..Default::default()
        };
        let (t, _) = image_to_tensor(&two_pixel_image(), &spec(&[1, 1, 2, 3], ElemType::F32), &prep).unwrap();
        let Data::F32(v) = t.data else { panic!() };
        // pixel 0 = (B,G,R) = (10,0,255) -> ((10-10)/2, 0, 255); pixel 1 = (20,128,0) -> (5,128,0)
        assert_eq!(v, vec![0.0, 0.0, 255.0, 5.0, 128.0, 0.0]);
    }

    #[test]
    fn letterbox_keeps_aspect_and_pads() {
        let img = RgbImage::from_pixel(40, 20, image::Rgb([200, 0, 0]));
        let (out, p) = fit_image(&img, 20, 20, ResizeMode::Letterbox);
        assert_eq!(p.scale, (0.5, 0.5));
        assert_eq!(p.pad, (0, 5));
        assert_eq!(out.get_pixel(10, 0).0, [114, 114, 114]);
        assert_eq!(out.get_pixel(10, 10).0, [200, 0, 0]);
    }

    #[test]
    fn quantized_input_uses_scale_and_zero_point() {
        let mut s = spec(&[1, 3], ElemType::I8);
        s.quantization = Some(crate::engine::QuantParams { scale: 0.5, zero_point: -10 });
        let t = to_elem_type(vec![1.0, -100.0, 2.25], &s, None).unwrap();
        assert_eq!(t.data, Data::I8(vec![-8, -128, -6]));
    }

    #[test]
    fn non_image_input_is_a_clear_error() {
        let err =
            image_to_tensor(&two_pixel_image(), &spec(&[1, 30], ElemType::F32), &ImagePrep::default()).unwrap_err();
        assert!(err.to_string().contains("not an image"), "{err}");
    }

    #[test]
    fn arrays_must_have_the_right_count() {
        let t = Tensor::from_f32(vec![30], vec![0.0; 30]).unwrap();
        assert_eq!(array_to_tensor(&t, &spec(&[1, 30], ElemType::F32)).unwrap().shape, vec![1, 30]);
        assert!(array_to_tensor(&t, &spec(&[1, 31], ElemType::F32)).is_err());
    }
}
