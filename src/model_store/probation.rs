//! The first inferences of a model swapped in at run time: if too many of
//! them fail, or their median latency is too far above the old model's, the
//! worker swaps the old model back. A model that passed its checks on one
//! reference input can still fail on what the camera or sensor really gives.

/// The bounds (`[models] probation_inferences`, `max_error_rate`, `max_latency_ratio`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    /// Inferences on probation (0: none, the new model is accepted at once).
    pub inferences: u32,
    /// Largest share of failed inferences (0 to 1).
    pub max_error_rate: f64,
    /// Largest median inference latency, as a multiple of the old model's.
    pub max_latency_ratio: f64,
}

/// What the probation says after one more inference.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Not decided yet.
    Continue,
    /// Every inference on probation done within the bounds.
    Accept,
    /// Swap the old model back, for this reason.
    RollBack(String),
}

/// A model on probation.
#[derive(Debug, Clone)]
pub struct Probation {
    bounds: Bounds,
    /// The old model's median inference latency (ms), if it had any.
    baseline_ms: Option<f64>,
    errors: u32,
    latencies: Vec<f64>,
}

impl Probation {
    /// Probation against an old model whose median inference took `baseline_ms`.
    pub fn new(bounds: Bounds, baseline_ms: Option<f64>) -> Self {
        Probation { bounds, baseline_ms, errors: 0, latencies: Vec::new() }
    }

    fn seen(&self) -> u32 {
        self.errors + self.latencies.len() as u32
    }

    /// Errors allowed over the whole probation.
    fn allowed_errors(&self) -> u32 {
        (self.bounds.max_error_rate * self.bounds.inferences as f64).floor() as u32
    }

    /// One inference that worked, taking `ms`.
    pub fn ok(&mut self, ms: f64) -> Verdict {
        self.latencies.push(ms);
        self.verdict()
    }

    /// One inference that failed (the model's fault: an error, or outputs that are not finite).
    pub fn failed(&mut self) -> Verdict {
        self.errors += 1;
        self.verdict()
    }

    fn verdict(&self) -> Verdict {
        let n = self.bounds.inferences;
        // Decided as soon as the bound can no longer be met, not after all n.
        if self.errors > self.allowed_errors() {
            return Verdict::RollBack(format!(
                "{} of its first {} inferences failed (models.max_error_rate {} of {n})",
                self.errors,
                self.seen(),
                self.bounds.max_error_rate
            ));
        }
        if self.seen() < n {
            return Verdict::Continue;
        }
        if let (Some(base), Some(p50)) = (self.baseline_ms, median(&self.latencies)) {
            if base > 0.0 && p50 > base * self.bounds.max_latency_ratio {
                return Verdict::RollBack(format!(
                    "its median inference took {p50:.3} ms, {:.1}x the previous model's {base:.3} ms \
                     (models.max_latency_ratio {})",
                    p50 / base,
                    self.bounds.max_latency_ratio
                ));
            }
        }
        Verdict::Accept
    }
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    Some(crate::stats::percentile(&s, 50.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Bounds = Bounds { inferences: 10, max_error_rate: 0.2, max_latency_ratio: 3.0 };

    #[test]
    fn too_many_errors_roll_back_as_soon_as_the_bound_is_crossed() {
        let mut p = Probation::new(B, Some(1.0));
        assert_eq!(p.failed(), Verdict::Continue);
        assert_eq!(p.ok(1.0), Verdict::Continue);
        assert_eq!(p.failed(), Verdict::Continue, "2 of 10 allowed");
        match p.failed() {
            Verdict::RollBack(why) => assert!(why.starts_with("3 of its first 4 inferences failed"), "{why}"),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn a_model_within_the_bounds_is_accepted_after_its_probation() {
        let mut p = Probation::new(B, Some(1.0));
        p.failed();
        for _ in 0..8 {
            assert_eq!(p.ok(2.9), Verdict::Continue);
        }
        assert_eq!(p.ok(2.9), Verdict::Accept);
        // No baseline (the old model never ran): only errors count.
        let mut p = Probation::new(B, None);
        for _ in 0..9 {
            p.ok(100.0);
        }
        assert_eq!(p.ok(100.0), Verdict::Accept);
    }

    #[test]
    fn a_much_slower_model_rolls_back_after_its_probation() {
        let mut p = Probation::new(B, Some(1.0));
        for _ in 0..9 {
            assert_eq!(p.ok(3.5), Verdict::Continue);
        }
        match p.ok(3.5) {
            Verdict::RollBack(why) => assert!(why.contains("3.5x the previous model's 1.000 ms"), "{why}"),
            v => panic!("{v:?}"),
        }
    }
}
