//! NNEF forms for the tract-core operators that an ONNX QDQ model leaves in
//! its decluttered graph and that tract's own NNEF registries cannot write:
//! `QuantizeLinearU8`, `QuantizeLinearI8` (ONNX QuantizeLinear),
//! `DequantizeLinearF32` (DequantizeLinear) and `LookupTable` (what tract's
//! decluttering makes of a DequantizeLinear -> element-wise ops ->
//! QuantizeLinear chain on 8-bit data). Without them no int8 model could be
//! converted or cached. They go in an extension of our own, `edgeinfer`:
//!
//! ```text
//! edgeinfer_quantize_linear_u8(x: tensor<scalar>, scale: scalar, zero_point: integer) -> (y: tensor<scalar>)
//! edgeinfer_quantize_linear_i8(x: tensor<scalar>, scale: scalar, zero_point: integer) -> (y: tensor<scalar>)
//! edgeinfer_dequantize_linear_f32(x: tensor<scalar>, scale: scalar, zero_point: integer) -> (y: tensor<scalar>)
//! edgeinfer_lookup_table(x: tensor<scalar>, table: integer[]) -> (y: tensor<scalar>)
//! ```
//!
//! with tract's own meaning of `scale` (for quantize ops: the reciprocal of
//! ONNX's scale, as tract stores it); `table` holds the 256 output bytes for
//! the input bytes 0..=255. Each loads back into the very operator it was
//! written from, so a converted graph optimises like the original.
//! The extension also holds `edgeinfer_quant_dequant`, our own operator for
//! an activation's quantize/dequantize pair (`quant_dequant` registers it),
//! and its dynamic form (`dyn_quant`).

use std::any::TypeId;

use tract_core::ops::element_wise::ElementWiseOp;
use tract_core::ops::quant::{
    lookup_table, quantize_linear_i8, quantize_linear_u8, DequantizeLinearF32, LookupTable, QuantizeLinearI8,
    QuantizeLinearU8,
};
use tract_nnef::ast::Literal;
use tract_nnef::internal::{
    bail, format_err, invocation, Arc, DatumType, IntoAst, ModelBuilder, OutletId, Parameter, RValue, Registry,
    ResolvedInvocation, TVec, TractResult, TypeName, TypedNode, Value,
};

const QUANT_U8: &str = "edgeinfer_quantize_linear_u8";
const QUANT_I8: &str = "edgeinfer_quantize_linear_i8";
const DEQUANT: &str = "edgeinfer_dequantize_linear_f32";
const LUT: &str = "edgeinfer_lookup_table";

/// The `edgeinfer` NNEF extension.
pub fn registry() -> Registry {
    let mut reg = Registry::new("edgeinfer")
        .with_doc("Extension `edgeinfer`: tract-core's quantize/dequantize operators, as edgeinfer writes them.");
    reg.register_element_wise(
        QUANT_U8,
        TypeId::of::<QuantizeLinearU8>(),
        Box::new(dump_quant),
        params(),
        load_quant_u8,
    );
    reg.register_element_wise(
        QUANT_I8,
        TypeId::of::<QuantizeLinearI8>(),
        Box::new(dump_quant),
        params(),
        load_quant_i8,
    );
    reg.register_dumper(dump_dequant);
    reg.register_primitive(DEQUANT, &params(), &[("y", TypeName::Scalar.tensor())], load_dequant);
    reg.register_element_wise(
        LUT,
        TypeId::of::<LookupTable>(),
        Box::new(dump_lut),
        vec![TypeName::Scalar.tensor().named("x"), TypeName::Integer.array().named("table")],
        load_lut,
    );
    super::quant_dequant::register_nnef(&mut reg);
    super::dyn_quant::register_nnef(&mut reg);
    reg
}

fn params() -> Vec<Parameter> {
    vec![TypeName::Scalar.tensor().named("x"), TypeName::Scalar.named("scale"), TypeName::Integer.named("zero_point")]
}

fn scalar_args(scale: f32, zero_point: i64) -> [(&'static str, RValue); 2] {
    [("scale", RValue::Literal(scale.into())), ("zero_point", RValue::Literal(zero_point.into()))]
}

fn dump_quant(ast: &mut IntoAst, node: &TypedNode) -> TractResult<Option<Arc<RValue>>> {
    let Some(ew) = node.op_as::<ElementWiseOp>() else { return Ok(None) };
    // A datum type override on the element-wise op has no NNEF form here: leave the node unwritten.
    if ew.1.is_some() {
        return Ok(None);
    }
    let (id, scale, zero_point) = if let Some(q) = ew.0.downcast_ref::<QuantizeLinearU8>() {
        (QUANT_U8, q.scale, q.zero_point as i64)
    } else if let Some(q) = ew.0.downcast_ref::<QuantizeLinearI8>() {
        (QUANT_I8, q.scale, q.zero_point as i64)
    } else {
        return Ok(None);
    };
    let x = ast.mapping[&node.inputs[0]].clone();
    Ok(Some(invocation(id, &[x], &scalar_args(scale, zero_point))))
}

fn dump_lut(ast: &mut IntoAst, node: &TypedNode) -> TractResult<Option<Arc<RValue>>> {
    let Some(ew) = node.op_as::<ElementWiseOp>() else { return Ok(None) };
    let Some(lut) = ew.0.downcast_ref::<LookupTable>() else { return Ok(None) };
    if ew.1.is_some() {
        return Ok(None);
    }
    let table: Vec<Literal> = lut.table.table().iter().map(|&b| Literal::from(b as i64)).collect();
    let x = ast.mapping[&node.inputs[0]].clone();
    Ok(Some(invocation(LUT, &[x], &[("table", RValue::Literal(Literal::Array(table)))])))
}

fn load_lut(builder: &mut ModelBuilder, inv: &ResolvedInvocation) -> TractResult<Value> {
    let x: OutletId = inv.named_arg_as(builder, "x")?;
    let table: TVec<i64> = inv.named_arg_as(builder, "table")?;
    let bytes = table
        .iter()
        .map(|&v| u8::try_from(v))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| format_err!("{LUT}: table entries must be 0..=255"))?;
    if bytes.len() != 256 {
        bail!("{LUT}: table has {} entries, not 256", bytes.len());
    }
    builder.wire(lookup_table(tract_linalg::routines::lut_u8(&bytes)?), &[x])
}

fn dump_dequant(ast: &mut IntoAst, node: &TypedNode, op: &DequantizeLinearF32) -> TractResult<Option<Arc<RValue>>> {
    let x = ast.mapping[&node.inputs[0]].clone();
    Ok(Some(invocation(DEQUANT, &[x], &scalar_args(op.scale, op.zero_point as i64))))
}

fn args(builder: &mut ModelBuilder, inv: &ResolvedInvocation) -> TractResult<(OutletId, f32, i64)> {
    Ok((inv.named_arg_as(builder, "x")?, inv.named_arg_as(builder, "scale")?, inv.named_arg_as(builder, "zero_point")?))
}

fn load_quant_u8(builder: &mut ModelBuilder, inv: &ResolvedInvocation) -> TractResult<Value> {
    let (x, scale, zp) = args(builder, inv)?;
    let zp = u8::try_from(zp).map_err(|_| format_err!("u8 zero point {zp} out of range"))?;
    builder.wire(quantize_linear_u8(scale, zp), &[x])
}

fn load_quant_i8(builder: &mut ModelBuilder, inv: &ResolvedInvocation) -> TractResult<Value> {
    let (x, scale, zp) = args(builder, inv)?;
    let zp = i8::try_from(zp).map_err(|_| format_err!("i8 zero point {zp} out of range"))?;
    builder.wire(quantize_linear_i8(scale, zp), &[x])
}

fn load_dequant(builder: &mut ModelBuilder, inv: &ResolvedInvocation) -> TractResult<Value> {
    let (x, scale, zp) = args(builder, inv)?;
    let zp = i32::try_from(zp).map_err(|_| format_err!("zero point {zp} out of range"))?;
    let input_dt = builder.model.outlet_fact(x)?.datum_type;
    // tract's DequantizeLinearF32 reads u8, i8 or i32 inputs; anything else is a damaged file.
    if !matches!(input_dt.unquantized(), DatumType::U8 | DatumType::I8 | DatumType::I32) {
        bail!("{DEQUANT} on a {input_dt:?} input");
    }
    builder.wire(DequantizeLinearF32::new(scale, zp), &[x])
}
