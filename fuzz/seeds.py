#!/usr/bin/env python3
"""Writes the seed corpora for the fuzz targets from the repository's own
fixtures (configs, sample payloads, images, models, a disk queue segment,
converted models) into fuzz/corpus/<target>/. Run by fuzz/run.sh; idempotent.

usage: python3 fuzz/seeds.py [EDGEINFER_BINARY]   (the binary makes converted-model seeds)
"""

import glob
import json
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "fuzz" / "corpus"


def put(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / f"seed-{name}").write_bytes(data)


def record(rid, ms, topic, payload, qos=1, retain=False):
    t = topic.encode()
    body = struct.pack("<QQBBH", rid, ms, qos, int(retain), len(t)) + t + payload
    return struct.pack("<II", len(body), zlib.crc32(body)) + body


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else None
    # config: every shipped config and the docs' examples
    for p in sorted(glob.glob(str(ROOT / "deploy/**/*.toml"), recursive=True)):
        put("config", Path(p).name, Path(p).read_bytes())
    for doc in sorted((ROOT / "docs").glob("*.md")):
        for i, block in enumerate(doc.read_text().split("```toml")[1:]):
            put("config", f"{doc.stem}-{i}.toml", block.split("```")[0].encode())
    # payload: format byte + payload
    put("payload", "json", b"\x00[0.1, 0.2, 0.3]")
    put("payload", "json-named", b'\x00{"x": 0.1, "y": -2e3, "z": [1, 2]}')
    put("payload", "csv", b"\x010.1,0.2,0.3")
    put("payload", "f32le", b"\x02" + struct.pack("<4f", 1.0, -2.5, 3.0, 0.0))
    put("payload", "png", b"\x03" + (ROOT / "models/samples/digits/digit_0_0.png").read_bytes())
    put("payload", "lines", b"\x04" + (ROOT / "models/samples/vibration/stream.csv").read_bytes()[:4096])
    # command: one of each, signed fields included
    cmds = [
        {"id": 1, "pipeline": "cam"},
        {"id": 2, "pipeline": "cam", "output": 0, "threshold": 0.7, "ts": 1800000000, "hmac": "00"},
        {"pipeline": "cam", "model": "models/new.onnx", "target": "group/canary"},
        {"pipeline": "cam", "url": "https://example.com/m.onnx", "sha256": "ab" * 32, "name": "m"},
        {"pipeline": "cam", "topic": "models/cam", "sha256": "cd" * 32},
    ]
    for i, c in enumerate(cmds):
        put("command", str(i), bytes([i]) + json.dumps(c).encode())
    # multipart and frame: real JPEG/PNG images
    jpeg = (ROOT / "models/samples/detect/faces.jpg").read_bytes()
    small = [p.read_bytes() for p in sorted((ROOT / "models/samples/digits").glob("*.png"))]
    part = lambda body, length=True: (  # noqa: E731
        b"--frame\r\nContent-Type: image/jpeg\r\n"
        + (f"Content-Length: {len(body)}\r\n".encode() if length else b"")
        + b"\r\n" + body + b"\r\n"
    )
    put("multipart", "stream", b"multipart/x-mixed-replace; boundary=frame\n" + part(jpeg) + part(small[0], False) + b"--frame--\r\n")
    put("multipart", "quoted", b'multipart/x-mixed-replace;boundary="--frame"\n' + part(small[1]))
    put("frame", "jpeg", b"\x40" + jpeg)
    put("frame", "two-jpegs", b"\xff" + jpeg + b"garbage" + jpeg)
    for i, png in enumerate(small):
        put("frame", f"png{i}", b"\x07" + png)
    # disk_queue: mode + ack (12 bytes) + segment
    seg = b"".join(record(i, 1_800_000_000_000 + i, "edgeinfer/d/p/result", b'{"seq":%d}' % i) for i in range(1, 6))
    ack = struct.pack("<Q", 2) + struct.pack("<I", zlib.crc32(struct.pack("<Q", 2)))
    put("disk_queue", "intact", b"\x00" + ack + seg)
    put("disk_queue", "torn", b"\x00" + ack + seg[: len(seg) - 7])
    put("disk_queue", "fixable", b"\x01" + ack + seg[:30] + b"\x00" * 4 + seg[34:])
    # onnx: the small shipped models
    for p in sorted((ROOT / "models").glob("*.onnx")):
        if p.stat().st_size <= 256 * 1024:
            put("onnx", p.name, p.read_bytes())
    # converted: convert two small models with the binary, gzipped and plain
    if binary:
        with tempfile.TemporaryDirectory() as tmp:
            for model, ext, pick in [("vibration_int8", "nnef.tgz", b"\x00"), ("digits_cnn_f32", "nnef.tar", b"\x01")]:
                out = Path(tmp) / f"{model}.{ext}"
                r = subprocess.run([binary, "convert", str(ROOT / "models" / f"{model}.onnx"), "-o", str(out)],
                                   capture_output=True, text=True)
                if r.returncode == 0:
                    put("converted", out.name, pick + out.read_bytes())
                else:
                    print(f"seeds: convert {model} failed: {r.stderr.strip()}", file=sys.stderr)
    for t in sorted(p.name for p in CORPUS.iterdir()):
        print(f"seeds: {t}: {len(list((CORPUS / t).iterdir()))} files")


if __name__ == "__main__":
    main()
