//! Event semantics of an output: publish every result, only when the top
//! class changes, or only when a score crosses a threshold, with debounce
//! (N consecutive results) and hysteresis. Pure state machines.

use crate::config::When;
use crate::message::{Event, ResultBody};

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
        }
    }

    /// Feeds one result; `score` is the value compared with the threshold.
    pub fn decide(&mut self, body: &ResultBody, score: Option<f32>) -> Decision {
        match self.when {
            When::Every => Decision::Publish(None),
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

    #[test]
    fn every_publishes_everything() {
        let mut f = EventFilter::new(When::Every, 1, 0.0, 0.0);
        assert_eq!(published(&mut f, &["a", "a", "a"]), vec![0, 1, 2]);
    }
}
