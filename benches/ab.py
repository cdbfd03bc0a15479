#!/usr/bin/env python3
"""Paired A/B measurements with `edgeinfer bench`, for changes too small for
the noise between runs on a shared machine.

Each round runs both sides back to back, the first side alternating between
rounds, and the figure kept is the median over rounds of the per-round ratio
B/A: a load change on the machine then hits both sides about equally.

  # two builds of edgeinfer on the same models, each from its own start-up cache
  python3 benches/ab.py binaries OLD_BIN NEW_BIN --models mobilenetv2_int8,digits_cnn_int8

  # one build, two models (or a model with and without a flag)
  python3 benches/ab.py models BIN mobilenetv2_f32:mobilenetv2_int8 \\
      mobilenetv2_int8:mobilenetv2_int8+qdq-as-float

A model is a stem in models/; `+flag` adds `--flag` to its bench command.
"""

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent
# RUST_BACKTRACE makes anyhow capture backtraces inside tract's optimiser.
ENV = {k: v for k, v in os.environ.items() if k != "RUST_BACKTRACE"}


def runs_for(stem, small_runs):
    return 30 if ("mobilenet" in stem or "yolo" in stem) else small_runs


def bench(binary, spec, small_runs, cache=None):
    stem, *flags = spec.split("+")
    model = REPO / "models" / f"{stem}.onnx"
    if not model.exists():
        sys.exit(f"no model {model}")
    args = [str(binary), "bench", str(model), "--runs", str(runs_for(stem, small_runs)), "--json"]
    args += [f"--{f}" for f in flags]
    if cache:
        args += ["--cache-dir", str(cache)]
    p = subprocess.run(args, capture_output=True, text=True, env=ENV)
    if p.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{p.stderr}")
    return json.loads(p.stdout)


def summary(label, ratios):
    return (f"{label}: median {statistics.median(ratios):.3f} "
            f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {len(ratios)} rounds)")


def paired(rounds, run_a, run_b):
    pairs = []
    for r in range(rounds):
        if r % 2 == 0:
            a = run_a()
            b = run_b()
        else:
            b = run_b()
            a = run_a()
        pairs.append((a, b))
    return pairs


def binaries(args):
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="edgeinfer-ab-"))
    try:
        caches = {"a": tmp / "a", "b": tmp / "b"}
        print(f"A = {args.a}\nB = {args.b}\nmedian over rounds of B/A; each binary reads its own start-up cache")
        for stem in args.models.split(","):
            # The first run of each writes its cache entry; it is not counted.
            bench(args.a, stem, args.small_runs, caches["a"])
            bench(args.b, stem, args.small_runs, caches["b"])
            pairs = paired(args.rounds,
                           lambda: bench(args.a, stem, args.small_runs, caches["a"]),
                           lambda: bench(args.b, stem, args.small_runs, caches["b"]))
            p50 = [b["p50_ms"] / a["p50_ms"] for a, b in pairs]
            start = [b["startup_ms"] / a["startup_ms"] for a, b in pairs]
            print(summary(f"{stem} p50 B/A", p50))
            print(summary(f"{stem} cached start-up B/A", start))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def models(args):
    print(f"binary = {args.binary}\nmedian over rounds of the p50 ratio second/first")
    for pair in args.pairs:
        if ":" not in pair:
            sys.exit(f"`{pair}`: give pairs as FIRST:SECOND")
        first, second = pair.split(":", 1)
        pairs = paired(args.rounds,
                       lambda: bench(args.binary, first, args.small_runs)["p50_ms"],
                       lambda: bench(args.binary, second, args.small_runs)["p50_ms"])
        ratios = [b / a for a, b in pairs]
        med_a = statistics.median(a for a, _ in pairs)
        med_b = statistics.median(b for _, b in pairs)
        print(summary(f"{second} / {first} (p50 {med_b:.3f} / {med_a:.3f} ms)", ratios))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=11, help="paired rounds (default 11)")
    ap.add_argument("--small-runs", type=int, default=3000,
                    help="timed runs per sample for models other than MobileNetV2/YOLO, which get 30 (default 3000)")
    sub = ap.add_subparsers(dest="mode", required=True)
    b = sub.add_parser("binaries", help="two edgeinfer builds, same models")
    b.add_argument("a", type=pathlib.Path)
    b.add_argument("b", type=pathlib.Path)
    b.add_argument("--models", required=True, help="comma-separated model stems")
    m = sub.add_parser("models", help="one build, pairs of models")
    m.add_argument("binary", type=pathlib.Path)
    m.add_argument("pairs", nargs="+", help="FIRST:SECOND model stems, each optionally +flag")
    args = ap.parse_args()
    binaries(args) if args.mode == "binaries" else models(args)


if __name__ == "__main__":
    main()
