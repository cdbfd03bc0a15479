#!/usr/bin/env python3
"""Generate the test/demo ONNX models, reference data and samples for edgeinfer.

Run from the repository root:

    pip install -r models/requirements.txt
    python3 models/make_models.py                      # everything
    python3 models/make_models.py --only mobilenetv2_f32   # just the big float MobileNetV2

Everything is deterministic (fixed seeds, single-threaded numpy / onnxruntime).
All outputs are written below models/.
"""

import os

# Single-threaded, deterministic numerics. Must be set before numpy is imported.
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse
import collections
import json
import pathlib
import shutil
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

HERE = pathlib.Path(__file__).resolve().parent
REF = HERE / "ref"
SAMPLES = HERE / "samples"
SUMMARY = HERE / "summary.json"

OPSET = 17
ML_OPSET = 3
IR_VERSION = 8  # ONNX 1.12+ IR, sufficient for opset 17 / ai.onnx.ml 3

DIGIT_LABELS = [str(i) for i in range(10)]
VIB_LABELS = ["normal", "imbalance", "misalignment", "bearing_fault"]
BC_LABELS = ["malignant", "benign"]  # sklearn target order: 0 = malignant, 1 = benign

SUMMARY_DATA = {}


# --------------------------------------------------------------------------------------
# generic helpers
# --------------------------------------------------------------------------------------

def log(*a):
    print(*a, flush=True)


class Graph:
    """Tiny helper to assemble an ONNX graph with onnx.helper."""

    def __init__(self, name):
        self.name = name
        self.nodes = []
        self.inits = []
        self.n = 0

    def uid(self, p):
        self.n += 1
        return f"{p}_{self.n}"

    def const(self, name, arr):
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(self, op, inputs, name=None, out=None, domain=None, **attrs):
        name = name or self.uid(op.lower())
        out = out or f"{name}_out"
        kw = {"domain": domain} if domain else {}
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **kw, **attrs))
        return out

    def conv(self, x, w, b, stride=1, pad=None, group=1, name=None, out=None):
        name = name or self.uid("conv")
        k = list(w.shape[2:])
        if pad is None:
            pad = [kk // 2 for kk in k]
        elif isinstance(pad, int):
            pad = [pad] * len(k)
        wn = self.const(f"{name}.weight", w.astype(np.float32))
        bn = self.const(f"{name}.bias", b.astype(np.float32))
        return self.node("Conv", [x, wn, bn], name=name, out=out,
                         kernel_shape=k, strides=[stride] * len(k), pads=pad + pad,
                         group=group, dilations=[1] * len(k))

    def relu(self, x, name=None):
        return self.node("Relu", [x], name=name)

    def clip6(self, x, name=None):
        if "clip_min" not in [i.name for i in self.inits]:
            self.const("clip_min", np.array(0.0, np.float32))
            self.const("clip_max", np.array(6.0, np.float32))
        return self.node("Clip", [x, "clip_min", "clip_max"], name=name)

    def gemm(self, x, w, b, name, out=None):
        # w: [out, in]  (transB=1, like a Linear layer)
        wn = self.const(f"{name}.weight", w.astype(np.float32))
        bn = self.const(f"{name}.bias", b.astype(np.float32))
        return self.node("Gemm", [x, wn, bn], name=name, out=out, alpha=1.0, beta=1.0, transB=1)

    def model(self, inputs, outputs, extra_opsets=()):
        g = helper.make_graph(self.nodes, self.name, inputs, outputs, self.inits)
        opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
        m = helper.make_model(g, opset_imports=opsets, producer_name="edgeinfer-make_models",
                              producer_version="1")
        m.ir_version = IR_VERSION
        return m


def vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def save_model(m, path, check=True):
    m.ir_version = IR_VERSION
    if check:
        onnx.checker.check_model(m)
    onnx.save(m, str(path))
    log(f"  wrote {path.relative_to(HERE.parent)} ({path.stat().st_size} bytes)")


def session(path, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = level
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run(sess, inputs):
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, dict(zip(names, inputs)))


def op_counts(path):
    m = onnx.load(str(path))
    c = collections.Counter()
    for n in m.graph.node:
        dom = n.domain if n.domain not in ("", "ai.onnx") else ""
        c[f"{dom + ':' if dom else ''}{n.op_type}"] += 1
    return dict(sorted(c.items()))


def output_quant_scales(path):
    """For each graph output: the scale of the DequantizeLinear that produces it (else None)."""
    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    res = {}
    for o in m.graph.output:
        n = producer.get(o.name)
        scale = None
        if n is not None and n.op_type == "DequantizeLinear" and n.input[1] in inits:
            s = inits[n.input[1]]
            scale = float(s) if s.size == 1 else s.astype(float).tolist()
        res[o.name] = scale
    return res


def describe_io(path):
    m = onnx.load(str(path))
    init_names = {i.name for i in m.graph.initializer}

    def d(v):
        t = v.type.tensor_type
        shape = [dd.dim_value if dd.HasField("dim_value") else (dd.dim_param or None) for dd in t.shape.dim]
        return {"name": v.name, "dtype": TensorProto.DataType.Name(t.elem_type).lower(), "shape": shape}

    return ([d(v) for v in m.graph.input if v.name not in init_names], [d(v) for v in m.graph.output])


def model_info(path):
    m = onnx.load(str(path))
    ins, outs = describe_io(path)
    return {
        "file": path.name,
        "size_bytes": path.stat().st_size,
        "ir_version": m.ir_version,
        "opset_imports": {(o.domain or "ai.onnx"): o.version for o in m.opset_import},
        "inputs": ins,
        "outputs": outs,
        "op_counts": op_counts(path),
    }


def record(stem, **kw):
    SUMMARY_DATA.setdefault(stem, {}).update(kw)


def save_ref(stem, path, inputs, quantized=False, top1_output=None, extra=None):
    """Write models/ref/<stem>/in*.npy, out*.npy (ORT, ENABLE_ALL, 1 thread) and meta.json."""
    d = REF / stem
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    sess = session(path)
    outs = run(sess, inputs)
    for i, a in enumerate(inputs):
        np.save(d / f"in{i}.npy", a)
    for i, a in enumerate(outs):
        np.save(d / f"out{i}.npy", a)
    ins_desc, outs_desc = describe_io(path)
    meta = {
        "model": path.name,
        "inputs": ins_desc,
        "outputs": outs_desc,
        "input_files": [f"in{i}.npy" for i in range(len(inputs))],
        "output_files": [f"out{i}.npy" for i in range(len(outs))],
        "onnxruntime_version": ort.__version__,
        "ort_settings": {"providers": ["CPUExecutionProvider"], "intra_op_num_threads": 1,
                         "graph_optimization_level": "ORT_ENABLE_ALL"},
    }
    if top1_output is not None:
        names = [o["name"] for o in outs_desc]
        idx = names.index(top1_output)
        meta["top1_from_output"] = top1_output
        meta["expected_top1"] = int(np.argmax(outs[idx].reshape(-1)))
        top = np.sort(outs[idx].reshape(-1))[::-1]
        meta["top1_margin"] = float(top[0] - top[1])  # best minus second-best score
    if quantized:
        outs0 = run(session(path, ort.GraphOptimizationLevel.ORT_DISABLE_ALL), inputs)
        meta["max_abs_diff_ort_disable_all_vs_enable_all"] = {
            o["name"]: float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
            for o, a, b in zip(outs_desc, outs, outs0)}
        meta["output_dequantize_scale"] = output_quant_scales(path)
    if extra:
        meta.update(extra)
    (d / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"  ref/{stem}: top1={meta.get('expected_top1')} "
        f"diff={meta.get('max_abs_diff_ort_disable_all_vs_enable_all')}")
    return outs


class ListReader(CalibrationDataReader):
    def __init__(self, name, arrays):
        self._items = [{name: a} for a in arrays]
        self._it = iter(self._items)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self._items)


def qstatic(src, dst, input_name, calib, fmt=QuantFormat.QDQ):
    quantize_static(
        str(src), str(dst), ListReader(input_name, calib),
        quant_format=fmt, per_channel=True,
        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    m = onnx.load(str(dst))
    log(f"  quantized -> {dst.name}: ir={m.ir_version} opsets="
        f"{[(o.domain, o.version) for o in m.opset_import]}")
    if m.ir_version != IR_VERSION:
        m.ir_version = IR_VERSION
        onnx.save(m, str(dst))


def accuracy(path, xs, ys, out_index=0):
    sess = session(path)
    pred = np.array([int(np.argmax(run(sess, [x])[out_index])) for x in xs])
    return float(np.mean(pred == ys)), pred


def he(rng, shape, fan_in, gain=2.0):
    return (rng.standard_normal(shape) * np.sqrt(gain / fan_in)).astype(np.float32)


def write_png(path, rgb_u8):
    from PIL import Image
    Image.fromarray(rgb_u8, mode="RGB").save(str(path), optimize=False)


# --------------------------------------------------------------------------------------
# a. digits CNN (sklearn load_digits, 8x8 -> 32x32 RGB)
# --------------------------------------------------------------------------------------

def upsample_bilinear(img, size):
    """Bilinear resize (half-pixel centres, edge clamp) of a 2-D float array to size x size."""
    h, w = img.shape

    def coords(n_in, n_out):
        c = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        c = np.clip(c, 0, n_in - 1)
        i0 = np.floor(c).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, c - i0

    y0, y1, fy = coords(h, size)
    x0, x1, fx = coords(w, size)
    top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
    bot = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
    return top * (1 - fy)[:, None] + bot * fy[:, None]


def digits_dataset():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    imgs = []
    for im in d.images:  # values 0..16
        up = upsample_bilinear(im.astype(np.float64) * (255.0 / 16.0), 32)
        u8 = np.clip(np.rint(up), 0, 255).astype(np.uint8)
        imgs.append(np.repeat(u8[:, :, None], 3, axis=2))  # HWC RGB, gray replicated
    imgs = np.stack(imgs)
    idx = np.arange(len(imgs))
    tr, te = train_test_split(idx, test_size=0.25, random_state=0, stratify=d.target)
    return imgs, d.target.astype(np.int64), tr, te


def digit_tensor(rgb_u8):
    """uint8 HWC RGB -> float32 [1,3,32,32], x = pixel / 255 (float32 division)."""
    return (rgb_u8.transpose(2, 0, 1)[None].astype(np.float32) / np.float32(255.0)).astype(np.float32)


def digits_conv1_filters(rng):
    sob = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32) / 4
    diag = np.array([[0, 1, 2], [-1, 0, 1], [-2, -1, 0]], np.float32) / 4
    lap = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32) / 4
    blur = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 16
    base = [sob, -sob, sob.T, -sob.T, diag, -diag, diag[:, ::-1], -diag[:, ::-1], lap, -lap, blur]
    while len(base) < 16:
        r = rng.standard_normal((3, 3)).astype(np.float32)
        r -= r.mean()
        base.append(r / np.abs(r).sum() * 2)
    w = np.stack([np.stack([b / 3.0] * 3) for b in base])  # [16,3,3,3], same filter on R,G,B
    bias = np.zeros(16, np.float32)
    bias[10] = -0.2  # blur channel: fire on ink only
    return w.astype(np.float32), bias


def digits_feature_graph(rng):
    """Fixed (seeded) conv feature extractor. Returns Graph whose last tensor is 'features' [1,C]."""
    g = Graph("digits_cnn")
    w1, b1 = digits_conv1_filters(rng)
    x = g.relu(g.conv("image", w1, b1, name="conv1"), name="relu1")            # 16x32x32
    x = g.relu(g.conv(x, he(rng, (32, 16, 3, 3), 144), rng.normal(0, 0.01, 32), stride=2,
                      name="conv2"), name="relu2")                              # 32x16x16
    x = g.relu(g.conv(x, he(rng, (32, 32, 3, 3), 288), rng.normal(0, 0.01, 32), stride=2,
                      name="conv3"), name="relu3")                              # 32x8x8
    # residual block: x + conv(relu(conv(x)))
    r = g.relu(g.conv(x, he(rng, (32, 32, 3, 3), 288), rng.normal(0, 0.01, 32), name="res_conv_a"),
               name="res_relu_a")
    r = g.conv(r, he(rng, (32, 32, 3, 3), 288) * 0.5, rng.normal(0, 0.01, 32), name="res_conv_b")
    x = g.node("Add", [x, r], name="res_add")
    x = g.relu(x, name="res_relu")                                              # 32x8x8
    x = g.relu(g.conv(x, he(rng, (64, 32, 3, 3), 288), rng.normal(0, 0.01, 64), stride=2,
                      name="conv4"), name="relu4")                              # 64x4x4
    # spatial aggregation conv (3x3 valid on 4x4 -> 2x2), many channels, then GAP
    x = g.relu(g.conv(x, he(rng, (384, 64, 3, 3), 576), rng.normal(0, 0.01, 384), pad=0,
                      name="conv5"), name="relu5")                              # 384x2x2
    x = g.node("GlobalAveragePool", [x], name="gap")
    g.node("Flatten", [x], name="flatten", out="features", axis=1)
    return g, 384


def build_digits():
    from sklearn.linear_model import LogisticRegression

    log("[digits]")
    rng = np.random.default_rng(1234)
    imgs, y, tr, te = digits_dataset()
    g, nfeat = digits_feature_graph(rng)

    with tempfile.TemporaryDirectory() as td:
        fpath = pathlib.Path(td) / "feat.onnx"
        fm = g.model([vi("image", TensorProto.FLOAT, [1, 3, 32, 32])],
                     [vi("features", TensorProto.FLOAT, [1, nfeat])])
        onnx.checker.check_model(fm)
        onnx.save(fm, str(fpath))
        s = session(fpath)
        feats = np.concatenate([s.run(None, {"image": digit_tensor(im)})[0] for im in imgs])

    mu = feats[tr].mean(0)
    sd = feats[tr].std(0) + 1e-3
    clf = LogisticRegression(C=0.5, max_iter=5000)
    clf.fit((feats[tr] - mu) / sd, y[tr])
    log(f"  sklearn head: train acc {clf.score((feats[tr]-mu)/sd, y[tr]):.4f} "
        f"test acc {clf.score((feats[te]-mu)/sd, y[te]):.4f}")
    # fold standardisation into the Gemm
    W = (clf.coef_ / sd[None, :]).astype(np.float32)
    b = (clf.intercept_ - (clf.coef_ * (mu / sd)[None, :]).sum(1)).astype(np.float32)
    g.gemm("features", W, b, name="fc", out="logits")
    m = g.model([vi("image", TensorProto.FLOAT, [1, 3, 32, 32])],
                [vi("logits", TensorProto.FLOAT, [1, 10])])
    f32 = HERE / "digits_cnn_f32.onnx"
    save_model(m, f32)

    calib = [digit_tensor(imgs[i]) for i in tr[:100]]
    i8 = HERE / "digits_cnn_int8.onnx"
    qop = HERE / "digits_cnn_int8_qop.onnx"
    qstatic(f32, i8, "image", calib, QuantFormat.QDQ)
    qstatic(f32, qop, "image", calib, QuantFormat.QOperator)

    xs_te = [digit_tensor(imgs[i]) for i in te]
    xs_tr = [digit_tensor(imgs[i]) for i in tr]
    preds = {}
    for p in (f32, i8, qop):
        acc_te, preds[p.stem] = accuracy(p, xs_te, y[te])
        acc_tr, _ = accuracy(p, xs_tr, y[tr])
        record(p.stem, **model_info(p), accuracy_test=acc_te, accuracy_train=acc_tr,
               n_test=len(te), n_train=len(tr))
        log(f"  {p.name}: train acc {acc_tr:.4f}, test acc {acc_te:.4f}")

    # reference digit: first held-out image that every variant classifies correctly
    k = next(j for j in range(len(te)) if all(preds[s][j] == y[te[j]] for s in preds))
    ref_img = imgs[te[k]]
    x0 = digit_tensor(ref_img)
    extra = {"true_label": int(y[te[k]]), "dataset_index": int(te[k]),
             "preprocessing": "RGB, NCHW, x = uint8_pixel / 255 (mean 0, std 1)"}
    save_ref("digits_cnn_f32", f32, [x0], top1_output="logits", extra=extra)
    save_ref("digits_cnn_int8", i8, [x0], quantized=True, top1_output="logits", extra=extra)
    save_ref("digits_cnn_int8_qop", qop, [x0], quantized=True, top1_output="logits", extra=extra)
    write_png(REF / "digits_cnn_int8" / "digit.png", ref_img)
    # check the PNG round-trips to exactly in0
    from PIL import Image
    back = np.asarray(Image.open(REF / "digits_cnn_int8" / "digit.png").convert("RGB"))
    assert np.array_equal(digit_tensor(back), np.load(REF / "digits_cnn_int8" / "in0.npy"))

    sd_dir = SAMPLES / "digits"
    if sd_dir.exists():
        shutil.rmtree(sd_dir)
    sd_dir.mkdir(parents=True)
    chosen = [j for j in range(len(te)) if j != k][:40]
    seen = set()
    n = 0
    for j in chosen:
        lab = int(y[te[j]])
        if lab in seen or lab == int(y[te[k]]):
            continue
        seen.add(lab)
        write_png(sd_dir / f"digit_{lab}_{n}.png", imgs[te[j]])
        n += 1
        if n == 4:
            break
    (HERE / "digits.labels.txt").write_text("\n".join(DIGIT_LABELS) + "\n")


# --------------------------------------------------------------------------------------
# b. vibration classifier (synthetic 3-axis accelerometer, 1 kHz, 128-sample windows)
# --------------------------------------------------------------------------------------

FS = 1000.0       # Hz
WIN = 128         # samples per window
F_ROT = 25.0      # nominal shaft speed (1500 rpm), each signal uses F_ROT * U(0.9, 1.1)
BPFO_RATIO = 3.58  # bearing outer-race defect frequency / shaft frequency
RESONANCE = 280.0  # Hz, structural resonance excited by bearing impacts


def vib_signal(cls, n, rng):
    """n consecutive samples [3, n] (x, y radial; z axial), units of g, z carries +1 g gravity."""
    t = np.arange(n) / FS
    f0 = F_ROT * rng.uniform(0.9, 1.1)
    ph = rng.uniform(0, 2 * np.pi, 4)
    u = lambda lo, hi: rng.uniform(lo, hi)  # noqa: E731
    s1 = lambda a, k, p: a * np.sin(2 * np.pi * k * f0 * t + p)  # noqa: E731
    x = np.zeros((3, n))
    # every machine: small 1x and 2x, broadband noise
    a1, a2 = u(0.05, 0.2), u(0.02, 0.08)
    x[0] += s1(a1, 1, ph[0]) + s1(a2, 2, ph[1])
    x[1] += s1(a1, 1, ph[0] + np.pi / 2) + s1(a2, 2, ph[1] + np.pi / 2)
    x[2] += s1(a1 * 0.3, 1, ph[2])
    if cls == 1:  # imbalance: strong 1x radial, x and y 90 deg apart
        a = u(0.5, 1.2)
        x[0] += s1(a, 1, ph[3])
        x[1] += s1(a * u(0.7, 1.0), 1, ph[3] + np.pi / 2)
        x[2] += s1(u(0.02, 0.1), 1, ph[2])
    elif cls == 2:  # misalignment: strong 2x radial and strong axial 1x + 2x
        a = u(0.4, 0.9)
        x[0] += s1(a, 2, ph[3]) + s1(u(0.1, 0.3), 1, ph[1])
        x[1] += s1(a * u(0.6, 1.0), 2, ph[3] + np.pi / 2)
        x[2] += s1(u(0.3, 0.7), 2, ph[2]) + s1(u(0.2, 0.5), 1, ph[0])
    elif cls == 3:  # bearing fault: impacts at BPFO exciting a decaying resonance
        period = 1.0 / (BPFO_RATIO * f0 * rng.uniform(0.97, 1.03))
        t0 = rng.uniform(0, period)
        amp = u(0.8, 1.6)
        tau = u(0.003, 0.006)
        ring = np.zeros(n)
        k = 0
        while t0 + k * period < t[-1]:
            dt = t - (t0 + k * period)
            m = dt >= 0
            ring[m] += amp * rng.uniform(0.7, 1.0) * np.exp(-dt[m] / tau) * np.sin(2 * np.pi * RESONANCE * dt[m])
            k += 1
        x[0] += ring
        x[1] += 0.6 * ring
        x[2] += 0.3 * ring
    x += rng.normal(0, u(0.03, 0.12), size=(3, n))
    x[2] += 1.0
    return x.astype(np.float32)


def vib_dataset(n_per_class, rng):
    xs, ys = [], []
    for i in range(n_per_class):
        for c in range(4):
            xs.append(vib_signal(c, WIN, rng)[None])
            ys.append(c)
    return np.concatenate(xs), np.array(ys, np.int64)


def vib_filters():
    """Fixed Gabor bank: for each axis, for each centre frequency, a cos and a sin filter.
    Hann window, 41 taps (41 ms), zero DC, unit gain at the centre frequency."""
    freqs = [25, 50, 75, 100, 150, 200, 280, 400]
    k = 41
    tt = (np.arange(k) - k // 2) / FS
    win = np.hanning(k + 2)[1:-1]
    w = np.zeros((3 * len(freqs) * 2, 3, k), np.float32)
    c = 0
    for axis in range(3):
        for f in freqs:
            for phase in (0.0, np.pi / 2):
                h = win * np.cos(2 * np.pi * f * tt + phase)
                h -= win * (h.sum() / win.sum())  # remove DC response
                gain = np.abs(np.sum(h * np.exp(-2j * np.pi * f * tt)))
                w[c, axis] = h / gain * 2
                c += 1
    return w, freqs


def build_vibration():
    from sklearn.linear_model import LogisticRegression

    log("[vibration]")
    rng = np.random.default_rng(2024)
    xtr, ytr = vib_dataset(300, rng)
    xte, yte = vib_dataset(150, rng)

    g = Graph("vibration")
    w1, freqs = vib_filters()
    nf = w1.shape[0]
    x = g.relu(g.conv("window", w1, np.zeros(nf, np.float32), name="gabor_conv"), name="gabor_relu")
    # second (fixed) layer: 5-tap smoothing per channel (depthwise), then residual add + relu
    w2 = np.tile(np.array([1, 2, 3, 2, 1], np.float32)[None, None, :] / 9, (nf, 1, 1))
    sm = g.conv(x, w2, np.zeros(nf, np.float32), group=nf, name="smooth_conv")
    x = g.relu(g.node("Add", [x, sm], name="res_add"), name="res_relu")
    x = g.node("GlobalAveragePool", [x], name="gap")
    g.node("Flatten", [x], name="flatten", out="features", axis=1)

    with tempfile.TemporaryDirectory() as td:
        fpath = pathlib.Path(td) / "feat.onnx"
        fm = g.model([vi("window", TensorProto.FLOAT, [1, 3, WIN])], [vi("features", TensorProto.FLOAT, [1, nf])])
        onnx.checker.check_model(fm)
        onnx.save(fm, str(fpath))
        s = session(fpath)
        ftr = np.concatenate([s.run(None, {"window": a[None]})[0] for a in xtr])
        fte = np.concatenate([s.run(None, {"window": a[None]})[0] for a in xte])
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-3
    clf = LogisticRegression(C=1.0, max_iter=5000)
    clf.fit((ftr - mu) / sd, ytr)
    log(f"  sklearn head: train {clf.score((ftr-mu)/sd, ytr):.4f} test {clf.score((fte-mu)/sd, yte):.4f}")
    W = (clf.coef_ / sd[None, :]).astype(np.float32)
    b = (clf.intercept_ - (clf.coef_ * (mu / sd)[None, :]).sum(1)).astype(np.float32)
    g.gemm("features", W, b, name="fc", out="logits")
    m = g.model([vi("window", TensorProto.FLOAT, [1, 3, WIN])], [vi("logits", TensorProto.FLOAT, [1, 4])])
    f32 = HERE / "vibration_f32.onnx"
    i8 = HERE / "vibration_int8.onnx"
    save_model(m, f32)
    qstatic(f32, i8, "window", [a[None] for a in xtr[:100]], QuantFormat.QDQ)

    preds = {}
    for p in (f32, i8):
        acc, preds[p.stem] = accuracy(p, [a[None] for a in xte], yte)
        acc_tr, _ = accuracy(p, [a[None] for a in xtr], ytr)
        record(p.stem, **model_info(p), accuracy_test=acc, accuracy_train=acc_tr,
               n_test=len(yte), n_train=len(ytr))
        log(f"  {p.name}: train {acc_tr:.4f} test {acc:.4f}")

    # reference: first held-out bearing_fault window classified correctly by both
    k = next(j for j in range(len(yte)) if yte[j] == 3 and all(preds[s][j] == 3 for s in preds))
    x0 = xte[k][None].astype(np.float32)
    extra = {"true_label": int(yte[k]), "true_class": VIB_LABELS[yte[k]], "labels": VIB_LABELS}
    save_ref("vibration_f32", f32, [x0], top1_output="logits", extra=extra)
    save_ref("vibration_int8", i8, [x0], quantized=True, top1_output="logits", extra=extra)

    # samples: 2 windows per class + a continuous stream
    srng = np.random.default_rng(77)
    sdir = SAMPLES / "vibration"
    if sdir.exists():
        shutil.rmtree(sdir)
    sdir.mkdir(parents=True)
    for c, name in enumerate(VIB_LABELS):
        for i in range(2):
            np.save(sdir / f"{name}_{i}.npy", vib_signal(c, WIN, srng)[None])
    seg = 500
    order = [0, 1, 2, 3]
    stream = np.concatenate([vib_signal(c, seg, srng) for c in order], axis=1)  # [3, 2000]
    with open(sdir / "stream.csv", "w") as f:
        for i in range(stream.shape[1]):
            f.write(f"{stream[0, i]:.5f},{stream[1, i]:.5f},{stream[2, i]:.5f}\n")
    record("vibration_stream", segments=[{"first_sample": i * seg, "last_sample": (i + 1) * seg - 1,
                                          "class": VIB_LABELS[c]} for i, c in enumerate(order)])
    (HERE / "vibration.labels.txt").write_text("\n".join(VIB_LABELS) + "\n")


# --------------------------------------------------------------------------------------
# c/d. breast cancer: random forest (skl2onnx) and MLP (hand-built graph, dynamic int8)
# --------------------------------------------------------------------------------------

def bc_dataset():
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    d = load_breast_cancer()
    xtr, xte, ytr, yte = train_test_split(d.data.astype(np.float32), d.target.astype(np.int64),
                                          test_size=0.25, random_state=0, stratify=d.target)
    return d, xtr, xte, ytr, yte


def bc_first_correct(paths, xte, yte, label_index):
    preds = []
    for p in paths:
        s = session(p)
        preds.append([int(run(s, [x[None]])[label_index].reshape(-1)[0]) for x in xte])
    return next(j for j in range(len(yte)) if all(pr[j] == yte[j] for pr in preds))


def build_breast_cancer_trees():
    from sklearn.ensemble import RandomForestClassifier
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    log("[breast_cancer_trees]")
    d, xtr, xte, ytr, yte = bc_dataset()
    rf = RandomForestClassifier(n_estimators=20, max_depth=4, random_state=0, n_jobs=1)
    rf.fit(xtr, ytr)
    m = convert_sklearn(rf, "breast_cancer_trees", initial_types=[("features", FloatTensorType([1, 30]))],
                        target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET},
                        options={id(rf): {"zipmap": False}})
    p = HERE / "breast_cancer_trees.onnx"
    save_model(m, p)
    s = session(p)
    outs = [run(s, [x[None]]) for x in xte]
    lab = np.array([int(o[0][0]) for o in outs])
    prob = np.concatenate([o[1] for o in outs])
    log(f"  sklearn test acc {rf.score(xte, yte):.4f}; onnx label acc {np.mean(lab == yte):.4f}; "
        f"max|p_onnx - p_sklearn| {np.max(np.abs(prob - rf.predict_proba(xte))):.2e}")
    record(p.stem, **model_info(p), accuracy_test=float(np.mean(lab == yte)),
           accuracy_train=float(rf.score(xtr, ytr)), n_test=len(yte), n_train=len(ytr),
           sklearn_accuracy_test=float(rf.score(xte, yte)))
    k = bc_first_correct([p], xte, yte, 0)
    extra = {"true_label": int(yte[k]), "true_class": BC_LABELS[yte[k]], "labels": BC_LABELS,
             "feature_names": list(d.feature_names)}
    save_ref(p.stem, p, [xte[k][None].astype(np.float32)], top1_output="probabilities", extra=extra)
    (HERE / "breast_cancer.labels.txt").write_text("\n".join(BC_LABELS) + "\n")


def build_breast_cancer_mlp():
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    log("[breast_cancer_mlp]")
    d, xtr, xte, ytr, yte = bc_dataset()
    sc = StandardScaler().fit(xtr)
    mlp = MLPClassifier(hidden_layer_sizes=(32, 16), max_iter=3000, random_state=0, alpha=1e-3)
    mlp.fit(sc.transform(xtr), ytr)
    log(f"  sklearn test acc {mlp.score(sc.transform(xte), yte):.4f}")
    (w1, w2, w3), (b1, b2, b3) = mlp.coefs_, mlp.intercepts_
    # binary MLP has one logistic output z; softmax([0, z]) == [1 - sigmoid(z), sigmoid(z)]
    w3b = np.concatenate([np.zeros_like(w3), w3], axis=1)
    b3b = np.concatenate([np.zeros_like(b3), b3])
    g = Graph("breast_cancer_mlp")
    x = g.node("Sub", ["features", g.const("scaler_mean", sc.mean_.astype(np.float32)[None])], name="scale_sub")
    x = g.node("Div", [x, g.const("scaler_scale", sc.scale_.astype(np.float32)[None])], name="scale_div")
    for i, (w, b) in enumerate([(w1, b1), (w2, b2), (w3b, b3b)]):
        x = g.node("MatMul", [x, g.const(f"fc{i+1}.weight", w.astype(np.float32))], name=f"fc{i+1}_matmul")
        x = g.node("Add", [x, g.const(f"fc{i+1}.bias", b.astype(np.float32)[None])], name=f"fc{i+1}_add")
        if i < 2:
            x = g.relu(x, name=f"relu{i+1}")
    g.node("Softmax", [x], name="softmax", out="probabilities", axis=1)
    g.node("ArgMax", ["probabilities"], name="argmax", out="label", axis=1, keepdims=0)
    m = g.model([vi("features", TensorProto.FLOAT, [1, 30])],
                [vi("label", TensorProto.INT64, [1]), vi("probabilities", TensorProto.FLOAT, [1, 2])])
    f32 = HERE / "breast_cancer_mlp_f32.onnx"
    q = HERE / "breast_cancer_mlp_dynint8.onnx"
    save_model(m, f32)
    s = session(f32)
    prob = np.concatenate([run(s, [x[None]])[1] for x in xte])
    log(f"  max|p_onnx - p_sklearn| {np.max(np.abs(prob - mlp.predict_proba(sc.transform(xte)))):.2e}")
    quantize_dynamic(str(f32), str(q), weight_type=QuantType.QInt8, per_channel=False)
    mq = onnx.load(str(q))
    log(f"  quantized -> {q.name}: ir={mq.ir_version} opsets={[(o.domain, o.version) for o in mq.opset_import]}")
    if mq.ir_version != IR_VERSION:
        mq.ir_version = IR_VERSION
        onnx.save(mq, str(q))
    for p in (f32, q):
        acc, _ = accuracy(p, [x[None] for x in xte], yte, out_index=1)
        acc_tr, _ = accuracy(p, [x[None] for x in xtr], ytr, out_index=1)
        record(p.stem, **model_info(p), accuracy_test=acc, accuracy_train=acc_tr,
               n_test=len(yte), n_train=len(ytr))
        log(f"  {p.name}: train {acc_tr:.4f} test {acc:.4f}")
    k = bc_first_correct([f32, q], xte, yte, 0)
    extra = {"true_label": int(yte[k]), "true_class": BC_LABELS[yte[k]], "labels": BC_LABELS,
             "feature_names": list(d.feature_names)}
    x0 = xte[k][None].astype(np.float32)
    save_ref(f32.stem, f32, [x0], top1_output="probabilities", extra=extra)
    save_ref(q.stem, q, [x0], quantized=True, top1_output="probabilities", extra=extra)


# --------------------------------------------------------------------------------------
# f/g/h. multi_io, unsupported_op, corrupt
# --------------------------------------------------------------------------------------

def build_multi_io():
    log("[multi_io]")
    rng = np.random.default_rng(5)
    g = Graph("multi_io")
    W = rng.uniform(-1, 1, (3, 4)).astype(np.float32)
    mm = g.node("MatMul", ["b", g.const("W", W)], name="b_matmul")
    g.node("Add", ["a", mm], name="sum_add", out="sum_feat")
    axes = g.const("axes1", np.array([1], np.int64))
    sa = g.node("ReduceSum", ["a", axes], name="sum_a", keepdims=1)
    sb = g.node("ReduceSum", ["b", axes], name="sum_b", keepdims=1)
    den = g.node("Add", [sb, g.const("ten", np.array([[10.0]], np.float32))], name="den_add")
    g.node("Div", [sa, den], name="ratio_div", out="ratio")
    m = g.model([vi("a", TensorProto.FLOAT, [1, 4]), vi("b", TensorProto.FLOAT, [1, 3])],
                [vi("sum_feat", TensorProto.FLOAT, [1, 4]), vi("ratio", TensorProto.FLOAT, [1, 1])])
    p = HERE / "multi_io.onnx"
    save_model(m, p)
    a = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    b = np.array([[0.5, -1.0, 2.0]], np.float32)
    outs = save_ref("multi_io", p, [a, b])
    exp_sum = a + b @ W
    exp_ratio = a.sum(1, keepdims=True) / (b.sum(1, keepdims=True) + 10)
    assert np.allclose(outs[0], exp_sum, atol=1e-6) and np.allclose(outs[1], exp_ratio, atol=1e-6)
    record(p.stem, **model_info(p), W=W.tolist())


def build_unsupported():
    log("[unsupported_op]")
    g = Graph("unsupported_op")
    r = g.relu("x", name="relu")
    g.node("FancyOp", [r], name="fancy_node", out="y", domain="com.example", gain=2.0)
    m = g.model([vi("x", TensorProto.FLOAT, [1, 4])], [vi("y", TensorProto.FLOAT, [1, 4])],
                extra_opsets=[("com.example", 1)])
    p = HERE / "unsupported_op.onnx"
    save_model(m, p)  # onnx.checker accepts ops of unknown domains
    record(p.stem, **model_info(p))


def build_unstable_digits():
    """A deliberately broken digits classifier for the rollback test: the input and output of
    digits_cnn_*, logits = sqrt(1 - sum(image)) * [0..9]. Finite on an all-zero image (the check
    reload_model runs without a reference input), NaN on any real digit photo."""
    log("[unstable_digits]")
    g = Graph("unstable_digits")
    s = g.node("ReduceSum", ["image"], name="sum_all", keepdims=0)
    d = g.node("Sub", [g.const("one", np.array(1.0, np.float32)), s], name="one_minus_sum")
    r = g.node("Sqrt", [d], name="sqrt")
    g.node("Mul", [r, g.const("ramp", np.arange(10, dtype=np.float32).reshape(1, 10))], name="logits", out="logits")
    m = g.model([vi("image", TensorProto.FLOAT, [1, 3, 32, 32])], [vi("logits", TensorProto.FLOAT, [1, 10])])
    p = HERE / "unstable_digits.onnx"
    save_model(m, p)
    zeros = run(session(p), [np.zeros((1, 3, 32, 32), np.float32)])[0]
    bright = run(session(p), [np.full((1, 3, 32, 32), 0.5, np.float32)])[0]
    assert np.isfinite(zeros).all() and np.isnan(bright).all()
    record(p.stem, **model_info(p))


def build_tree_binary_repro():
    """Minimal repro of tract 0.23's binary TreeEnsembleClassifier label bug: one stump,
    positive-class leaf weights only (the skl2onnx binary form). For x=1.0 the positive-class
    score is 0.8, so ONNX Runtime says label 1; tract alone says 0. edgeinfer patches it."""
    log("[tree_binary_repro]")
    g = Graph("tree_binary_repro")
    node = helper.make_node(
        "TreeEnsembleClassifier", ["x"], ["label", "probabilities"], name="stump", domain="ai.onnx.ml",
        nodes_treeids=[0, 0, 0], nodes_nodeids=[0, 1, 2], nodes_featureids=[0, 0, 0],
        nodes_values=[0.5, 0.0, 0.0], nodes_modes=["BRANCH_LEQ", "LEAF", "LEAF"],
        nodes_truenodeids=[1, 0, 0], nodes_falsenodeids=[2, 0, 0],
        class_treeids=[0, 0], class_nodeids=[1, 2], class_ids=[0, 0], class_weights=[0.3, 0.8],
        classlabels_int64s=[0, 1], post_transform="NONE")
    g.nodes.append(node)
    m = g.model([vi("x", TensorProto.FLOAT, [1, 1])],
                [vi("label", TensorProto.INT64, [1]), vi("probabilities", TensorProto.FLOAT, [1, 2])],
                extra_opsets=[("ai.onnx.ml", 1)])
    p = HERE / "tree_binary_repro.onnx"
    save_model(m, p)
    save_ref(p.stem, p, [np.array([[1.0]], np.float32)])
    record(p.stem, **model_info(p))


def build_digits_dynamic():
    """The float digits CNN with symbolic dims (batch, height, width) and a value_info entry that
    contradicts the graph (as some exporters write), to test shape pinning. Same weights as
    digits_cnn_f32, so at 1x3x32x32 its outputs are models/ref/digits_cnn_f32/out0.npy."""
    log("[digits_cnn_dynamic]")
    src = HERE / "digits_cnn_f32.onnx"
    m = onnx.load(str(src))
    dims = m.graph.input[0].type.tensor_type.shape.dim
    for d, name in zip(dims, ["batch", None, "height", "width"]):
        if name:
            d.ClearField("dim_value")
            d.dim_param = name
    out_dims = m.graph.output[0].type.tensor_type.shape.dim
    out_dims[0].ClearField("dim_value")
    out_dims[0].dim_param = "batch"
    first_conv = next(n for n in m.graph.node if n.op_type == "Conv")
    del m.graph.value_info[:]
    m.graph.value_info.append(vi(first_conv.output[0], TensorProto.FLOAT, [1, 999, 7, 7]))
    p = HERE / "digits_cnn_dynamic.onnx"
    save_model(m, p, check=False)  # the contradicting value_info is the point
    record(p.stem, **model_info(p))


def build_dynamic_int8():
    """digits_cnn_dynint8 and mobilenetv2_dynint8: the shipped float CNNs through
    onnxruntime's quantize_dynamic with its defaults (int8 weights per tensor), the
    quantization users try first: DynamicQuantizeLinear -> ConvInteger / MatMulInteger ->
    Cast -> Mul. References on the same inputs as the static int8 models."""
    for stem in ("digits_cnn", "mobilenetv2"):
        log(f"[{stem}_dynint8]")
        src = HERE / f"{stem}_f32.onnx"
        if not src.exists():  # the float MobileNetV2 is not committed; its seeds make it again
            build_mobilenetv2_f32()
        q = HERE / f"{stem}_dynint8.onnx"
        quantize_dynamic(str(src), str(q), weight_type=QuantType.QInt8)
        mq = onnx.load(str(q))
        if mq.ir_version != IR_VERSION:
            mq.ir_version = IR_VERSION
            onnx.save(mq, str(q))
        log(f"  quantized -> {q.name}: ops {dict(collections.Counter(n.op_type for n in mq.graph.node))}")
        x0 = np.load(REF / f"{stem}_int8" / "in0.npy")
        ref_meta = json.loads((REF / f"{stem}_int8" / "meta.json").read_text())
        if stem == "mobilenetv2":
            # Random weights give small margins: as for the static int8 model, the candidate
            # whose dynamic int8 top-1 wins by the largest margin, so that parity tests the
            # values and not a coin toss between two near-equal logits.
            s_q = session(q)
            cands = structured_images(24, seed=13)
            margins = [np.diff(np.sort(run(s_q, [im[None]])[0].ravel())[-2:])[0] for im in cands]
            ci = int(np.argmax(margins))
            x0 = cands[ci][None]
            ref_meta["input_description"] = (f"structured_images(24, seed=13)[{ci}]: smooth synthetic "
                                             "pattern, values in [0,1), no normalisation")
        lf, lq = run(session(src), [x0])[0], run(session(q), [x0])[0]
        log(f"  f32 vs dynamic int8 on the ref input: max abs diff {np.max(np.abs(lf - lq)):.3f}")
        record(q.stem, **model_info(q), ref_max_abs_diff_f32_vs_dynint8=float(np.max(np.abs(lf - lq))))
        if stem == "digits_cnn":
            imgs, y, _, te = digits_dataset()
            acc, _ = accuracy(q, [digit_tensor(imgs[i]) for i in te], y[te])
            record(q.stem, accuracy_test=acc)
            log(f"  held-out accuracy {acc:.4f}")
        extra = {k: ref_meta[k] for k in ("input_description", "true_label", "true_class", "labels")
                 if k in ref_meta}
        save_ref(q.stem, q, [x0], quantized=True, top1_output="logits", extra=extra)


def build_corrupt():
    log("[corrupt]")
    src = HERE / "digits_cnn_f32.onnx"
    if not src.exists():
        build_digits()
    p = HERE / "corrupt.onnx"
    p.write_bytes(src.read_bytes()[:1000])
    log(f"  wrote {p.name} ({p.stat().st_size} bytes)")
    record(p.stem, file=p.name, size_bytes=p.stat().st_size)


# --------------------------------------------------------------------------------------
# e. MobileNetV2-shaped model (random weights, BN folded), int8 QDQ
# --------------------------------------------------------------------------------------

MBV2_CFG = [  # expansion t, output channels c, repeats n, first stride s  (MobileNetV2 1.0)
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
]


def structured_images(n, seed, size=224):
    """Smooth random colour blobs + a sinusoidal grating + a gradient, values in [0, 1)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        img = np.zeros((3, size, size))
        for c in range(3):
            img[c] = upsample_bilinear(rng.uniform(0, 1, (7, 7)), size) * 0.6
        f, a = rng.uniform(2, 12), rng.uniform(0, np.pi)
        grating = 0.5 + 0.5 * np.sin(2 * np.pi * f * (xx * np.cos(a) + yy * np.sin(a)))
        img += 0.25 * grating[None] * rng.uniform(0.3, 1.0, (3, 1, 1))
        img += 0.15 * (xx if rng.uniform() < 0.5 else yy)[None]
        out.append(np.clip(img, 0, 0.999).astype(np.float32))
    return np.stack(out)


def _np_conv(x, w, stride, group):
    """Reference conv (no bias, padded by k // 2) for the conv kinds of the MobileNets:
    1x1, full kxk, depthwise kxk."""
    o, ci, kh, kw = w.shape
    if kh == 1:
        xs = x[:, :, ::stride, ::stride]
        return np.einsum("oc,bchw->bohw", w[:, :, 0, 0], xs, optimize=True)
    B, C, H, W = x.shape
    p = kh // 2
    Ho, Wo = (H + 2 * p - kh) // stride + 1, (W + 2 * p - kw) // stride + 1
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    if group == C and ci == 1:  # depthwise
        y = np.zeros((B, C, Ho, Wo), np.float32)
        for ky in range(kh):
            for kx in range(kw):
                y += w[None, :, 0, ky, kx, None, None] * \
                    xp[:, :, ky:ky + stride * Ho:stride, kx:kx + stride * Wo:stride]
        return y
    patches = np.stack([xp[:, :, ky:ky + stride * Ho:stride, kx:kx + stride * Wo:stride]
                        for ky in range(kh) for kx in range(kw)], axis=2)  # B,C,k*k,Ho,Wo
    return np.einsum("ock,bckhw->bohw", w.reshape(o, ci, kh * kw), patches, optimize=True)


def bn_folded_conv(g, rng, state):
    """A conv adder for `g`: seeded He-normal weights, then, like a batch-norm folded into
    the conv, each output channel rescaled/shifted so that its pre-activation has zero
    mean / `gamma` std over the images in state["x"] (run through the net so far), plus a
    small random shift (beta ~ N(0, 0.1)); ReLU6 after it with `act`. Advances `state`."""

    def conv_bn(cin, cout, k, stride, group, act, name, gamma=1.0):
        fan_in = (cin // group) * k * k
        w = he(rng, (cout, cin // group, k, k), fan_in, gain=2.0 if act else 1.0)
        y = _np_conv(state["x"], w, stride, group)
        mu = y.mean(axis=(0, 2, 3))
        sd = y.std(axis=(0, 2, 3)) + 1e-5
        beta = rng.normal(0, 0.1, cout)
        wf = (w * (gamma / sd)[:, None, None, None]).astype(np.float32)
        bf = (beta - mu * gamma / sd).astype(np.float32)
        y = ((y - mu[None, :, None, None]) * (gamma / sd)[None, :, None, None]
             + beta[None, :, None, None]).astype(np.float32)
        out = g.conv(state["name"], wf, bf, stride=stride, group=group, name=name)
        if act:
            y = np.clip(y, 0, 6)
            out = g.clip6(out, name=f"{name}_relu6")
        state["x"], state["name"] = y, out

    return conv_bn


def inverted_residual(g, state, conv_bn, cin, t, c, k, stride, pre):
    """A MobileNetV2/V3 block on `state` through `conv_bn`: expand 1x1 (when t > 1), depthwise
    kxk, linear project 1x1, and a residual Add when stride is 1 and cin = c."""
    inp_x, inp_name = state["x"], state["name"]
    hidden = cin * t
    if t != 1:
        conv_bn(cin, hidden, 1, 1, 1, True, f"{pre}_expand")
    conv_bn(hidden, hidden, k, stride, hidden, True, f"{pre}_dw")
    residual = stride == 1 and cin == c
    conv_bn(hidden, c, 1, 1, 1, False, f"{pre}_project", gamma=0.5 if residual else 1.0)
    if residual:
        state["x"] = state["x"] + inp_x
        state["name"] = g.node("Add", [inp_name, state["name"]], name=f"{pre}_add")


def build_mobilenetv2_f32():
    """Builds models/mobilenetv2_f32.onnx. Conv weights: seeded He-normal; then, like a
    batch-norm folded into the conv, each output channel is rescaled/shifted so that its
    pre-activation has zero mean / unit std over 4 seeded 'structured' images, plus a small
    random shift (beta ~ N(0, 0.1)). Projection (linear) convs of residual blocks use gamma 0.5."""
    log("[mobilenetv2_f32]")
    rng = np.random.default_rng(20240601)
    xb = structured_images(4, seed=11)
    g = Graph("mobilenetv2")
    state = {"x": xb, "name": "input"}
    conv_bn = bn_folded_conv(g, rng, state)

    conv_bn(3, 32, 3, 2, 1, True, "stem_conv")
    cin = 32
    bi = 0
    for t, c, n, s in MBV2_CFG:
        for i in range(n):
            stride = s if i == 0 else 1
            inverted_residual(g, state, conv_bn, cin, t, c, 3, stride, f"block{bi}")
            cin = c
            bi += 1
    conv_bn(cin, 1280, 1, 1, 1, True, "head_conv")
    feat = state["x"].mean(axis=(2, 3))
    x = g.node("GlobalAveragePool", [state["name"]], name="gap")
    x = g.node("Flatten", [x], name="flatten", axis=1)
    fw = he(rng, (1000, 1280), 1280, gain=1.0) * 2.0
    fb = rng.normal(0, 0.01, 1000).astype(np.float32)
    g.gemm(x, fw, fb, name="classifier", out="logits")
    m = g.model([vi("input", TensorProto.FLOAT, [1, 3, 224, 224])],
                [vi("logits", TensorProto.FLOAT, [1, 1000])])
    p = HERE / "mobilenetv2_f32.onnx"
    save_model(m, p)
    # sanity: ORT matches the numpy construction pass
    ref_logits = feat @ fw.T + fb
    ort_logits = run(session(p), [xb[:1]])[0]
    log(f"  numpy vs ORT max abs diff {np.max(np.abs(ref_logits[:1] - ort_logits)):.2e}, "
        f"logit std {ort_logits.std():.3f}")
    return p


def build_mobilenetv2():
    p = build_mobilenetv2_f32()
    log("[mobilenetv2_int8]")
    q = HERE / "mobilenetv2_int8.onnx"
    calib = structured_images(16, seed=12)
    qstatic(p, q, "input", [c[None] for c in calib], QuantFormat.QDQ)
    s_f, s_q = session(p), session(q)
    # reference input: of 24 seeded candidates, the one whose int8 top-1 wins by the largest margin
    cands = structured_images(24, seed=13)
    margins = []
    for im in cands:
        top = np.sort(run(s_q, [im[None]])[0].ravel())[::-1]
        margins.append(top[0] - top[1])
    ci = int(np.argmax(margins))
    x0 = cands[ci][None]
    agree = []
    for im in structured_images(8, seed=14):
        agree.append(int(np.argmax(run(s_f, [im[None]])[0])) == int(np.argmax(run(s_q, [im[None]])[0])))
    lf, lq = run(s_f, [x0])[0], run(s_q, [x0])[0]
    log(f"  f32 vs int8 on ref image: max abs diff {np.max(np.abs(lf - lq)):.3f}; "
        f"top-1 agreement on 8 other images {sum(agree)}/8")
    record(p.stem, **model_info(p), committed=False)
    record(q.stem, **model_info(q), top1_agreement_f32_vs_int8=f"{sum(agree)}/8",
           ref_max_abs_diff_f32_vs_int8=float(np.max(np.abs(lf - lq))))
    extra = {"input_description": f"structured_images(24, seed=13)[{ci}]: smooth synthetic pattern, "
                                  "values in [0,1), no normalisation"}
    save_ref("mobilenetv2_f32", p, [x0], top1_output="logits", extra=extra)
    save_ref("mobilenetv2_int8", q, [x0], quantized=True, top1_output="logits", extra=extra)


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------

DW5_CFG = [  # kernel k, expansion t, output channels c, stride s: MobileNetV3-style 5x5 stages
    (3, 1, 16, 1), (5, 4, 24, 2), (5, 3, 24, 1), (5, 3, 40, 2),
    (5, 3, 40, 1), (3, 4, 48, 2), (5, 6, 48, 1),
]


def build_dw5x5():
    """Builds models/dw5x5_cnn_{f32,int8}.onnx: a small MobileNetV3-style network (ReLU6, no
    squeeze-excite) whose depthwise convolutions are mostly 5x5, of stride 1 and 2, at 128x128,
    with 10 untrained outputs. It exists to test and measure 5x5 depthwise kernels."""
    log("[dw5x5_cnn]")
    rng = np.random.default_rng(20261207)
    size = 128
    xb = structured_images(4, seed=21, size=size)
    g = Graph("dw5x5_cnn")
    state = {"x": xb, "name": "input"}
    conv_bn = bn_folded_conv(g, rng, state)
    conv_bn(3, 16, 3, 2, 1, True, "stem_conv")
    cin = 16
    for bi, (k, t, c, s) in enumerate(DW5_CFG):
        inverted_residual(g, state, conv_bn, cin, t, c, k, s, f"block{bi}")
        cin = c
    conv_bn(cin, 256, 1, 1, 1, True, "head_conv")
    x = g.node("GlobalAveragePool", [state["name"]], name="gap")
    x = g.node("Flatten", [x], name="flatten", axis=1)
    fw = he(rng, (10, 256), 256, gain=1.0) * 2.0
    fb = rng.normal(0, 0.01, 10).astype(np.float32)
    g.gemm(x, fw, fb, name="classifier", out="logits")
    m = g.model([vi("input", TensorProto.FLOAT, [1, 3, size, size])], [vi("logits", TensorProto.FLOAT, [1, 10])])
    p = HERE / "dw5x5_cnn_f32.onnx"
    save_model(m, p)
    q = HERE / "dw5x5_cnn_int8.onnx"
    qstatic(p, q, "input", [c[None] for c in structured_images(16, seed=22, size=size)], QuantFormat.QDQ)
    # reference input: of 16 seeded candidates, the one whose int8 top-1 wins by the largest margin
    s_q = session(q)
    cands = structured_images(16, seed=23, size=size)
    margins = [np.diff(np.sort(run(s_q, [im[None]])[0].ravel())[-2:])[0] for im in cands]
    ci = int(np.argmax(margins))
    x0 = cands[ci][None]
    record(p.stem, **model_info(p))
    record(q.stem, **model_info(q))
    extra = {"input_description": f"structured_images(16, seed=23, size=128)[{ci}]: smooth synthetic "
                                  "pattern, values in [0,1), no normalisation"}
    save_ref(p.stem, p, [x0], top1_output="logits", extra=extra)
    save_ref(q.stem, q, [x0], quantized=True, top1_output="logits", extra=extra)


def build_frames_mlp():
    """Builds models/frames_mlp_{f32,int8}.onnx: a keyword-spotting-shaped sequence model, a
    per-frame MLP over 49 frames of 40 features (MatMul + Add + Relu three times: 40 -> 128 ->
    128 -> 64), the mean over frames and a 12-way Gemm; random weights. Its QDQ form has
    MatMuls of 49 rows, which test and measure integer matrix products beyond a classifier's
    matrix-vector one."""
    log("[frames_mlp]")
    rng = np.random.default_rng(20261208)
    frames, feats = 49, 40
    g = Graph("frames_mlp")
    x = "frames"
    for i, (k, n) in enumerate([(feats, 128), (128, 128), (128, 64)]):
        w = g.const(f"fc{i}.weight", he(rng, (k, n), k))
        b = g.const(f"fc{i}.bias", rng.normal(0, 0.1, n).astype(np.float32))
        x = g.node("MatMul", [x, w], name=f"fc{i}")
        x = g.node("Add", [x, b], name=f"fc{i}_bias")
        x = g.relu(x, name=f"fc{i}_relu")
    x = g.node("ReduceMean", [x], name="pool", axes=[1], keepdims=0)
    g.gemm(x, he(rng, (12, 64), 64, gain=1.0) * 2.0, rng.normal(0, 0.01, 12), name="classifier", out="logits")
    m = g.model([vi("frames", TensorProto.FLOAT, [1, frames, feats])], [vi("logits", TensorProto.FLOAT, [1, 12])])
    p = HERE / "frames_mlp_f32.onnx"
    save_model(m, p)
    q = HERE / "frames_mlp_int8.onnx"
    calib = [rng.normal(0, 1, (1, frames, feats)).astype(np.float32) for _ in range(16)]
    qstatic(p, q, "frames", calib, QuantFormat.QDQ)
    # reference input: of 16 seeded candidates, the one whose int8 top-1 wins by the largest margin
    s_q = session(q)
    cands = [rng.normal(0, 1, (1, frames, feats)).astype(np.float32) for _ in range(16)]
    margins = [np.diff(np.sort(run(s_q, [c])[0].ravel())[-2:])[0] for c in cands]
    ci = int(np.argmax(margins))
    record(p.stem, **model_info(p))
    record(q.stem, **model_info(q))
    extra = {"input_description": f"candidate {ci} of 16 seeded N(0, 1) inputs after 16 calibration ones "
                                  "(seed 20261208)"}
    save_ref(p.stem, p, [cands[ci]], top1_output="logits", extra=extra)
    save_ref(q.stem, q, [cands[ci]], quantized=True, top1_output="logits", extra=extra)


BUILDERS = collections.OrderedDict([
    ("digits", lambda: build_digits()),
    ("vibration", lambda: build_vibration()),
    ("breast_cancer_trees", lambda: build_breast_cancer_trees()),
    ("breast_cancer_mlp", lambda: build_breast_cancer_mlp()),
    ("mobilenetv2", lambda: build_mobilenetv2()),
    ("mobilenetv2_f32", lambda: build_mobilenetv2_f32()),
    ("dw5x5_cnn", lambda: build_dw5x5()),
    ("frames_mlp", lambda: build_frames_mlp()),
    ("multi_io", lambda: build_multi_io()),
    ("unsupported_op", lambda: build_unsupported()),
    ("tree_binary_repro", lambda: build_tree_binary_repro()),
    ("digits_cnn_dynamic", lambda: build_digits_dynamic()),
    ("dynamic_int8", lambda: build_dynamic_int8()),
    ("corrupt", lambda: build_corrupt()),
    ("unstable_digits", lambda: build_unstable_digits()),
])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma separated subset of: " + ", ".join(BUILDERS))
    args = ap.parse_args()
    # default: everything; mobilenetv2 already (re)builds mobilenetv2_f32 as its float source
    default = [n for n in BUILDERS if n != "mobilenetv2_f32"]
    names = default if not args.only else [s.strip() for s in args.only.split(",")]
    for n in names:
        if n not in BUILDERS:
            sys.exit(f"unknown target {n!r}; choose from {list(BUILDERS)}")
    log(f"numpy {np.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}")
    if SUMMARY.exists():
        SUMMARY_DATA.update(json.loads(SUMMARY.read_text()))
    for n in names:
        BUILDERS[n]()
    SUMMARY_DATA["_versions"] = {"numpy": np.__version__, "onnx": onnx.__version__,
                                 "onnxruntime": ort.__version__, "opset": OPSET,
                                 "ai.onnx.ml_target_opset": ML_OPSET, "ir_version": IR_VERSION,
                                 "scikit-learn": __import__("sklearn").__version__,
                                 "skl2onnx": __import__("skl2onnx").__version__}
    SUMMARY.write_text(json.dumps(SUMMARY_DATA, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
