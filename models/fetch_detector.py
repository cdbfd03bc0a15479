#!/usr/bin/env python3
"""Fetch the real pretrained detector used by the detection tests and examples.

The PyPI package `nudenet` 3.4.2 ships a YOLOv8n ONNX detector (`nudenet/320n.onnx`, input
[1,3,320,320] RGB 0..1, output [1, 4+18, 2100]) inside its wheel. This script downloads that
wheel with pip (no dependencies), checks its SHA-256, extracts the model to
`models/detector_yolov8n.onnx` and writes the 18 class names, in order, taken from the
package's source (`nudenet/nudenet.py`), to `models/detector_yolov8n.labels.txt`.

The model is NOT committed: the wheel's LICENSE file is the GNU AGPL-3.0 (its METADATA says
MIT, which contradicts it) and the ONNX file's own metadata says "AGPL-3.0 License"
(Ultralytics). Run this script instead (CI runs it from .ci/run):

    python3 models/fetch_detector.py

It does nothing when both files already exist with the expected content.
"""

import ast
import hashlib
import pathlib
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "nudenet"
VERSION = "3.4.2"
WHEEL = f"{PACKAGE}-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "5937dbd84e5d8e5de038f08ffea5a1bb50a08475776bf2b4795914ce0eaf0331"
MEMBER = "nudenet/320n.onnx"
MODEL_SHA256 = "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f"
SOURCE = "nudenet/nudenet.py"

HERE = pathlib.Path(__file__).resolve().parent
MODEL = HERE / "detector_yolov8n.onnx"
LABELS = HERE / "detector_yolov8n.labels.txt"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def labels_from_source(text: str) -> list:
    """The `__labels = [...]` list literal of nudenet.py, read without importing the package."""
    tree = ast.parse(text)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__labels" for t in node.targets
        ):
            labels = ast.literal_eval(node.value)
            if not labels or not all(isinstance(label, str) for label in labels):
                break
            return labels
    sys.exit(f"fetch_detector: no `__labels` list found in {SOURCE}")


def labels_from_model(model: bytes) -> list:
    """Class names from the ONNX metadata (`names`, an Ultralytics dict literal), as a cross-check."""
    try:
        import onnx
    except ImportError:
        return []
    m = onnx.load_from_string(model)
    for prop in m.metadata_props:
        if prop.key == "names":
            names = ast.literal_eval(prop.value)
            return [names[i] for i in sorted(names)]
    return []


def up_to_date() -> bool:
    return MODEL.is_file() and LABELS.is_file() and sha256(MODEL.read_bytes()) == MODEL_SHA256


def main() -> None:
    if up_to_date():
        print(f"{MODEL.relative_to(HERE.parent)} is up to date (sha256 {MODEL_SHA256[:16]}...)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               f"{PACKAGE}=={VERSION}", "-d", tmp, "--quiet"]
        print("running:", " ".join(cmd))
        subprocess.run(cmd, check=True)
        wheel = pathlib.Path(tmp) / WHEEL
        if not wheel.is_file():
            sys.exit(f"fetch_detector: pip did not produce {WHEEL} (found {sorted(p.name for p in pathlib.Path(tmp).iterdir())})")
        got = sha256(wheel.read_bytes())
        if got != WHEEL_SHA256:
            sys.exit(f"fetch_detector: {WHEEL} has sha256 {got}, expected {WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as z:
            model = z.read(MEMBER)
            source = z.read(SOURCE).decode("utf-8")
    got = sha256(model)
    if got != MODEL_SHA256:
        sys.exit(f"fetch_detector: {MEMBER} has sha256 {got}, expected {MODEL_SHA256}")
    labels = labels_from_source(source)
    from_model = labels_from_model(model)
    if from_model and from_model != labels:
        sys.exit(f"fetch_detector: labels in {SOURCE} {labels} differ from the model metadata {from_model}")
    MODEL.write_bytes(model)
    LABELS.write_text("".join(f"{label}\n" for label in labels))
    print(f"wrote {MODEL.relative_to(HERE.parent)} ({len(model)} bytes, sha256 {MODEL_SHA256})")
    print(f"wrote {LABELS.relative_to(HERE.parent)} ({len(labels)} classes)")


if __name__ == "__main__":
    main()
