//! Event semantics of an output: publish every result, only when the top
//! class (or, for detections, the set of labels present) changes, or only
//! when a score crosses a threshold, with debounce (N consecutive results)
//! and hysteresis. Pure state machines.

use super::config::When;
use crate::message::{Detection, Event, ResultBody};

/// What an output should do with one result.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Leave it out.
    Skip,
    /// Publish it, with the event that caused it (None for `every`).
    Publish(Option<Event>),
}

/// The per-output state machine.
#[derive(Debug, Clone)]
pub struct EventFilter {
    when: When,
    debounce: u32,
    threshold: f32,
    hysteresis: f32,
    current: Option<String>,
    candidate: Option<String>,
    streak: u32,
    active: bool,
    /// Detections: every label seen so far, with its debounced presence.
    labels: Vec<LabelState>,
}

/// Whether a label counts as present, and for how many results in a row it has said otherwise.
#[derive(Debug, Clone)]
struct LabelState {
    label: String,
    present: bool,
    streak: u32,
}

impl EventFilter {
    /// A filter; `threshold` is only used with `When::Threshold`.
    pub fn new(when: When, debounce: u32, threshold: f32, hysteresis: f32) -> Self {
        EventFilter {
            when,
            debounce: debounce.max(1),
            threshold,
            hysteresis,
            current: None,
            candidate: None,
            streak: 0,
            active: false,
            labels: Vec::new(),
        }
    }

    /// Feeds one result; `score` is the value compared with the threshold.
    pub fn decide(&mut self, body: &ResultBody, score: Option<f32>) -> Decision {
        match self.when {
            When::Every => Decision::Publish(None),
            When::OnChange if body.detections.is_some() => {
                self.on_labels_change(body.detections.as_deref().unwrap_or_default())
            }
            When::OnChange => {
                let Some(top) = body.classes.as_ref().and_then(|c| c.first()).map(|c| c.label.clone()) else {
                    // No class (all below min_score) breaks a run of agreeing results.
                    self.candidate = None;
                    self.streak = 0;
                    return Decision::Skip;
                };
                if self.current.as_deref() == Some(top.as_str()) {
                    self.candidate = None;
                    self.streak = 0;
                    return Decision::Skip;
                }
                if self.candidate.as_deref() == Some(top.as_str()) {
                    self.streak += 1;
                } else {
                    self.candidate = Some(top.clone());
                    self.streak = 1;
                }
                if self.streak < self.debounce {
                    return Decision::Skip;
                }
                let from = self.current.replace(top.clone());
                self.candidate = None;
                self.streak = 0;
                Decision::Publish(Some(Event::Change { from, to: top }))
            }
            When::Threshold => {
                let Some(score) = score else {
                    self.streak = 0;
                    return Decision::Skip;
                };
                let crossing =
                    if self.active { score < self.threshold - self.hysteresis } else { score >= self.threshold };
                if !crossing {
                    self.streak = 0;
                    return Decision::Skip;
                }
                self.streak += 1;
                if self.streak < self.debounce {
                    return Decision::Skip;
                }
                self.streak = 0;
                self.active = !self.active;
                let threshold = self.threshold;
                Decision::Publish(Some(if self.active {
                    Event::Rise { score, threshold }
                } else {
                    Event::Fall { score, threshold }
                }))
            }
        }
    }

    /// A label appears once it is detected in `debounce` results in a row, and leaves once it is
    /// missing from `debounce` results in a row; a result where any label did either is published.
    fn on_labels_change(&mut self, detections: &[Detection]) -> Decision {
        for d in detections {
            if !self.labels.iter().any(|s| s.label == d.label) {
                self.labels.push(LabelState { label: d.label.clone(), present: false, streak: 0 });
            }
        }
        let (mut appeared, mut left) = (Vec::new(), Vec::new());
        for s in &mut self.labels {
            let seen = detections.iter().any(|d| d.label == s.label);
            if seen == s.present {
                s.streak = 0;
                continue;
            }
            s.streak += 1;
            if s.streak >= self.debounce {
                s.present = seen;
                s.streak = 0;
                if seen { &mut appeared } else { &mut left }.push(s.label.clone());
            }
        }
        if appeared.is_empty() && left.is_empty() {
            return Decision::Skip;
        }
        let mut present: Vec<String> = self.labels.iter().filter(|s| s.present).map(|s| s.label.clone()).collect();
        for list in [&mut appeared, &mut left, &mut present] {
            list.sort();
        }
        Decision::Publish(Some(Event::LabelsChanged { appeared, left, present }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postprocess::ClassScore;

    fn top(label: &str) -> ResultBody {
        ResultBody {
            classes: Some(vec![ClassScore { index: 0, label: label.into(), score: 1.0 }]),
            ..Default::default()
        }
    }

    fn published(f: &mut EventFilter, labels: &[&str]) -> Vec<usize> {
        labels
            .iter()
            .enumerate()
            .filter(|(_, l)| matches!(f.decide(&top(l), None), Decision::Publish(_)))
            .map(|(i, _)| i)
            .collect()
    }

    #[test]
    fn on_change_publishes_first_and_changes() {
        let mut f = EventFilter::new(When::OnChange, 1, 0.0, 0.0);
        assert_eq!(published(&mut f, &["a", "a", "b", "b", "a"]), vec![0, 2, 4]);
    }

    #[test]
    fn on_change_debounce_ignores_blips() {
        let mut f = EventFilter::new(When::OnChange, 2, 0.0, 0.0);
        // a a (-> a at 1) b (blip) a b b (-> b at 6)
        assert_eq!(published(&mut f, &["a", "a", "b", "a", "a", "b", "b"]), vec![1, 6]);
        let mut f = EventFilter::new(When::OnChange, 2, 0.0, 0.0);
        let e = (0..2).map(|_| f.decide(&top("x"), None)).last().unwrap();
        assert_eq!(e, Decision::Publish(Some(Event::Change { from: None, to: "x".into() })));
    }

    #[test]
    fn threshold_with_hysteresis_and_debounce() {
        let mut f = EventFilter::new(When::Threshold, 2, 0.5, 0.1);
        let scores = [0.1, 0.6, 0.2, 0.6, 0.7, 0.45, 0.3, 0.35, 0.9];
        let out: Vec<(usize, Decision)> = scores
            .iter()
            .enumerate()
            .map(|(i, &s)| (i, f.decide(&ResultBody::default(), Some(s))))
            .filter(|(_, d)| *d != Decision::Skip)
            .collect();
        // rise needs two >= 0.5 in a row (3, 4); 0.45 is inside the hysteresis band;
        // fall needs two < 0.4 in a row (6, 7).
        assert_eq!(
            out,
            vec![
                (4, Decision::Publish(Some(Event::Rise { score: 0.7, threshold: 0.5 }))),
                (7, Decision::Publish(Some(Event::Fall { score: 0.35, threshold: 0.5 }))),
            ]
        );
    }

    fn seen(labels: &[&str]) -> ResultBody {
        let detections = labels
            .iter()
            .map(|l| Detection {
                label: l.to_string(),
                index: 0,
                score: 0.9,
                bbox: crate::message::BoundingBox { x1: 0.0, y1: 0.0, x2: 1.0, y2: 1.0 },
            })
            .collect();
        ResultBody { detections: Some(detections), ..Default::default() }
    }

    fn change(appeared: &[&str], left: &[&str], present: &[&str]) -> Decision {
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Decision::Publish(Some(Event::LabelsChanged { appeared: v(appeared), left: v(left), present: v(present) }))
    }

    #[test]
    fn detections_publish_when_the_set_of_labels_changes_after_debounce() {
        let mut f = EventFilter::new(When::OnChange, 2, 0.0, 0.0);
        let frames: [&[&str]; 10] = [
            &[],                   // 0 nothing yet
            &["person"],           // 1 person 1/2
            &["person", "person"], // 2 person 2/2: appears (two boxes count once)
            &["person", "car"],    // 3 car 1/2
            &["person"],           // 4 car blip gone: no change
            &["car", "person"],    // 5 car 1/2
            &["car", "person"],    // 6 car 2/2: appears
            &["car"],              // 7 person missing 1/2
            &[],                   // 8 person 2/2 leaves; car missing 1/2
            &[],                   // 9 car 2/2 leaves
        ];
        let out: Vec<(usize, Decision)> = frames
            .iter()
            .enumerate()
            .map(|(i, l)| (i, f.decide(&seen(l), None)))
            .filter(|(_, d)| *d != Decision::Skip)
            .collect();
        assert_eq!(
            out,
            vec![
                (2, change(&["person"], &[], &["person"])),
                (6, change(&["car"], &[], &["car", "person"])),
                (8, change(&[], &["person"], &["car"])),
                (9, change(&[], &["car"], &[])),
            ]
        );
        // debounce 1: the first frame with labels publishes them, a frame with another set swaps them.
        let mut f = EventFilter::new(When::OnChange, 1, 0.0, 0.0);
        assert_eq!(f.decide(&seen(&["dog", "cat"]), None), change(&["cat", "dog"], &[], &["cat", "dog"]));
        assert_eq!(f.decide(&seen(&["cat", "dog"]), None), Decision::Skip);
        assert_eq!(f.decide(&seen(&["bird", "cat"]), None), change(&["bird"], &["dog"], &["bird", "cat"]));
    }

    #[test]
    fn every_publishes_everything() {
        let mut f = EventFilter::new(When::Every, 1, 0.0, 0.0);
        assert_eq!(published(&mut f, &["a", "a", "a"]), vec![0, 1, 2]);
    }
}
