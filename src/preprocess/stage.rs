//! The preprocessing stage of a pipeline: picks image, window, audio, tabular or
//! pass-through handling for each input and writes the model input tensor,
//! reusing one buffer.

use super::config::{PreprocessConfig, WindowLayout};
use crate::engine::TensorSpec;
use crate::message::{Gives, SourceOutput};
use crate::message::{Input, Values};
use crate::tensor::{Data, ElemType, Tensor};

use super::audio::AudioStage;
use super::window::{Windower, MAX_CHANNELS};
use super::{array_to_tensor, image_geometry, image_to_tensor_with_geometry, to_elem_type, ImageGeometry, ImagePrep};

/// Most distinct publishers (topics) one windowed pipeline keeps apart.
pub const MAX_ORIGINS: usize = 32;

struct Tabular {
    features: Option<Vec<String>>,
    mean: Vec<f32>,
    inv_std: Vec<f32>,
}

/// One pipeline's preprocessing.
pub struct Preprocessor {
    spec: TensorSpec,
    image: ImagePrep,
    window: Option<Windower>,
    /// MQTT sources with wildcards mix publishers: one window per origin topic.
    per_origin: bool,
    origin_windows: Vec<(String, Windower)>,
    tabular: Option<Tabular>,
    audio: Option<AudioStage>,
    scratch: Vec<f32>,
}

/// Window geometry from the model's `[1, a, b]` input: (channels, window, layout).
fn window_geometry(
    spec: &TensorSpec,
    channels: Option<usize>,
    layout: Option<WindowLayout>,
) -> Result<(usize, usize, WindowLayout), String> {
    let s = &spec.shape;
    if s.len() != 3 || s[0] != 1 {
        return Err(format!(
            "input `{}` has shape {s:?}; a window needs a [1, channels, window] or [1, window, channels] input",
            spec.name
        ));
    }
    let layout = match (layout, channels) {
        (Some(l), _) => l,
        (None, Some(c)) if s[1] == c => WindowLayout::ChannelsFirst,
        (None, Some(c)) if s[2] == c => WindowLayout::ChannelsLast,
        (None, Some(c)) => {
            return Err(format!("input `{}` has shape {s:?}, which has no dimension of {c} channels", spec.name))
        }
        (None, None) if s[1] <= MAX_CHANNELS && s[1] <= s[2] => WindowLayout::ChannelsFirst,
        (None, None) => WindowLayout::ChannelsLast,
    };
    let (c, w) = match layout {
        WindowLayout::ChannelsFirst => (s[1], s[2]),
        WindowLayout::ChannelsLast => (s[2], s[1]),
    };
    if let Some(want) = channels {
        if want != c {
            return Err(format!("input `{}` has shape {s:?}: {c} channels, the config says {want}", spec.name));
        }
    }
    Ok((c, w, layout))
}

impl Preprocessor {
    /// Builds the stage and checks that the model input fits what the source gives.
    pub fn new(cfg: &PreprocessConfig, spec: &TensorSpec, source: &SourceOutput) -> Result<Self, String> {
        let mut p = Preprocessor {
            spec: spec.clone(),
            image: ImagePrep::default(),
            window: None,
            per_origin: source.per_origin,
            origin_windows: Vec::new(),
            tabular: None,
            audio: None,
            scratch: Vec::new(),
        };
        let rank = spec.shape.len();
        match cfg {
            PreprocessConfig::Auto => match source.gives {
                Gives::Frames => {
                    image_geometry(spec, None).map_err(|e| e.to_string())?;
                }
                Gives::Values if rank == 3 => p.window = Some(p.make_window(None, None, None, None, None, None)?),
                Gives::Values if rank == 2 => p.tabular = Some(p.make_tabular(None, None, None)?),
                Gives::Values => {
                    return Err(format!(
                        "input `{}` has shape {:?}: numeric sources feed [1, features] or [1, channels, window] inputs",
                        spec.name, spec.shape
                    ))
                }
                Gives::Unknown => {
                    if rank == 3 {
                        p.window = p.make_window(None, None, None, None, None, None).ok();
                    } else if rank == 2 {
                        p.tabular = p.make_tabular(None, None, None).ok();
                    }
                }
            },
            PreprocessConfig::Image { resize, color, layout, scale, mean, std } => {
                if source.gives == Gives::Values {
                    return Err("image preprocessing needs a source of images".into());
                }
                p.image = ImagePrep {
                    resize: *resize,
                    color: *color,
                    layout: *layout,
                    scale: scale.unwrap_or(1.0 / 255.0),
                    mean: mean.unwrap_or([0.0; 3]),
                    std: std.unwrap_or([1.0; 3]),
                };
                if p.image.std.contains(&0.0) {
                    return Err("std must not contain 0".into());
                }
                image_geometry(spec, *layout).map_err(|e| e.to_string())?;
            }
            PreprocessConfig::Window { window, hop, channels, layout, mean, std } => {
                p.window = Some(p.make_window(*window, *hop, *channels, *layout, mean.as_deref(), std.as_deref())?);
            }
            PreprocessConfig::Tabular { features, mean, std } => {
                if rank != 2 || spec.shape[0] != 1 {
                    return Err(format!(
                        "input `{}` has shape {:?}; tabular rows need a [1, features] input",
                        spec.name, spec.shape
                    ));
                }
                p.tabular = Some(p.make_tabular(features.clone(), mean.as_deref(), std.as_deref())?);
            }
            PreprocessConfig::Audio(a) => p.audio = Some(AudioStage::new(a, spec, source)?),
            PreprocessConfig::None => {}
        }
        Ok(p)
    }

    fn make_window(
        &self,
        window: Option<usize>,
        hop: Option<usize>,
        channels: Option<usize>,
        layout: Option<WindowLayout>,
        mean: Option<&[f32]>,
        std: Option<&[f32]>,
    ) -> Result<Windower, String> {
        let (c, w, layout) = window_geometry(&self.spec, channels, layout)?;
        if let Some(want) = window {
            if want != w {
                return Err(format!(
                    "input `{}` has shape {:?}: windows of {w} samples, the config says {want}",
                    self.spec.name, self.spec.shape
                ));
            }
        }
        Windower::new(w, hop.unwrap_or(w), c, layout, mean, std).map_err(|e| e.0)
    }

    fn make_tabular(
        &self,
        features: Option<Vec<String>>,
        mean: Option<&[f32]>,
        std: Option<&[f32]>,
    ) -> Result<Tabular, String> {
        let n = *self.spec.shape.last().unwrap_or(&0);
        let check = |what: &str, len: usize| {
            if len != n {
                Err(format!("{what} has {len} entries, input `{}` takes {n} features", self.spec.name))
            } else {
                Ok(())
            }
        };
        if let Some(f) = &features {
            check("features", f.len())?;
        }
        let mean = mean.map(|m| m.to_vec()).unwrap_or_else(|| vec![0.0; n]);
        check("mean", mean.len())?;
        let std = std.map(|s| s.to_vec()).unwrap_or_else(|| vec![1.0; n]);
        check("std", std.len())?;
        if std.contains(&0.0) {
            return Err("std must not contain 0".into());
        }
        Ok(Tabular { features, mean, inv_std: std.iter().map(|s| 1.0 / s).collect() })
    }

    /// Turns one input into zero or more model inputs (a message of several
    /// sensor samples may complete several windows); `ready` runs on each, with the
    /// image geometry when the input was an image (detection maps boxes back through it).
    pub fn feed(
        &mut self,
        input: &Input,
        buf: &mut Tensor,
        mut ready: impl FnMut(&Tensor, Option<&ImageGeometry>),
    ) -> Result<(), String> {
        match input {
            Input::Frame(f) => {
                let (t, geometry) =
                    image_to_tensor_with_geometry(&f.image, &self.spec, &self.image).map_err(|e| e.to_string())?;
                ready(&t, Some(&geometry));
            }
            Input::Tensor { tensor, .. } => {
                let t = array_to_tensor(tensor, &self.spec).map_err(|e| e.to_string())?;
                ready(&t, None);
            }
            Input::Values(v) if self.audio.is_some() => {
                if let Some(audio) = self.audio.as_mut() {
                    audio.feed(&v.values, buf, |t| ready(t, None))?;
                }
            }
            Input::Values(v) => {
                let window = match (self.per_origin, self.window.as_mut()) {
                    (true, Some(template)) => {
                        let key = v.origin.as_deref().unwrap_or("");
                        let ix = match self.origin_windows.iter().position(|(k, _)| k == key) {
                            Some(ix) => ix,
                            None if self.origin_windows.len() < MAX_ORIGINS => {
                                self.origin_windows.push((key.to_string(), template.fresh()));
                                self.origin_windows.len() - 1
                            }
                            None => {
                                return Err(format!(
                                    "more than {MAX_ORIGINS} topics feed this pipeline's windows; `{key}` ignored"
                                ))
                            }
                        };
                        Some(&mut self.origin_windows[ix].1)
                    }
                    (_, w) => w,
                };
                if let Some(w) = window {
                    let c = w.channels();
                    if v.values.is_empty() || v.values.len() % c != 0 {
                        return Err(format!("{} values do not make whole samples of {c} channels", v.values.len()));
                    }
                    for sample in v.values.chunks_exact(c) {
                        if w.push(sample) {
                            if self.spec.elem_type == ElemType::F32 {
                                if let Data::F32(dst) = &mut buf.data {
                                    w.fill(dst);
                                }
                                ready(buf, None);
                            } else {
                                self.scratch.resize(self.spec.shape.iter().product(), 0.0);
                                w.fill(&mut self.scratch);
                                let t =
                                    to_elem_type(self.scratch.clone(), &self.spec, None).map_err(|e| e.to_string())?;
                                ready(&t, None);
                            }
                        }
                    }
                } else if let Some(tab) = &self.tabular {
                    let row = tabular_row(tab, v)?;
                    let t = to_elem_type(row, &self.spec, None).map_err(|e| e.to_string())?;
                    ready(&t, None);
                } else {
                    let t = Tensor::from_f32(vec![v.values.len()], v.values.clone()).map_err(|e| e.to_string())?;
                    let t = array_to_tensor(&t, &self.spec).map_err(|e| e.to_string())?;
                    ready(&t, None);
                }
            }
        }
        Ok(())
    }

    /// A zeroed tensor shaped like the model input, to pass to `feed` as `buf`.
    pub fn buffer(&self) -> Tensor {
        let n: usize = self.spec.shape.iter().product();
        Tensor { shape: self.spec.shape.clone(), data: Data::F32(vec![0.0; n]) }
    }
}

fn tabular_row(tab: &Tabular, v: &Values) -> Result<Vec<f32>, String> {
    let n = tab.mean.len();
    let raw: Vec<f32> = match (&tab.features, &v.names) {
        (Some(features), Some(names)) => features
            .iter()
            .map(|f| {
                names
                    .iter()
                    .position(|n| n == f)
                    .map(|i| v.values[i])
                    .ok_or_else(|| format!("feature `{f}` missing from the input"))
            })
            .collect::<Result<_, _>>()?,
        _ => v.values.clone(),
    };
    if raw.len() != n {
        return Err(format!("{} values given, the model takes {n} features", raw.len()));
    }
    Ok(raw.iter().enumerate().map(|(i, x)| (x - tab.mean[i]) * tab.inv_std[i]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn spec(shape: &[usize]) -> TensorSpec {
        TensorSpec { name: "x".into(), shape: shape.to_vec(), elem_type: ElemType::F32, quantization: None }
    }

    fn lines() -> SourceOutput {
        SourceOutput::values("lines")
    }

    fn values(v: Vec<f32>, names: Option<Vec<&str>>) -> Input {
        Input::Values(Values {
            values: v,
            names: names.map(|n| n.into_iter().map(String::from).collect()),
            captured: SystemTime::now(),
            origin: None,
        })
    }

    #[test]
    fn auto_windows_a_channels_first_input() {
        let mut p = Preprocessor::new(&PreprocessConfig::Auto, &spec(&[1, 2, 3]), &lines()).unwrap();
        let mut buf = p.buffer();
        let mut got = Vec::new();
        // one message with 4 samples of 2 channels: the first window is ready at the 3rd sample
        p.feed(&values(vec![0.0, 10.0, 1.0, 11.0, 2.0, 12.0, 3.0, 13.0], None), &mut buf, |t, _| got.push(t.clone()))
            .unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].data, Data::F32(vec![0.0, 1.0, 2.0, 10.0, 11.0, 12.0]));
        assert!(
            p.feed(&values(vec![1.0, 2.0, 3.0], None), &mut buf, |_, _| {}).is_err(),
            "3 values are not whole samples"
        );
    }

    #[test]
    fn mqtt_publishers_get_windows_of_their_own() {
        let mqtt = SourceOutput { per_origin: true, ..SourceOutput::values("mqtt") };
        let mut p = Preprocessor::new(&PreprocessConfig::Auto, &spec(&[1, 1, 2]), &mqtt).unwrap();
        let mut buf = p.buffer();
        let from = |topic: &str, x: f32| {
            Input::Values(Values {
                values: vec![x],
                names: None,
                captured: SystemTime::now(),
                origin: Some(topic.into()),
            })
        };
        let mut got = Vec::new();
        for input in [from("s/a/a", 1.0), from("s/b/a", 100.0), from("s/a/a", 2.0), from("s/b/a", 200.0)] {
            p.feed(&input, &mut buf, |t, _| got.push(t.clone())).unwrap();
        }
        assert_eq!(
            got.iter().map(|t| t.data.clone()).collect::<Vec<_>>(),
            [Data::F32(vec![1.0, 2.0]), Data::F32(vec![100.0, 200.0])]
        );
    }

    #[test]
    fn tabular_orders_named_features_and_scales() {
        let cfg: PreprocessConfig =
            toml::from_str("type = \"tabular\"\nfeatures = [\"b\", \"a\"]\nmean = [1.0, 0.0]\nstd = [2.0, 1.0]")
                .unwrap();
        let mut p = Preprocessor::new(&cfg, &spec(&[1, 2]), &lines()).unwrap();
        let mut buf = p.buffer();
        let mut got = Vec::new();
        p.feed(&values(vec![5.0, 3.0], Some(vec!["a", "b"])), &mut buf, |t, _| got.push(t.clone())).unwrap();
        assert_eq!(got[0].data, Data::F32(vec![1.0, 5.0]));
        let e = p.feed(&values(vec![5.0], Some(vec!["a"])), &mut buf, |_, _| {}).unwrap_err();
        assert!(e.contains("`b`"), "{e}");
    }

    #[test]
    fn mismatched_model_inputs_are_explained() {
        let e = Preprocessor::new(&PreprocessConfig::Auto, &spec(&[1, 3, 32, 32]), &lines()).err().unwrap();
        assert!(e.contains("[1, 3, 32, 32]"), "{e}");
        let frames = SourceOutput { gives: Gives::Frames, ..SourceOutput::values("synthetic") };
        assert!(Preprocessor::new(&PreprocessConfig::Auto, &spec(&[1, 30]), &frames).is_err());
        let cfg: PreprocessConfig = toml::from_str("type = \"window\"\nwindow = 64").unwrap();
        let e = Preprocessor::new(&cfg, &spec(&[1, 3, 128]), &lines()).err().unwrap();
        assert!(e.contains("128") && e.contains("64"), "{e}");
    }
}
