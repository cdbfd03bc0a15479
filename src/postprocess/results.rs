//! Turning a pipeline's model outputs into a result body: classes with
//! labels, raw values, an anomaly score against a threshold, or detections.

use super::config::{AnomalyScore, PostprocessConfig};
use crate::engine::TensorSpec;
use crate::message::{Anomaly, ImageSize, ResultBody};
use crate::preprocess::ImageGeometry;
use crate::tensor::Tensor;

use super::detect::Detector;
use super::{softmax_in_place, top_k, ClassScore, Softmax};

#[derive(Debug, Clone)]
enum Kind {
    Classify { top_k: usize, min_score: f32, softmax: Softmax },
    Values,
    Anomaly { threshold: f32, score: AnomalyScore, normal_class: Option<usize> },
    Detect(Box<Detector>),
}

/// A configured postprocessor for one model.
#[derive(Debug, Clone)]
pub struct Postprocessor {
    kind: Kind,
    output: usize,
    labels: Vec<String>,
}

/// The body plus every class score (for per-class thresholds).
pub struct Processed {
    /// What is published.
    pub body: ResultBody,
    /// Scores of every class (classification), after softmax.
    pub scores: Vec<f32>,
}

fn output_index(outputs: &[TensorSpec], name: &Option<String>, prefer_classes: bool) -> Result<usize, String> {
    if let Some(name) = name {
        return outputs.iter().position(|o| &o.name == name).ok_or_else(|| {
            let names: Vec<_> = outputs.iter().map(|o| o.name.as_str()).collect();
            format!("the model has no output `{name}` (outputs: {names:?})")
        });
    }
    if prefer_classes {
        let found = outputs.iter().position(|o| {
            matches!(o.elem_type, crate::tensor::ElemType::F32 | crate::tensor::ElemType::F64)
                && o.shape.last().is_some_and(|&c| c >= 2)
                && o.shape[..o.shape.len() - 1].iter().product::<usize>() == 1
        });
        return found.ok_or_else(|| "no output looks like class scores (a float [1, C] tensor)".to_string());
    }
    Ok(0)
}

impl Postprocessor {
    /// Builds from the config (None: classify when labels exist, else values).
    pub fn new(cfg: Option<&PostprocessConfig>, outputs: &[TensorSpec], labels: Vec<String>) -> Result<Self, String> {
        let default;
        let cfg = match cfg {
            Some(c) => c,
            None => {
                default = if labels.is_empty() {
                    PostprocessConfig::Values { output: None }
                } else {
                    PostprocessConfig::Classify { top_k: 3, min_score: 0.0, softmax: Softmax::Auto, output: None }
                };
                &default
            }
        };
        let (kind, output) = match cfg {
            PostprocessConfig::Classify { top_k, min_score, softmax, output } => {
                let ix = output_index(outputs, output, true)?;
                let classes = *outputs[ix].shape.last().unwrap_or(&0);
                if !labels.is_empty() && labels.len() != classes {
                    return Err(format!(
                        "the labels file has {} labels, output `{}` has {classes} classes",
                        labels.len(),
                        outputs[ix].name
                    ));
                }
                (Kind::Classify { top_k: (*top_k).max(1), min_score: *min_score, softmax: *softmax }, ix)
            }
            PostprocessConfig::Values { output } => (Kind::Values, output_index(outputs, output, false)?),
            PostprocessConfig::Anomaly { threshold, score, normal_class, output } => {
                let prefer_classes = *score == AnomalyScore::NotClass;
                let ix = output_index(outputs, output, prefer_classes)?;
                let normal = match (score, normal_class) {
                    (AnomalyScore::NotClass, Some(label)) => Some(
                        labels
                            .iter()
                            .position(|l| l == label)
                            .ok_or_else(|| format!("normal_class `{label}` is not among the labels {labels:?}"))?,
                    ),
                    (AnomalyScore::NotClass, None) => return Err("score = \"not_class\" needs normal_class".into()),
                    _ => None,
                };
                (Kind::Anomaly { threshold: *threshold, score: *score, normal_class: normal }, ix)
            }
            PostprocessConfig::Detect(d) => (Kind::Detect(Box::new(Detector::new(d, outputs, &labels)?)), 0),
        };
        Ok(Postprocessor { kind, output, labels })
    }

    /// `classify`, `values`, `anomaly` or `detect`.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            Kind::Classify { .. } => "classify",
            Kind::Values => "values",
            Kind::Anomaly { .. } => "anomaly",
            Kind::Detect(_) => "detect",
        }
    }

    /// Index of a label, for per-class thresholds.
    pub fn label_index(&self, label: &str) -> Option<usize> {
        self.labels.iter().position(|l| l == label)
    }

    /// The anomaly threshold, if this is an anomaly postprocessor.
    pub fn anomaly_threshold(&self) -> Option<f32> {
        match self.kind {
            Kind::Anomaly { threshold, .. } => Some(threshold),
            _ => None,
        }
    }

    /// Computes the result. `input` is the model input (for reconstruction scores); `geometry`
    /// says how an image input was fitted (detection maps boxes back through it).
    pub fn apply(
        &mut self,
        outputs: &[Tensor],
        input: Option<&Tensor>,
        geometry: Option<&ImageGeometry>,
    ) -> Result<Processed, String> {
        if let Kind::Detect(det) = &mut self.kind {
            let geometry = geometry.ok_or(
                "detection needs an image input (boxes are mapped back through the image preprocessing); got a tensor",
            )?;
            let detections = det.decode(outputs, geometry)?;
            let image = ImageSize { width: geometry.source.0, height: geometry.source.1 };
            let body = ResultBody { detections: Some(detections), image: Some(image), ..Default::default() };
            return Ok(Processed { body, scores: vec![] });
        }
        let out = outputs.get(self.output).ok_or("missing output")?;
        let values: Vec<f32> = match &out.data {
            crate::tensor::Data::F32(v) => v.clone(),
            other => other.to_f64_vec().into_iter().map(|v| v as f32).collect(),
        };
        Ok(match &self.kind {
            Kind::Classify { top_k: k, min_score, softmax } => {
                let mut scores = values;
                if *softmax == Softmax::Always || (*softmax == Softmax::Auto && !super::is_distribution(&scores)) {
                    softmax_in_place(&mut scores);
                }
                let classes: Vec<ClassScore> =
                    top_k(&scores, *k, &self.labels).into_iter().filter(|c| c.score >= *min_score).collect();
                Processed { body: ResultBody { classes: Some(classes), ..Default::default() }, scores }
            }
            Kind::Values => {
                Processed { body: ResultBody { values: Some(values), ..Default::default() }, scores: vec![] }
            }
            Kind::Anomaly { threshold, score, normal_class } => {
                let s = match score {
                    AnomalyScore::Output => *values.first().ok_or("empty output")?,
                    AnomalyScore::Reconstruction => {
                        let input = input.ok_or("reconstruction needs the input tensor")?;
                        let x = input.data.to_f64_vec();
                        if x.len() != values.len() {
                            return Err(format!(
                                "reconstruction: input has {} values, output {}",
                                x.len(),
                                values.len()
                            ));
                        }
                        (x.iter().zip(&values).map(|(a, &b)| (a - b as f64).powi(2)).sum::<f64>() / x.len() as f64)
                            as f32
                    }
                    AnomalyScore::NotClass => {
                        let mut p = values.clone();
                        if !super::is_distribution(&p) {
                            softmax_in_place(&mut p);
                        }
                        1.0 - p.get(normal_class.unwrap_or(0)).copied().unwrap_or(0.0)
                    }
                };
                let anomaly = Anomaly { score: s, threshold: *threshold, anomalous: s >= *threshold };
                Processed { body: ResultBody { anomaly: Some(anomaly), ..Default::default() }, scores: vec![] }
            }
            Kind::Detect(_) => unreachable!("handled above"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::ElemType;

    fn spec(shape: &[usize]) -> TensorSpec {
        TensorSpec { name: "logits".into(), shape: shape.to_vec(), elem_type: ElemType::F32, quantization: None }
    }

    #[test]
    fn classify_with_labels_and_min_score() {
        let labels = vec!["a".to_string(), "b".into(), "c".into()];
        let cfg = PostprocessConfig::Classify { top_k: 3, min_score: 0.2, softmax: Softmax::Never, output: None };
        let mut p = Postprocessor::new(Some(&cfg), &[spec(&[1, 3])], labels).unwrap();
        let out = p.apply(&[Tensor::from_f32(vec![1, 3], vec![0.1, 0.7, 0.2]).unwrap()], None, None).unwrap();
        let classes = out.body.classes.unwrap();
        assert_eq!(classes.iter().map(|c| c.label.as_str()).collect::<Vec<_>>(), ["b", "c"]);
    }

    #[test]
    fn label_count_must_match_classes() {
        let cfg = PostprocessConfig::Classify { top_k: 1, min_score: 0.0, softmax: Softmax::Auto, output: None };
        let e = Postprocessor::new(Some(&cfg), &[spec(&[1, 3])], vec!["a".into()]).unwrap_err();
        assert!(e.contains("1 labels") && e.contains("3 classes"), "{e}");
    }

    #[test]
    fn anomaly_not_class_and_reconstruction() {
        let labels = vec!["normal".to_string(), "fault".into()];
        let cfg = PostprocessConfig::Anomaly {
            threshold: 0.5,
            score: AnomalyScore::NotClass,
            normal_class: Some("normal".into()),
            output: None,
        };
        let mut p = Postprocessor::new(Some(&cfg), &[spec(&[1, 2])], labels).unwrap();
        let a = p
            .apply(&[Tensor::from_f32(vec![1, 2], vec![0.3, 0.7]).unwrap()], None, None)
            .unwrap()
            .body
            .anomaly
            .unwrap();
        assert!((a.score - 0.7).abs() < 1e-6 && a.anomalous);

        let cfg = PostprocessConfig::Anomaly {
            threshold: 1.0,
            score: AnomalyScore::Reconstruction,
            normal_class: None,
            output: None,
        };
        let mut p = Postprocessor::new(Some(&cfg), &[spec(&[1, 2])], vec![]).unwrap();
        let x = Tensor::from_f32(vec![1, 2], vec![1.0, 3.0]).unwrap();
        let y = Tensor::from_f32(vec![1, 2], vec![1.0, 1.0]).unwrap();
        let a = p.apply(&[y], Some(&x), None).unwrap().body.anomaly.unwrap();
        assert_eq!((a.score, a.anomalous), (2.0, true));
    }

    #[test]
    fn detect_maps_boxes_through_the_geometry_and_needs_it() {
        let cfg: PostprocessConfig = toml::from_str("type = \"detect\"").unwrap();
        let mut p = Postprocessor::new(Some(&cfg), &[spec(&[1, 5, 8])], vec!["thing".into()]).unwrap();
        assert_eq!(p.kind_name(), "detect");
        // One box at model (10..30, 10..30) scoring 0.9; the other seven score 0.
        let mut v = vec![0.0; 5 * 8];
        v[0] = 20.0; // cx
        v[8] = 20.0; // cy
        v[16] = 20.0; // w
        v[24] = 20.0; // h
        v[32] = 0.9; // class 0
        let out = Tensor::from_f32(vec![1, 5, 8], v).unwrap();
        let e = p.apply(std::slice::from_ref(&out), None, None).err().unwrap();
        assert!(e.contains("image input"), "{e}");
        let geometry = ImageGeometry {
            placement: crate::preprocess::Placement { scale: (0.5, 0.5), pad: (0, 0) },
            source: (128, 128),
            input: (64, 64),
        };
        let body = p.apply(&[out], None, Some(&geometry)).unwrap().body;
        let d = &body.detections.unwrap()[0];
        assert_eq!((d.label.as_str(), d.score, d.bbox.x1, d.bbox.y2), ("thing", 0.9, 20.0, 60.0));
        assert_eq!(body.image, Some(ImageSize { width: 128, height: 128 }));
    }

    #[test]
    fn unknown_output_is_named() {
        let cfg = PostprocessConfig::Values { output: Some("nope".into()) };
        let e = Postprocessor::new(Some(&cfg), &[spec(&[1, 2])], vec![]).unwrap_err();
        assert!(e.contains("`nope`") && e.contains("logits"), "{e}");
    }
}
