//! Keeps an int8 model channels-first through tract's declutter, where
//! tract-linalg's channel-inner depthwise kernel (aarch64) would have it
//! move depthwise convolutions, and most of the graph with them, to
//! channels-last.
//!
//! Our integer and depthwise operators read channels-first and, on an int8
//! model, do the work that kernel would (integer sums instead of float
//! ones). Leaving tract's axis pass (`ChangeAxes`) out altogether is not
//! enough: it also removes axes of size one and cancels the reshapes that
//! tract's einsum declutter, and a graph read back from NNEF, leave around
//! each 1x1 convolution. So for the pass each depthwise `Conv` is wrapped in
//! [`KeepLayout`], which lets axis changes through as the convolution does
//! but suggests none, and is unwrapped after.

use tract_core::internal::{
    AxesMapping, AxisChangeConsequence, EvalContext, EvalOp, InOut, Op, StaticName, TValue, TVec, TractResult,
    TypedFact, TypedModel, TypedNode, TypedOp,
};
use tract_core::ops::change_axes::AxisOp;
use tract_core::ops::cnn::Conv;

/// A depthwise `Conv` that takes part in axis changes but suggests none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeepLayout(pub Conv);

impl Op for KeepLayout {
    fn name(&self) -> StaticName {
        "EdgeinferKeepLayout".into()
    }

    fn as_typed(&self) -> Option<&dyn TypedOp> {
        Some(self)
    }
}

impl EvalOp for KeepLayout {
    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        self.0.eval(ctx, inputs)
    }

    fn eval_out_of_plan(&self, inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        self.0.eval_out_of_plan(inputs)
    }
}

impl TypedOp for KeepLayout {
    fn as_op(&self) -> &dyn Op {
        self
    }

    fn as_op_mut(&mut self) -> &mut dyn Op {
        self
    }

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        self.0.output_facts(inputs)
    }

    fn axes_mapping(&self, inputs: &[&TypedFact], outputs: &[&TypedFact]) -> TractResult<AxesMapping> {
        self.0.axes_mapping(inputs, outputs)
    }

    fn change_axes(
        &self,
        model: &TypedModel,
        node: &TypedNode,
        io: InOut,
        change: &AxisOp,
    ) -> TractResult<Option<AxisChangeConsequence>> {
        let Some(mut consequence) = self.0.change_axes(model, node, io, change)? else { return Ok(None) };
        if let Some(op) = consequence.substitute_op.take() {
            // A convolution stays wrapped; anything else would drop the guard: blocked.
            let Some(conv) = op.downcast_ref::<Conv>() else { return Ok(None) };
            consequence.substitute_op = Some(Box::new(KeepLayout(conv.clone())));
        }
        Ok(Some(consequence))
    }
}

/// Whether `node` is a depthwise convolution tract would move channels-last.
fn is_depthwise(node: &TypedNode) -> bool {
    node.op_as::<Conv>().is_some_and(|c| {
        let spec = &c.pool_spec;
        c.group > 1 && c.group == spec.input_channels && c.group == spec.output_channels
    })
}

/// Wraps every depthwise `Conv` of `model` in [`KeepLayout`]; returns how many.
pub fn wrap(model: &mut TypedModel) -> usize {
    let ids: Vec<usize> = model.nodes().iter().filter(|n| is_depthwise(n)).map(|n| n.id).collect();
    for &id in &ids {
        let node = model.node_mut(id);
        let conv = node.op_as::<Conv>().expect("a depthwise convolution").clone();
        node.op = Box::new(KeepLayout(conv));
    }
    ids.len()
}

/// Puts back the `Conv` of every [`KeepLayout`] of `model`.
pub fn unwrap(model: &mut TypedModel) {
    for id in 0..model.nodes().len() {
        let node = model.node_mut(id);
        if let Some(KeepLayout(conv)) = node.op_as::<KeepLayout>() {
            node.op = Box::new(conv.clone());
        }
    }
}
