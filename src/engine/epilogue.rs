//! What our convolution operators (`depthwise`, `int8_conv`, `pointwise`)
//! apply to each sum before they store it: a bias, a clip and a
//! quantize/dequantize pair, folded in from the operators that followed the
//! convolution in tract's graph; and the plumbing they share to swap
//! themselves into the graph and to run on tract's tensors.

use tract_core::internal::{
    tvec, Datum, DatumType, DatumTypeExt, OutletId, TValue, TVec, Tensor, TractResult, TypedFact, TypedModel,
    TypedModelPatch, TypedNode, TypedOp,
};
use tract_core::ops::binary::TypedBinOp;
use tract_core::prelude::IntoTValue;

use super::quant_dequant::{QuantDequant, ROUND_MAGIC};

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

    /// The clip, then the pair's index of the result on its grid, counted
    /// from the grid's low end: what [`Self::apply`] gives is
    /// `(index + lo) * scale`, exactly. Only for an epilogue with a pair.
    pub fn index(&self, v: f32) -> u8 {
        self.by_value().index::<true>(v)
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
    /// The clip (`CLAMP`), then the pair's index on its grid: [`Epilogue::index`].
    #[inline(always)]
    pub fn index<const CLAMP: bool>(self, v: f32) -> u8 {
        let v = if CLAMP { v.max(self.clamp.0).min(self.clamp.1) } else { v };
        let qd = self.qd;
        let q = v * qd.inv_scale;
        // x86's `maxps`/`minps` are these selects, one instruction each;
        // aarch64 has no such instruction and compiles them to a compare and
        // a select, where `fmaxnm`/`fminnm` give the same value for every
        // number (only a NaN, whose index means nothing, differs).
        #[cfg(target_arch = "aarch64")]
        let q = q.max(qd.lo).min(qd.hi);
        #[cfg(not(target_arch = "aarch64"))]
        let q = if q < qd.lo { qd.lo } else { q };
        #[cfg(not(target_arch = "aarch64"))]
        let q = if q > qd.hi { qd.hi } else { q };
        // `q + ROUND_MAGIC` is `round(q)` in the low bits of its pattern
        // (within 2^22 of zero), and `lo` is whole: the difference of the
        // patterns is the index, in integer steps that vectorise (a float to
        // byte cast does not).
        (q + ROUND_MAGIC).to_bits().wrapping_sub((qd.lo + ROUND_MAGIC).to_bits()) as u8
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

/// What a convolution's sum flows into, folded into its operator: found by
/// [`Folded::after`].
pub struct Folded {
    /// The bias, when an `Add` of one constant per output channel came first.
    pub bias: Option<Vec<f32>>,
    /// The clip and pair folded in.
    pub epi: Epilogue,
    /// The last outlet folded in: the operator's output replaces it.
    pub end: OutletId,
}

impl Folded {
    /// Follows the only consumers of the sum (node `sum`, `o` channels of
    /// `pixels` values) while they are a bias `Add` (first, unless `biased`
    /// already), clip bounds (`Max`, `Min` with a single-valued constant) and
    /// one quantize/dequantize pair.
    pub fn after(model: &TypedModel, sum: usize, pixels: usize, o: usize, biased: bool) -> Folded {
        Folded::walk(model, sum, pixels, o, biased, false)
    }

    /// [`Folded::after`] a sum whose channels are its last axis (a row-wise
    /// product, `[.., M, O]`): its bias is `[.., 1, O]`.
    pub fn after_rows(model: &TypedModel, sum: usize, rows: usize, o: usize) -> Folded {
        Folded::walk(model, sum, rows, o, false, true)
    }

    fn walk(model: &TypedModel, sum: usize, pixels: usize, o: usize, mut biased: bool, last: bool) -> Folded {
        let outputs = model.output_outlets().map(|o| o.to_vec()).unwrap_or_default();
        let mut folded = Folded { bias: None, epi: Epilogue::NONE, end: OutletId::new(sum, 0) };
        loop {
            let end = folded.end;
            let succs = &model.node(end.node).outputs[end.slot].successors;
            if outputs.contains(&end) || succs.len() != 1 {
                break;
            }
            let next = model.node(succs[0].node);
            // The bias comes first: before a clip or a pair it is no longer a bias.
            let bias = (!biased && folded.epi == Epilogue::NONE).then(|| bias_of(model, end, next, pixels, o, last));
            if let Some(values) = bias.flatten() {
                folded.bias = Some(values);
                biased = true;
            } else if !folded.epi.fold(model, end, next) {
                break;
            }
            folded.end = OutletId::new(next.id, 0);
        }
        folded
    }
}

/// Runs `f` from the input of `len` values of type `I` (an error naming `op`
/// otherwise) into a new tensor of `O` of `shape`, all of whose values `f`
/// writes: our operators' `eval`.
pub fn eval_into<I: Datum, O: Datum>(
    op: &str,
    inputs: &[TValue],
    len: usize,
    shape: &[usize],
    f: impl FnOnce(&[I], &mut [O]) -> TractResult<()>,
) -> TractResult<TVec<TValue>> {
    let view = inputs[0].try_as_plain_ram()?;
    let x = view.as_slice::<I>()?;
    tract_core::internal::ensure!(x.len() == len, "{op}: input of {} values, expected {len}", x.len());
    // SAFETY: `f` writes every value (the contract above).
    let mut output = unsafe { Tensor::uninitialized::<O>(shape)? };
    {
        let mut out_view = output.try_as_plain_ram_mut()?;
        f(x, out_view.as_slice_mut::<O>()?)?;
    }
    Ok(tvec!(output.into_tvalue()))
}

/// The output fact of an operator from one input of type `from` to a tensor
/// of type `to` of `shape`.
pub fn output_fact(
    inputs: &[&TypedFact],
    from: DatumType,
    to: DatumType,
    shape: &[usize],
) -> TractResult<TVec<TypedFact>> {
    tract_core::internal::ensure!(inputs.len() == 1 && inputs[0].datum_type == from);
    Ok(tvec!(to.fact(shape)))
}

/// Puts `op` in the place of node `id`, reading its input `xi`, and of
/// everything folded into it up to `end`.
pub fn swap_in(model: &mut TypedModel, id: usize, xi: usize, op: impl TypedOp, end: OutletId) -> TractResult<()> {
    swap_in_from(model, id, model.node(id).inputs[xi], op, end)
}

/// As [`swap_in`], `op` reading `input` (an outlet upstream of the node's own input).
pub fn swap_in_from(
    model: &mut TypedModel,
    id: usize,
    input: OutletId,
    op: impl TypedOp,
    end: OutletId,
) -> TractResult<()> {
    let node = model.node(id);
    let mut patch = TypedModelPatch::new(format!("{} for {}", op.name(), node.name));
    let tap = patch.tap_model(model, input)?;
    let wire = patch.wire_node(&node.name, op, &[tap])?[0];
    patch.shunt_outside(model, end, wire)?;
    patch.apply(model)
}

/// The bias values when `next`, the only consumer of `cur` (the sum of `o`
/// channels of `pixels` values), adds one constant per output channel:
/// `[O, 1, 1]`, or with a leading 1; any shape of `O` values for one pixel;
/// with `last` (channels on the last axis), `[.., 1, O]`.
fn bias_of(
    model: &TypedModel,
    cur: OutletId,
    next: &TypedNode,
    pixels: usize,
    o: usize,
    last: bool,
) -> Option<Vec<f32>> {
    next.op_as::<TypedBinOp>().filter(|b| b.1.is_none() && b.0.name() == "Add" && next.inputs.len() == 2)?;
    let fact = model.outlet_fact(cur).ok()?;
    if fact.shape != next.outputs[0].fact.shape {
        return None;
    }
    let (shape, values) = const_f32(model, next.inputs.iter().copied().find(|&i| i != cur)?)?;
    let rank = fact.rank();
    let single = pixels == 1 && shape.iter().filter(|&&d| d != 1).count() <= 1;
    // The channels' axis: the last for a row-wise product, else the third from last.
    let at = if last { rank - 1 } else { rank.wrapping_sub(3) };
    let per_channel = (last || rank >= 3)
        && shape.len() == rank
        && shape[at] == o
        && shape.iter().enumerate().all(|(i, &d)| i == at || d == 1);
    (values.len() == o && (single || per_channel)).then_some(values)
}

/// Whether `a` and `b` hold the same bit patterns: our operators' equality
/// on f32 parameters, an equivalence even for NaN.
pub fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
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

#[cfg(target_arch = "x86_64")]
pub mod avx512 {
    //! The epilogue on 16 values of an AVX-512 register.

    use std::arch::x86_64::*;

    use super::Epilogue;

    /// An epilogue's constants, in registers.
    #[derive(Clone, Copy)]
    pub struct Regs {
        clo: __m512,
        chi: __m512,
        inv: __m512,
        qlo: __m512,
        qhi: __m512,
        scale: __m512,
        magic: __m512,
    }

    impl Regs {
        /// `epi`'s clip bounds and pair parameters, broadcast.
        #[target_feature(enable = "avx512f")]
        pub fn new(epi: &Epilogue) -> Regs {
            let qd = epi.by_value().qd;
            Regs {
                clo: _mm512_set1_ps(epi.clamp.0),
                chi: _mm512_set1_ps(epi.clamp.1),
                inv: _mm512_set1_ps(qd.inv_scale),
                qlo: _mm512_set1_ps(qd.lo),
                qhi: _mm512_set1_ps(qd.hi),
                scale: _mm512_set1_ps(qd.scale),
                magic: _mm512_set1_ps(super::ROUND_MAGIC),
            }
        }

        /// The clip (`CLAMP`), then the pair (`QDQ`): [`super::Applied::apply`]'s arithmetic.
        #[target_feature(enable = "avx512f")]
        #[inline]
        pub fn apply<const CLAMP: bool, const QDQ: bool>(self, mut v: __m512) -> __m512 {
            if CLAMP {
                v = _mm512_min_ps(_mm512_max_ps(v, self.clo), self.chi);
            }
            if QDQ {
                let q = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, self.inv), self.qlo), self.qhi);
                v = _mm512_mul_ps(_mm512_sub_ps(_mm512_add_ps(q, self.magic), self.magic), self.scale);
            }
            v
        }

        /// The clip (`CLAMP`), then the pair's index on its grid: [`super::Epilogue::index`]'s arithmetic.
        #[target_feature(enable = "avx512f")]
        #[inline]
        pub fn index<const CLAMP: bool>(self, mut v: __m512) -> __m512i {
            if CLAMP {
                v = _mm512_min_ps(_mm512_max_ps(v, self.clo), self.chi);
            }
            let q = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, self.inv), self.qlo), self.qhi);
            _mm512_cvttps_epi32(_mm512_sub_ps(_mm512_sub_ps(_mm512_add_ps(q, self.magic), self.magic), self.qlo))
        }
    }
}
