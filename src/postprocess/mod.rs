//! Pure functions that turn output tensors into results: class scores with
//! labels and top-k, with softmax applied when the model emits logits; object
//! detections in `detect`.

pub mod config;
pub mod detect;
pub mod events;
pub mod results;
pub mod snapshot;

use std::path::{Path, PathBuf};

use crate::tensor::Tensor;

pub use crate::message::ClassScore;

/// When to apply softmax to class scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Softmax {
    /// Apply when the scores are not already a probability distribution.
    #[default]
    Auto,
    /// Always apply.
    Always,
    /// Never apply.
    Never,
}

/// True when the values already look like probabilities (all in [0,1], summing to ~1).
pub fn is_distribution(scores: &[f32]) -> bool {
    let sum: f32 = scores.iter().sum();
    scores.iter().all(|&s| (0.0..=1.0).contains(&s)) && (sum - 1.0).abs() < 1e-3
}

/// Numerically stable softmax, in place.
pub fn softmax_in_place(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    if sum > 0.0 {
        for s in scores.iter_mut() {
            *s /= sum;
        }
    }
}

/// The `k` best classes, best first; ties keep the lower index first.
pub fn top_k(scores: &[f32], k: usize, labels: &[String]) -> Vec<ClassScore> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
    idx.into_iter()
        .take(k)
        .map(|i| ClassScore {
            index: i,
            label: labels.get(i).cloned().unwrap_or_else(|| i.to_string()),
            score: scores[i],
        })
        .collect()
}

/// Scores of the first float output that looks like one row of class scores.
pub fn class_scores(outputs: &[Tensor], softmax: Softmax) -> Option<(usize, Vec<f32>)> {
    outputs.iter().enumerate().find_map(|(ix, t)| {
        let classes = *t.shape.last()?;
        let rows: usize = t.shape[..t.shape.len() - 1].iter().product();
        if classes < 2 || rows != 1 {
            return None;
        }
        let mut v: Vec<f32> = match &t.data {
            crate::tensor::Data::F32(v) => v.clone(),
            crate::tensor::Data::F64(v) => v.iter().map(|&x| x as f32).collect(),
            _ => return None,
        };
        if softmax == Softmax::Always || (softmax == Softmax::Auto && !is_distribution(&v)) {
            softmax_in_place(&mut v);
        }
        Some((ix, v))
    })
}

/// Reads a labels file: one label per line, blank lines kept as empty labels.
pub fn read_labels(path: &Path) -> std::io::Result<Vec<String>> {
    Ok(std::fs::read_to_string(path)?.lines().map(|l| l.trim().to_string()).collect())
}

/// Finds `<stem>.labels.txt` next to the model, dropping `_suffix` parts of
/// the stem until one exists (`digits_cnn_int8` -> `digits.labels.txt`). A
/// converted model (`digits_cnn_int8.nnef.tgz`) goes by its ONNX stem.
pub fn find_labels(model: &Path) -> Option<PathBuf> {
    let dir = model.parent()?;
    let mut stem = model.file_stem()?.to_str()?.to_string();
    if let Some(onnx_stem) = stem.strip_suffix(".nnef") {
        stem = onnx_stem.to_string();
    }
    loop {
        let candidate = dir.join(format!("{stem}.labels.txt"));
        if candidate.is_file() {
            return Some(candidate);
        }
        let cut = stem.rfind('_')?;
        stem.truncate(cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut v = vec![1.0, 3.0, 2.0, 10.0];
        softmax_in_place(&mut v);
        assert!((v.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(v[3] > 0.99 && v[1] > v[2] && v[2] > v[0]);
    }

    #[test]
    fn top_k_orders_and_labels() {
        let labels = vec!["a".to_string(), "b".to_string()];
        let top = top_k(&[0.1, 0.7, 0.2], 2, &labels);
        assert_eq!(top[0], ClassScore { index: 1, label: "b".into(), score: 0.7 });
        assert_eq!(top[1].label, "2");
    }

    #[test]
    fn auto_softmax_leaves_probabilities_alone() {
        let probs = Tensor::from_f32(vec![1, 2], vec![0.25, 0.75]).unwrap();
        assert_eq!(class_scores(&[probs], Softmax::Auto).unwrap().1, vec![0.25, 0.75]);
        let logits = Tensor::from_f32(vec![1, 2], vec![0.0, 0.0]).unwrap();
        assert_eq!(class_scores(&[logits], Softmax::Auto).unwrap().1, vec![0.5, 0.5]);
    }

    #[test]
    fn labels_are_found_by_stripping_suffixes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("digits.labels.txt"), "0\n1\n").unwrap();
        let found = find_labels(&dir.path().join("digits_cnn_int8.onnx")).unwrap();
        assert_eq!(found, dir.path().join("digits.labels.txt"));
        assert!(find_labels(&dir.path().join("other.onnx")).is_none());
        std::fs::write(dir.path().join("vibration.nnef.labels.txt"), "wrong\n").unwrap();
        std::fs::write(dir.path().join("vibration.labels.txt"), "a\n").unwrap();
        let converted = find_labels(&dir.path().join("vibration.nnef.tgz")).unwrap();
        assert_eq!(converted, dir.path().join("vibration.labels.txt"));
    }
}
