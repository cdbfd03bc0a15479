#!/usr/bin/env python3
"""Fetch Silero VAD from its PyPI wheel and make edgeinfer's single-input window model from it.

Run from the repository root:

    pip install -r models/requirements-audio.txt
    apt-get install -y espeak-ng            # only to remake models/samples/speech16k.wav
    python3 models/fetch_vad.py

Steps, each checked:
  1. `pip download silero-vad==6.2.3 --no-deps`; the wheel's sha256 must match WHEEL_SHA256.
  2. Extract `silero_vad/data/silero_vad_16k_sequence.onnx` (sha256 pinned) and the wheel's
     MIT licence: models/silero_vad_16k_sequence.onnx, models/silero_vad.LICENSE.
  3. Derive models/silero_vad_window16k.onnx: the daemon feeds one input, so the LSTM's
     h and c become zero initializers and the 64-sample context blocks the sequence model
     expects are built inside the graph from one raw window `audio` [1, 16384] (1024 ms):
     32 blocks of 512 samples, each prefixed by the previous block's last 64 samples
     (zeros for the first), as silero_vad.sequence_vad.frame_blocks does.
     Outputs: `speech_prob` [1, 1] (the highest block probability) and `block_probs` [1, 32].
  4. models/samples/speech16k.wav: 1.5 s of quiet noise, espeak-ng speech, 1 s of quiet
     noise (16 kHz mono 16-bit, a 44-byte header so `tail -c +45` gives raw s16le).
  5. models/ref/vad/windows.json: onnxruntime's speech_prob for every 1024 ms window of that
     WAV every 512 ms, what the daemon test compares tract against; plus the sequence model's
     ORT probabilities over the whole WAV (models/ref/vad/sequence_probs.npy) for the engine test.
"""

import hashlib
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import wave
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = pathlib.Path(__file__).resolve().parent
PACKAGE, VERSION = "silero-vad", "6.2.3"
WHEEL = "silero_vad-6.2.3-py3-none-any.whl"
WHEEL_SHA256 = "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8"
MEMBER = "silero_vad/data/silero_vad_16k_sequence.onnx"
MEMBER_SHA256 = "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85"
LICENSE_MEMBER = "silero_vad-6.2.3.dist-info/licenses/LICENSE"

SR, BLOCK, CONTEXT, BLOCKS = 16000, 512, 64, 32
WINDOW, HOP = BLOCK * BLOCKS, BLOCK * BLOCKS // 2  # 1024 ms windows every 512 ms


def sha256(path):
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def fetch(tmp):
    subprocess.run(
        [sys.executable, "-m", "pip", "download", f"{PACKAGE}=={VERSION}", "--no-deps", "-q", "-d", str(tmp)],
        check=True,
    )
    wheel = tmp / WHEEL
    if sha256(wheel) != WHEEL_SHA256:
        sys.exit(f"{wheel}: sha256 {sha256(wheel)} is not the pinned {WHEEL_SHA256}")
    with zipfile.ZipFile(wheel) as z:
        model = z.read(MEMBER)
        licence = z.read(LICENSE_MEMBER)
    if hashlib.sha256(model).hexdigest() != MEMBER_SHA256:
        sys.exit(f"{MEMBER}: sha256 does not match the pinned {MEMBER_SHA256}")
    (ROOT / "silero_vad_16k_sequence.onnx").write_bytes(model)
    (ROOT / "silero_vad.LICENSE").write_bytes(licence)


def derive_window_model():
    m = onnx.load(ROOT / "silero_vad_16k_sequence.onnx")
    g = m.graph
    for name in ("input", "h", "c"):
        g.input.remove(next(i for i in g.input if i.name == name))
    zeros = np.zeros((1, 1, 128), np.float32)
    g.initializer.extend(
        [
            numpy_helper.from_array(zeros, "h"),
            numpy_helper.from_array(zeros, "c"),
            numpy_helper.from_array(np.array([BLOCKS, BLOCK], np.int64), "win_blocks_shape"),
            numpy_helper.from_array(np.array([0, BLOCK - CONTEXT], np.int64), "win_ctx_starts"),
            numpy_helper.from_array(np.array([BLOCKS - 1, BLOCK], np.int64), "win_ctx_ends"),
            numpy_helper.from_array(np.array([0, 1], np.int64), "win_ctx_axes"),
            numpy_helper.from_array(np.zeros((1, CONTEXT), np.float32), "win_ctx_first"),
            numpy_helper.from_array(np.array([1, BLOCKS], np.int64), "win_probs_shape"),
        ]
    )
    g.input.insert(0, helper.make_tensor_value_info("audio", TensorProto.FLOAT, [1, WINDOW]))
    front = [
        helper.make_node("Reshape", ["audio", "win_blocks_shape"], ["win_blocks"]),
        helper.make_node("Slice", ["win_blocks", "win_ctx_starts", "win_ctx_ends", "win_ctx_axes"], ["win_ctx_rest"]),
        helper.make_node("Concat", ["win_ctx_first", "win_ctx_rest"], ["win_ctx"], axis=0),
        helper.make_node("Concat", ["win_ctx", "win_blocks"], ["input"], axis=1),
    ]
    back = [
        helper.make_node("Reshape", ["speech_probs", "win_probs_shape"], ["block_probs"]),
        helper.make_node("ReduceMax", ["block_probs"], ["speech_prob"], axes=[1], keepdims=1),
    ]
    nodes = front + list(g.node) + back
    del g.node[:]
    g.node.extend(nodes)
    del g.output[:]
    g.output.extend(
        [
            helper.make_tensor_value_info("speech_prob", TensorProto.FLOAT, [1, 1]),
            helper.make_tensor_value_info("block_probs", TensorProto.FLOAT, [1, BLOCKS]),
        ]
    )
    # The sequence model's value_info names a symbolic length; the window fixes it.
    del g.value_info[:]
    g.name = "silero_vad_window16k"
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, ROOT / "silero_vad_window16k.onnx")


def make_speech_wav(path):
    rng = np.random.default_rng(7)
    with tempfile.TemporaryDirectory() as d:
        raw = pathlib.Path(d) / "speech.wav"
        subprocess.run(
            ["espeak-ng", "-v", "en", "-s", "150", "-w", str(raw), "Turn on the kitchen light, please."], check=True
        )
        with wave.open(str(raw)) as w:
            rate, pcm = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), np.int16)
    # espeak-ng speaks at 22.05 kHz: linear resampling to 16 kHz is plenty for a VAD test signal.
    t = np.arange(int(len(pcm) * SR / rate)) * rate / SR
    speech = np.interp(t, np.arange(len(pcm)), pcm.astype(np.float64) / 32768.0)
    quiet = lambda n: 0.003 * rng.standard_normal(n)  # noqa: E731
    signal = np.concatenate([quiet(SR * 3 // 2), speech + quiet(len(speech)), quiet(SR)])
    out = np.clip(np.round(signal * 32767), -32768, 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(out.tobytes())


def read_wav(path):
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (SR, 1, 2)
        return np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768.0


def references(wav):
    y = read_wav(wav)
    out = ROOT / "ref" / "vad"
    out.mkdir(parents=True, exist_ok=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    win = ort.InferenceSession(str(ROOT / "silero_vad_window16k.onnx"), opts)
    windows = []
    for end in range(WINDOW, len(y) + 1, HOP):
        p, blocks = win.run(None, {"audio": y[end - WINDOW : end][None, :]})
        windows.append({"end_sample": end, "speech_prob": float(p[0, 0]), "block_probs": blocks[0].tolist()})
    # The sequence model over the whole WAV, blocks as silero_vad.sequence_vad builds them.
    n = len(y) // BLOCK
    frames = y[: n * BLOCK].reshape(n, BLOCK)
    ctx = np.zeros((n, CONTEXT), np.float32)
    ctx[1:] = frames[:-1, -CONTEXT:]
    blocks = np.concatenate([ctx, frames], axis=1).astype(np.float32)
    seq = ort.InferenceSession(str(ROOT / "silero_vad_16k_sequence.onnx"), opts)
    h = np.zeros((1, 1, 128), np.float32)
    probs, _, _ = seq.run(None, {"input": blocks, "h": h, "c": h})
    np.save(out / "sequence_probs.npy", probs.astype(np.float32))
    meta = {
        "wav": "samples/speech16k.wav",
        "window_samples": WINDOW,
        "hop_samples": HOP,
        "onnxruntime": ort.__version__,
        "windows": windows,
    }
    (out / "windows.json").write_text(json.dumps(meta, indent=1) + "\n")
    for w in windows:
        print(f"window ending {w['end_sample'] / SR:5.2f} s: speech_prob {w['speech_prob']:.3f}")
    print(f"sequence model: {n} blocks, mean prob {probs.mean():.3f}")


def main():
    with tempfile.TemporaryDirectory() as d:
        fetch(pathlib.Path(d))
    derive_window_model()
    wav = ROOT / "samples" / "speech16k.wav"
    if shutil.which("espeak-ng"):
        make_speech_wav(wav)
    elif not wav.exists():
        sys.exit("espeak-ng is needed to make models/samples/speech16k.wav")
    references(wav)
    for f in ("silero_vad_16k_sequence.onnx", "silero_vad_window16k.onnx"):
        print(f"{f}: {(ROOT / f).stat().st_size} bytes, sha256 {sha256(ROOT / f)}")


if __name__ == "__main__":
    main()
