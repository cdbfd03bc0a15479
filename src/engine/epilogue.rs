//! What our convolution operators (`depthwise`, `int8_conv`) apply to each
//! sum before they store it: a clip and a quantize/dequantize pair, folded
//! in from the operators that followed the convolution in tract's graph.

use tract_core::internal::{DatumType, OutletId, TypedModel, TypedNode};
use tract_core::ops::binary::TypedBinOp;

use super::quant_dequant::QuantDequant;

/// `clamp(lo, hi)`, then optionally a quantize/dequantize pair.
#[derive(Debug, Clone, Copy)]
pub struct Epilogue {
    /// The clip's bounds (infinite when there is none).
    pub clamp: (f32, f32),
    /// The pair after the clip.
    pub qdq: Option<QuantDequant>,
}

impl PartialEq for Epilogue {
    fn eq(&self, other: &Self) -> bool {
        self.clamp.0.to_bits() == other.clamp.0.to_bits()
            && self.clamp.1.to_bits() == other.clamp.1.to_bits()
            && self.qdq == other.qdq
    }
}

// Equality is on bit patterns, an equivalence even for NaN.
impl Eq for Epilogue {}

impl Epilogue {
    /// Nothing folded in yet.
    pub const NONE: Epilogue = Epilogue { clamp: (f32::NEG_INFINITY, f32::INFINITY), qdq: None };

    /// Whether the clip bounds anything.
    pub fn clamps(&self) -> bool {
        self.clamp != Self::NONE.clamp
    }

    /// The parameters by value, for hot loops to keep in registers.
    pub fn by_value(&self) -> Applied {
        Applied { clamp: self.clamp, qd: self.qdq.unwrap_or(QuantDequant::IDENTITY) }
    }

    /// The clip as tract's Max then Min, then the pair: the arithmetic of the
    /// operators folded in. For loops that are not hot ([`Applied::apply`] is).
    pub fn apply(&self, v: f32) -> f32 {
        let v = v.max(self.clamp.0).min(self.clamp.1);
        self.qdq.map_or(v, |qd| qd.one(v))
    }

    /// `clip [lo, hi]` and, with a pair, a second line, for the op's `info`.
    pub fn describe(&self) -> (String, Option<String>) {
        let (lo, hi) = self.clamp;
        let pair =
            self.qdq.map(|qd| format!("then quantize/dequantize, scale {} range [{}, {}]", qd.scale, qd.lo, qd.hi));
        (format!("clip [{lo}, {hi}]"), pair)
    }

    /// Folds `next`, the only consumer of `cur`, in when it is a clip bound
    /// (`Max` or `Min` with a single-valued constant, keeping the shape) or a
    /// pair, and nothing follows a pair already. Returns whether it did.
    pub fn fold(&mut self, model: &TypedModel, cur: OutletId, next: &TypedNode) -> bool {
        if self.qdq.is_some() {
            return false;
        }
        if let Some(qd) = QuantDequant::of(next) {
            self.qdq = Some(qd);
            return true;
        }
        let Some(bin) = next.op_as::<TypedBinOp>().filter(|b| b.1.is_none() && next.inputs.len() == 2) else {
            return false;
        };
        let same_shape = model.outlet_fact(cur).is_ok_and(|f| f.shape == next.outputs[0].fact.shape);
        let other = next.inputs.iter().copied().find(|&i| i != cur);
        let Some(value) = other.and_then(|o| scalar_const(model, o)).filter(|_| same_shape) else { return false };
        let (lo, hi) = self.clamp;
        // max(clamp(x, lo, hi), v) is clamp(x, max(lo, v), max(hi, v)), and
        // min(clamp(x, lo, hi), v) is clamp(x, min(lo, v), min(hi, v)).
        self.clamp = match bin.0.name() {
            "Max" => (lo.max(value), hi.max(value)),
            "Min" => (lo.min(value), hi.min(value)),
            _ => return false,
        };
        true
    }
}

/// [`Epilogue`]'s parameters held by value (a placeholder pair when there is none).
#[derive(Clone, Copy)]
pub struct Applied {
    clamp: (f32, f32),
    /// The pair's parameters, public for kernels that load them into registers.
    pub qd: QuantDequant,
}

impl Applied {
    /// The clip's bounds.
    pub fn clamp(&self) -> (f32, f32) {
        self.clamp
    }

    /// The clip, then the pair; each only when the op has it (`CLAMP`, `QDQ`).
    #[inline(always)]
    pub fn apply<const CLAMP: bool, const QDQ: bool>(self, v: f32) -> f32 {
        let v = if CLAMP { v.max(self.clamp.0).min(self.clamp.1) } else { v };
        if QDQ {
            self.qd.one(v)
        } else {
            v
        }
    }
}

/// The shape and values of the f32 constant at `outlet`, if it is one.
pub fn const_f32(model: &TypedModel, outlet: OutletId) -> Option<(Vec<usize>, Vec<f32>)> {
    let konst = model.outlet_fact(outlet).ok()?.konst.as_ref()?;
    if konst.datum_type() != DatumType::F32 {
        return None;
    }
    let values = konst.try_as_plain_ram().ok()?.as_slice::<f32>().ok()?.to_vec();
    Some((konst.shape().to_vec(), values))
}

/// The value of the single-valued f32 constant at `outlet`, if it is one.
pub fn scalar_const(model: &TypedModel, outlet: OutletId) -> Option<f32> {
    match const_f32(model, outlet)? {
        (_, values) if values.len() == 1 => Some(values[0]),
        _ => None,
    }
}
