#!/usr/bin/env python3
"""Reference log-mel features for edgeinfer's `audio` preprocessing, computed with librosa.

Run from the repository root:

    pip install -r models/requirements-audio.txt     # librosa==0.11.0 and its pinned helpers
    python3 models/make_audio_ref.py

Writes:
  models/samples/chirp16k.wav        1 s, 16 kHz, mono, 16-bit: a 100 Hz -> 7 kHz chirp,
                                     a steady 1 kHz tone and seeded white noise
  models/ref/logmel/cases.json       each case: its edgeinfer `preprocess` keys, the librosa
                                     call that matches them, and the feature shape
  models/ref/logmel/<case>.npy       float32 [n_mels, frames] (librosa's order)

The test `tests/it/audio.rs` reads the same WAV and cases.json, computes the features in
Rust and compares. Deterministic: a fixed seed, and the WAV is what both sides read.
"""

import json
import pathlib
import wave

import librosa
import numpy as np
import soundfile as sf

ROOT = pathlib.Path(__file__).resolve().parent
SR = 16000

# Each case: edgeinfer keys (as in a config's `preprocess` table); the librosa call follows from them.
CASES = [
    # The keyword-spotting default: 25 ms frames every 10 ms, 40 Slaney mels, dB, no centring (98 frames).
    ("kws_default_db", {"window_ms": 1000, "features": "log_mel"}),
    # librosa's own framing (center=True, zero padding), 64 mels between 20 Hz and 7.6 kHz.
    (
        "center_64mels_db",
        {"window_ms": 1000, "features": "log_mel", "center": True, "n_mels": 64, "fmin_hz": 20, "fmax_hz": 7600},
    ),
    # torchaudio-style filters (HTK scale, no area normalisation), natural log, 30 ms / 20 ms in samples.
    (
        "htk_ln_30ms",
        {
            "window_ms": 1000,
            "features": "log_mel",
            "frame_samples": 480,
            "frame_hop_samples": 320,
            "mel_scale": "htk",
            "mel_norm": "none",
            "log": "ln",
        },
    ),
    # An n_fft above the next power of two of the frame (512), 80 mels, half-second windows.
    (
        "nfft1024_80mels_db",
        {"window_ms": 500, "features": "log_mel", "frame_ms": 32, "frame_hop_ms": 16, "n_fft": 1024, "n_mels": 80},
    ),
]


def test_signal():
    rng = np.random.default_rng(20260101)
    t = np.arange(SR) / SR
    f0, f1 = 100.0, 7000.0
    chirp = 0.3 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) / 2 * t**2))
    tone = 0.2 * np.sin(2 * np.pi * 1000.0 * t)
    noise = 0.02 * rng.standard_normal(SR)
    return np.clip(np.round((chirp + tone + noise) * 32767), -32768, 32767).astype(np.int16)


def write_wav(path, pcm):
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(pcm.tobytes())


def reference(y, keys):
    """The librosa call that edgeinfer's keys describe."""
    frame = keys.get("frame_samples") or round(keys.get("frame_ms", 25) * SR / 1000)
    hop = keys.get("frame_hop_samples") or round(keys.get("frame_hop_ms", 10) * SR / 1000)
    n_fft = keys.get("n_fft") or 1 << (frame - 1).bit_length()
    center = keys.get("center", False)
    window = round(keys["window_ms"] * SR / 1000)
    y = y[-window:]
    if not center:
        # librosa puts the frame-long window in the middle of each n_fft frame; edgeinfer's
        # frames start at t * hop. Padding (n_fft - frame) / 2 zeros in front lines them up.
        lpad = (n_fft - frame) // 2
        y = np.pad(y, (lpad, n_fft - frame - lpad))
    S = librosa.feature.melspectrogram(
        y=y,
        sr=SR,
        n_fft=n_fft,
        hop_length=hop,
        win_length=frame,
        window="hann",
        center=center,
        pad_mode="constant",
        power=2.0,
        n_mels=keys.get("n_mels", 40),
        fmin=keys.get("fmin_hz", 0.0),
        fmax=keys.get("fmax_hz", SR / 2),
        htk=keys.get("mel_scale", "slaney") == "htk",
        norm="slaney" if keys.get("mel_norm", "slaney") == "slaney" else None,
    )
    if keys.get("log", "db") == "db":
        out = librosa.power_to_db(S, ref=1.0, amin=keys.get("log_floor", 1e-10), top_db=None)
        call = "power_to_db(S, ref=1.0, amin=1e-10, top_db=None)"
    else:
        out = np.log(S + keys.get("log_floor", 1e-6))
        call = "np.log(S + 1e-6)"
    desc = (
        f"melspectrogram(n_fft={n_fft}, hop_length={hop}, win_length={frame}, center={center}, "
        f"pad_mode='constant', htk={keys.get('mel_scale') == 'htk'}, "
        f"norm={'None' if keys.get('mel_norm') == 'none' else repr('slaney')}) -> {call}"
    )
    return out.astype(np.float32), desc


def main():
    pcm = test_signal()
    wav = ROOT / "samples" / "chirp16k.wav"
    write_wav(wav, pcm)
    y, sr = sf.read(wav, dtype="float32")  # int16 / 32768, what edgeinfer's s16le reader gives
    assert sr == SR
    out_dir = ROOT / "ref" / "logmel"
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = []
    for name, keys in CASES:
        feats, desc = reference(y, keys)
        np.save(out_dir / f"{name}.npy", feats)
        cases.append({"name": name, "preprocess": keys, "librosa": desc, "shape": list(feats.shape)})
        print(f"{name}: {feats.shape} [n_mels, frames], range {feats.min():.2f} .. {feats.max():.2f}")
    meta = {
        "wav": "samples/chirp16k.wav",
        "sample_rate": SR,
        "librosa": librosa.__version__,
        "numpy": np.__version__,
        "layout": "[n_mels, frames]",
        "cases": cases,
    }
    (out_dir / "cases.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
