#!/usr/bin/env python3
"""What tract's own integer matrix path gives on pointwise-convolution shapes.

Builds, in a temporary directory, chains of four MatMul layers shaped like
MobileNetV2's pointwise convolutions (M = pixels, K = input channels, N =
output channels), once in float and once as QLinearMatMul (u8 activations,
i8 weights), which tract keeps on its integer kernels. Then runs both with
`edgeinfer bench`, in paired rounds (the side that goes first alternates),
and prints the median over rounds of the p50 ratio int8/f32.

    python3 benches/int8_matmul_probe.py [--edgeinfer target/release/edgeinfer] [--rounds 5]
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SHAPES = [(12544, 16, 96), (3136, 24, 144), (784, 32, 192), (196, 96, 576)]
LAYERS = 4


def chain(m, k, n, quantized, path, seed=0):
    rng = np.random.default_rng(seed)
    widths = [k] + [n if i % 2 == 0 else k for i in range(LAYERS)]
    nodes, inits = [], []
    const = lambda value, name, dtype: inits.append(numpy_helper.from_array(np.array(value, dtype), name))
    cur = "x"
    if quantized:
        const(0.02, "s_in", np.float32)
        const(128, "z_in", np.uint8)
        nodes.append(helper.make_node("QuantizeLinear", ["x", "s_in", "z_in"], ["xq"]))
        cur, s, z = "xq", "s_in", "z_in"
    for i in range(LAYERS):
        w = (rng.normal(size=(widths[i], widths[i + 1])) * 0.1).astype(np.float32)
        if quantized:
            const(np.clip(np.round(w / 0.004), -127, 127), f"w{i}", np.int8)
            const(0.004, f"ws{i}", np.float32)
            const(0, f"wz{i}", np.int8)
            const(0.02, f"ys{i}", np.float32)
            const(128, f"yz{i}", np.uint8)
            ins = [cur, s, z, f"w{i}", f"ws{i}", f"wz{i}", f"ys{i}", f"yz{i}"]
            nodes.append(helper.make_node("QLinearMatMul", ins, [f"y{i}"]))
            s, z = f"ys{i}", f"yz{i}"
        else:
            const(w, f"w{i}", np.float32)
            nodes.append(helper.make_node("MatMul", [cur, f"w{i}"], [f"y{i}"]))
        cur = f"y{i}"
    last = "DequantizeLinear" if quantized else "Identity"
    nodes.append(helper.make_node(last, [cur, s, z] if quantized else [cur], ["out"]))
    graph = helper.make_graph(
        nodes,
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [m, widths[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)


def p50(binary, path):
    out = subprocess.run([binary, "bench", path, "--runs", "50", "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["p50_ms"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edgeinfer", default=os.environ.get("EDGEINFER", "target/release/edgeinfer"))
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print("shape MxKxN (4 layers) | f32 p50 ms | int8 p50 ms | int8/f32 median (min-max)")
        for m, k, n in SHAPES:
            f32, q = (os.path.join(tmp, f"{kind}_{m}_{k}_{n}.onnx") for kind in ("f32", "q"))
            chain(m, k, n, False, f32)
            chain(m, k, n, True, q)
            ratios, times = [], {f32: [], q: []}
            for r in range(args.rounds):
                order = (f32, q) if r % 2 == 0 else (q, f32)
                got = {path: p50(args.edgeinfer, path) for path in order}
                for path in order:
                    times[path].append(got[path])
                ratios.append(got[q] / got[f32])
            print(
                f"{m}x{k}x{n} | {statistics.median(times[f32]):.3f} | {statistics.median(times[q]):.3f} | "
                f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
            )


if __name__ == "__main__":
    main()
