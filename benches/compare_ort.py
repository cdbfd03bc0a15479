#!/usr/bin/env python3
"""Benchmark every shipped model with `edgeinfer bench` and with ONNX Runtime, interleaved.

Run from anywhere (paths are resolved from this file's location):

    cargo build --release
    python3 benches/compare_ort.py                          # all models, 3 rounds
    python3 benches/compare_ort.py --models 'digits_*' vibration_f32 --rounds 5

ONNX Runtime is used the way our users use it: the `onnxruntime` wheel from Python, with one
intra-op and one inter-op thread, ORT_ENABLE_ALL and the CPU execution provider. Each ORT
measurement runs in a fresh Python process (this script in its hidden `--ort-worker` mode), so
its peak RSS belongs to one model only, just like a fresh `edgeinfer bench` process.

The two engines are interleaved: each round benchmarks every model with both engines, and the
order of the two engines alternates between rounds. A slow drift of the machine (thermal
throttling, a build starting on the other core) then hits both engines about equally, instead
of landing on whichever engine happened to run last. The per-model figure is the median over
rounds of each round's p50, which discards one disturbed round out of three.

Start-up is measured twice for edgeinfer: cold (the ONNX file parsed and analysed, as without a
cache) and cached (with `--cache-dir`, the start-up cache that `[engine] cache_dir` enables; the
calibration pass writes each model's entry into a temporary directory, and every round then loads
from it). Start-up = init + first inference, for both engines.

This script only reports numbers. It has no absolute-time thresholds and never fails because
something is slow.

The main process uses only the standard library; numpy and onnxruntime are imported in the
worker processes only, so that they are measured there and nowhere else.
"""

import argparse
import datetime
import fnmatch
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import re
import statistics
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
MODELS_DIR = REPO / "models"

# Test fixtures in models/, not models anyone deploys. Globs and the default selection leave
# them out; naming one with --models still benchmarks it.
SKIP = {
    "unsupported_op": "an op from a made-up domain; no engine runs it",
    "corrupt": "a truncated file",
    "digits_cnn_dynamic": "digits_cnn_f32 with symbolic dims, for the shape-pinning tests; "
                          "needs --input-shape and has no reference input",
    "tree_binary_repro": "a one-stump bug repro for the TreeEnsembleClassifier label fix",
}
# Not committed (.gitignore), so it may be missing; we know how to regenerate it.
GENERATED = {"mobilenetv2_f32": ["python3", "models/make_models.py", "--only", "mobilenetv2_f32"]}

# Inputs with symbolic dimensions that are not only the batch: the shape both engines run
# (edgeinfer gets --input-shape, ORT zeros of this shape when there is no reference input).
PINNED_SHAPES = {
    "detector_yolov8n": {"images": [1, 3, 320, 320]},  # the size the detector docs and configs use
}

# Same architecture, float vs quantized, for the second table: (f32 stem, [int8 stems]).
PAIRS = [
    ("digits_cnn_f32", ["digits_cnn_int8", "digits_cnn_int8_qop"]),
    ("vibration_f32", ["vibration_int8"]),
    ("breast_cancer_mlp_f32", ["breast_cancer_mlp_dynint8"]),
    ("mobilenetv2_f32", ["mobilenetv2_int8"]),
]

# A wedged engine should cost one row, not the whole run.
SUBPROCESS_TIMEOUT_S = 900


def log(*a):
    # Progress goes to stderr so that stdout carries only the final markdown.
    print(*a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# ORT worker: runs in its own process, prints one JSON object shaped like `edgeinfer bench --json`
# --------------------------------------------------------------------------------------

def read_status_kb(field):
    """A `VmHWM` / `VmRSS` line of /proc/self/status, in kB (None off Linux)."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def percentile(sorted_xs, q):
    """Nearest rank, q in [0, 100]: the same definition as `edgeinfer bench` (src/cmd/bench.rs),
    so that a p99 over 30 runs means the same sample on both sides."""
    rank = math.ceil(q / 100.0 * len(sorted_xs))
    return sorted_xs[min(max(rank, 1), len(sorted_xs)) - 1]


def load_inputs(np, sess, ref_dir):
    """The reference inputs of models/ref/<stem>, keyed by graph input name.

    meta.json says which file feeds which input; without it, in0.npy, in1.npy, ... follow the
    graph's input order. A model without reference data gets zeros of the declared shape,
    which is good enough for timing and lets new models be benchmarked before they get refs."""
    graph_inputs = sess.get_inputs()
    meta_path = ref_dir / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        names = [i["name"] for i in meta["inputs"]]
        files = [ref_dir / f for f in meta["input_files"]]
        return {n: np.load(f) for n, f in zip(names, files)}, "ref"
    files = sorted(ref_dir.glob("in*.npy"), key=lambda p: int(p.stem[2:]) if p.stem[2:].isdigit() else 0)
    if files:
        if len(files) != len(graph_inputs):
            raise SystemExit(f"{ref_dir}: {len(files)} input files for {len(graph_inputs)} graph inputs")
        return {i.name: np.load(f) for i, f in zip(graph_inputs, files)}, "ref"
    dtypes = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8,
              "tensor(bool)": np.bool_}
    feeds = {}
    for i in graph_inputs:
        pinned = PINNED_SHAPES.get(ref_dir.name, {}).get(i.name)
        shape = pinned or [d if isinstance(d, int) else 1 for d in i.shape]  # symbolic dims: batch 1
        feeds[i.name] = np.zeros(shape, dtype=dtypes.get(i.type, np.float32))
    return feeds, "zeros"


def ort_worker(model, runs, warmup, ref_dir):
    import numpy as np
    import onnxruntime as ort

    # Interpreter + numpy + onnxruntime, before any model: the floor under ORT's peak RSS.
    rss_before_session_kb = read_status_kb("VmRSS")

    # ORT's own log lines (warnings, and errors it also raises as exceptions) would come before
    # our one-line message on stderr, and the table shows the first line. Keep only fatal ones.
    ort.set_default_logger_severity(4)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Session creation is ORT's load + optimize, the counterpart of edgeinfer's init_ms.
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(model), sess_options=so, providers=["CPUExecutionProvider"])
    init_ms = (time.perf_counter() - t0) * 1e3

    feeds, input_source = load_inputs(np, sess, ref_dir)

    def once():
        t = time.perf_counter()
        sess.run(None, feeds)
        return (time.perf_counter() - t) * 1e3

    first_ms = once()
    warm = [once() for _ in range(warmup)]
    # CPU time over wall time of the timed runs: about 1.0 if ORT really used one thread.
    cpu0, wall0 = time.process_time(), time.perf_counter()
    xs = sorted(once() for _ in range(runs))
    cpu_per_wall = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    print(json.dumps({
        "model": model.name,
        "path": str(model),
        "runs": runs,
        "warmup": warmup,
        "init_ms": init_ms,
        "first_inference_ms": first_ms,
        "warmup_mean_ms": statistics.fmean(warm) if warm else None,
        "p50_ms": percentile(xs, 50),
        "p90_ms": percentile(xs, 90),
        "p99_ms": percentile(xs, 99),
        "mean_ms": statistics.fmean(xs),
        "min_ms": xs[0],
        "peak_rss_kb": read_status_kb("VmHWM"),
        "startup_ms": init_ms + first_ms,
        "threads": 1,
        "cpu_per_wall": cpu_per_wall,
        "rss_before_session_kb": rss_before_session_kb,
        "inputs": input_source,
        "ort_version": ort.__version__,
    }))


# --------------------------------------------------------------------------------------
# driver: run one measurement of either engine in a child process
# --------------------------------------------------------------------------------------

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def first_line(text):
    # Loggers colour their lines; escape codes would end up in the markdown.
    for line in ANSI_ESCAPE.sub("", text).splitlines():
        if line.strip():
            return line.strip()
    return ""


def run_json(cmd, env=None):
    """Runs a child that prints one JSON object.

    Returns (dict, None, None) or (None, one-line error, full stderr for the JSON report)."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {SUBPROCESS_TIMEOUT_S} s", None
    except OSError as e:
        return None, str(e), None
    if p.returncode != 0:
        return None, first_line(p.stderr) or f"exit status {p.returncode}", p.stderr[-4000:]
    try:
        return json.loads(p.stdout), None, None
    except json.JSONDecodeError:
        # Tolerate a stray line before the JSON (e.g. a log line on stdout): take the last line.
        try:
            return json.loads(p.stdout.strip().splitlines()[-1]), None, None
        except (json.JSONDecodeError, IndexError):
            return None, "no JSON on stdout: " + (first_line(p.stdout) or "(empty)"), p.stderr[-4000:]


def bench_edgeinfer(exe, model, runs, warmup, cache_dir=None):
    cmd = [str(exe), "bench", str(model), "--runs", str(runs), "--warmup", str(warmup), "--json"]
    for name, dims in PINNED_SHAPES.get(model.stem, {}).items():
        cmd += ["--input-shape", f"{name}={','.join(map(str, dims))}"]
    if cache_dir is not None:
        cmd += ["--cache-dir", str(cache_dir)]
    return run_json(cmd)


def bench_ort(model, runs, warmup):
    env = dict(os.environ)
    # onnxruntime has its own pool (set to 1 thread in the worker); this keeps numpy's BLAS,
    # loaded by the same process, from starting threads of its own.
    for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[v] = "1"
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--ort-worker", str(model),
           "--runs", str(runs), "--warmup", str(warmup),
           "--ref-dir", str(model.parent / "ref" / model.stem)]
    return run_json(cmd, env=env)


# --------------------------------------------------------------------------------------
# model selection
# --------------------------------------------------------------------------------------

def select_models(patterns):
    """Stems of the models to benchmark, in a stable order.

    Without patterns: every models/*.onnx except the SKIP fixtures, plus the GENERATED ones even
    when missing. A pattern is a glob over stems ('digits_*'), a stem, or a path to a .onnx.
    Globs leave out the SKIP fixtures; naming one explicitly benchmarks it anyway."""
    on_disk = sorted(p.stem for p in MODELS_DIR.glob("*.onnx"))
    known = sorted(set(on_disk) | set(GENERATED))
    if not patterns:
        return [s for s in known if s not in SKIP], {}
    chosen, paths = [], {}
    for raw in patterns:
        for pat in filter(None, (x.strip() for x in raw.split(","))):
            if pat.endswith(".onnx") and pathlib.Path(pat).exists():
                path = pathlib.Path(pat).resolve()
                paths[path.stem] = path
                hits = [path.stem]
            elif any(c in pat for c in "*?["):
                hits = [s for s in known if fnmatch.fnmatchcase(s, pat.removesuffix(".onnx")) and s not in SKIP]
            else:
                hits = [pat.removesuffix(".onnx")]
            if not hits:
                log(f"warning: --models {pat!r} matches no model in {MODELS_DIR}")
            chosen += [h for h in hits if h not in chosen]
    return chosen, paths


def ensure_model(stem, path):
    """True if the model file exists, regenerating it first if we know how."""
    if path.exists():
        return True
    if stem in GENERATED and path.parent == MODELS_DIR:
        log(f"{path.name} is missing; generating it: {' '.join(GENERATED[stem])}")
        cmd = [sys.executable] + GENERATED[stem][1:]
        p = subprocess.run(cmd, cwd=REPO, stdout=sys.stderr, stderr=sys.stderr)
        if p.returncode == 0 and path.exists():
            return True
        log(f"warning: could not generate {path.name} (needs `pip install -r models/requirements.txt`); skipping it")
        return False
    log(f"warning: {path} does not exist; skipping it")
    return False


# --------------------------------------------------------------------------------------
# measurement plan
# --------------------------------------------------------------------------------------

def plan_runs(est_ms, args):
    """Timed runs for one model: about --budget seconds per engine and round, within
    [--min-runs, --runs]. Fast models get the full --runs; slow ones get fewer, so a round
    stays short and the rounds, not the runs, average out the noise."""
    hi = args.runs
    lo = min(args.min_runs, hi)
    n = hi if not est_ms or est_ms <= 0 else int(args.budget * 1e3 / est_ms)
    runs = max(lo, min(hi, n))
    # Warm-up in proportion, so a slow model does not spend most of its budget warming up.
    warmup = min(args.warmup, max(3, runs // 10))
    return runs, warmup


def summarize(results):
    """Median over rounds of p50 and init, max of peak RSS; only over the successful rounds."""
    ok = [r for r in results if r.get("ok")]
    if not ok:
        return None

    def med(key):
        xs = [r["ok"][key] for r in ok if r["ok"].get(key) is not None]
        return statistics.median(xs) if xs else None

    rss = [r["ok"]["peak_rss_kb"] for r in ok if r["ok"].get("peak_rss_kb") is not None]
    return {
        "p50_ms": med("p50_ms"),
        "p90_ms": med("p90_ms"),
        "p99_ms": med("p99_ms"),
        "mean_ms": med("mean_ms"),
        "min_ms": min((r["ok"]["min_ms"] for r in ok if r["ok"].get("min_ms") is not None), default=None),
        "init_ms": med("init_ms"),
        "first_inference_ms": med("first_inference_ms"),
        "startup_ms": med("startup_ms"),
        "peak_rss_kb": max(rss) if rss else None,
        "rounds_ok": len(ok),
        "rounds": len(results),
    }


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------

def quant_of(stem):
    return "int8" if "int8" in stem else "f32"


def fmt_ms(x):
    if x is None:
        return "n/a"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def fmt_mb(kb):
    return "n/a" if kb is None else f"{kb / 1024:.1f}"


def fmt_ratio(a, b):
    return "n/a" if a is None or not b else f"{a / b:.2f}"


def machine_info():
    cpu = None
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":")[0].strip()
            # x86 says "model name"; many ARM kernels only say "Hardware" or "Model".
            if key in ("model name", "Hardware", "Model") and ":" in line:
                cpu = line.split(":", 1)[1].strip()
                if key == "model name":
                    break
    except OSError:
        pass
    try:
        nproc = len(os.sched_getaffinity(0))  # what `nproc` prints
    except AttributeError:
        nproc = os.cpu_count()
    try:
        load = " ".join(pathlib.Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = None
    return {"cpu": cpu or platform.processor() or platform.machine(), "nproc": nproc,
            "os": f"{platform.system()} {platform.release()} {platform.machine()}",
            "loadavg_at_start": load}


def edgeinfer_version(exe):
    try:
        p = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
        return first_line(p.stdout) or first_line(p.stderr) or f"exit status {p.returncode}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"


def md_cell(text):
    # Error messages end up in table cells: keep them on one line and from splitting columns.
    return text.replace("|", "\\|").replace("\n", " ")


def cell_p50(s, err):
    if s is None:
        if not err:
            return "n/a"
        # Rust's anyhow prints "Error: ..."; don't show "error: Error: ...".
        for prefix in ("error:", "Error:", "ERROR:"):
            err = err.removeprefix(prefix).strip()
        return md_cell(f"error: {err}")
    cell = fmt_ms(s["p50_ms"])
    if s["rounds_ok"] < s["rounds"]:
        cell += f" ({s['rounds_ok']}/{s['rounds']} rounds)"
    return cell


def cached_cell(r, key):
    c = r["cached"]["summary"]
    if c is None:
        return md_cell(f"n/a: {r['cached']['error']}") if r["cached"]["error"] else "n/a"
    return fmt_ms(c[key])


def markdown(report):
    m, st = report["meta"], report["settings"]
    out = ["# edgeinfer vs ONNX Runtime, single thread", ""]
    out.append(f"- date: {m['date']}")
    out.append(f"- machine: {m['machine']['cpu']}, nproc {m['machine']['nproc']}, {m['machine']['os']}, "
               f"load average at start {m['machine']['loadavg_at_start']}")
    out.append(f"- ONNX Runtime {m['ort_version']} (Python {m['python']}, CPUExecutionProvider, "
               "intra_op_num_threads=1, inter_op_num_threads=1, ORT_ENABLE_ALL)")
    out.append(f"- edgeinfer: {m['edgeinfer_version']} (`{m['edgeinfer']}`)")
    out.append(f"- method: {st['rounds']} interleaved rounds, engine order alternating; timed runs per "
               f"model = clamp({st['budget_s']:g} s / estimated inference time, {st['min_runs']}, {st['runs']}); "
               "p50 and init = median over rounds, peak RSS = max over rounds; each measurement in a fresh process")
    if report["skipped"]:
        out.append("- not benchmarked (test fixtures): " + "; ".join(f"{s} ({why})" for s, why in report["skipped"].items()))
    out.append("")
    out.append("| model | quant | edgeinfer p50 ms | ORT p50 ms | ratio edgeinfer/ORT | edgeinfer init ms "
               "| edgeinfer cached init ms | ORT init ms | edgeinfer peak RSS MB | ORT peak RSS MB |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for stem, r in report["models"].items():
        e, o = r["edgeinfer"]["summary"], r["ort"]["summary"]
        ep = e["p50_ms"] if e else None
        op = o["p50_ms"] if o else None
        out.append("| " + " | ".join([
            stem, r["quant"],
            cell_p50(e, r["edgeinfer"]["error"]), cell_p50(o, r["ort"]["error"]),
            fmt_ratio(ep, op),
            fmt_ms(e["init_ms"]) if e else "n/a", cached_cell(r, "init_ms"),
            fmt_ms(o["init_ms"]) if o else "n/a",
            fmt_mb(e["peak_rss_kb"]) if e else "n/a", fmt_mb(o["peak_rss_kb"]) if o else "n/a",
        ]) + " |")
    out.append("")
    runs = [r["runs"] for r in report["models"].values()]
    usual = statistics.mode(runs)
    others = [f"{s} {r['runs']}" for s, r in report["models"].items() if r["runs"] != usual]
    out.append("Ratio above 1: edgeinfer is slower than ORT. init = load + optimize (ORT: `InferenceSession` "
               "creation). Inputs: ORT gets `models/ref/<model>/in*.npy`; `edgeinfer bench` makes its own "
               "deterministic inputs in [0, 1); a tree ensemble's latency can depend on the values, a "
               "network's hardly does."
               f" Timed runs per round: {usual}" + (f", except {', '.join(others)}" if others else "")
               + ", the same for both engines.")
    base = [r["ort"]["rss_before_session_kb"] for r in report["models"].values() if r["ort"]["rss_before_session_kb"]]
    if base:
        out.append(f"ORT peak RSS includes the Python interpreter, numpy and onnxruntime: about "
                   f"{fmt_mb(statistics.median(base))} MB before any session exists.")
    out.append("")

    out.append("## Start-up: load to first inference")
    out.append("")
    out.append("| model | edgeinfer cold ms | edgeinfer cached ms | cached/cold | ORT ms |")
    out.append("|---|---:|---:|---:|---:|")
    for stem, r in report["models"].items():
        e, o, c = r["edgeinfer"]["summary"], r["ort"]["summary"], r["cached"]["summary"]
        cold = e["startup_ms"] if e else None
        cached = c["startup_ms"] if c else None
        out.append("| " + " | ".join([
            stem, fmt_ms(cold), cached_cell(r, "startup_ms"), fmt_ratio(cached, cold),
            fmt_ms(o["startup_ms"]) if o and o.get("startup_ms") is not None else "n/a",
        ]) + " |")
    out.append("")
    out.append("Start-up = init + first inference, medians over rounds, each in a fresh process. Cold: the "
               "ONNX file is parsed and analysed. Cached: `edgeinfer bench --cache-dir DIR` with the entry "
               "already written (`[engine] cache_dir` in the daemon). A model whose graph cannot be cached "
               "shows why.")
    out.append("")
    out.append("## int8 vs float32 in edgeinfer, same architecture")
    out.append("")
    out.append("| f32 model | int8 model | edgeinfer int8/f32 | ORT int8/f32 |")
    out.append("|---|---|---:|---:|")
    for row in report["pairs"]:
        out.append(f"| {row['f32']} | {row['int8']} | {fmt_ratio(row['edgeinfer_int8_ms'], row['edgeinfer_f32_ms'])} "
                   f"| {fmt_ratio(row['ort_int8_ms'], row['ort_f32_ms'])} |")
    if not report["pairs"]:
        out.append("| (no pair among the selected models) | | | |")
    out.append("")
    out.append("Ratio of p50 latencies; below 1: the int8 model is faster than its float32 original.")
    return "\n".join(out) + "\n"


def pair_rows(report):
    rows = []
    models = report["models"]

    def p50(stem, engine):
        s = models.get(stem, {}).get(engine, {}).get("summary")
        return s["p50_ms"] if s else None

    for f32, int8s in PAIRS:
        for q in int8s:
            if f32 in models and q in models:
                rows.append({"f32": f32, "int8": q,
                             "edgeinfer_f32_ms": p50(f32, "edgeinfer"), "edgeinfer_int8_ms": p50(q, "edgeinfer"),
                             "ort_f32_ms": p50(f32, "ort"), "ort_int8_ms": p50(q, "ort")})
    return rows


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------

def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", metavar="GLOB_OR_STEM",
                    help="globs over model stems ('digits_*'), stems, or .onnx paths; commas also separate "
                         "(default: every models/*.onnx except the test fixtures: " + ", ".join(sorted(SKIP)) + ")")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--runs", type=int, default=100, help="maximum timed runs per model and round (default 100)")
    ap.add_argument("--min-runs", type=int, default=20, help="minimum timed runs for slow models (default 20)")
    ap.add_argument("--budget", type=float, default=2.0,
                    help="target seconds of timed runs per model, engine and round (default 2)")
    ap.add_argument("--warmup", type=int, default=10, help="maximum warm-up runs (default 10)")
    ap.add_argument("--out", type=pathlib.Path, default=REPO / "benches" / "results.md",
                    help="markdown output; the raw figures go next to it as .json (default benches/results.md)")
    ap.add_argument("--edgeinfer", type=pathlib.Path,
                    default=pathlib.Path(os.environ.get("EDGEINFER", REPO / "target" / "release" / "edgeinfer")),
                    help="edgeinfer binary (default $EDGEINFER or target/release/edgeinfer)")
    # Hidden: the child process that measures ORT for one model.
    ap.add_argument("--ort-worker", type=pathlib.Path, help=argparse.SUPPRESS)
    ap.add_argument("--ref-dir", type=pathlib.Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rounds < 1 or args.runs < 1 or args.min_runs < 1 or args.warmup < 0 or args.budget <= 0:
        ap.error("--rounds, --runs and --min-runs must be >= 1, --warmup >= 0, --budget > 0")
    return args


def main():
    args = parse_args()
    if args.ort_worker:
        try:
            ort_worker(args.ort_worker, args.runs, args.warmup, args.ref_dir)
        except Exception as e:  # noqa: BLE001 - any failure becomes one line in the table
            # The parent shows the first stderr line; a traceback's first line says nothing.
            msg = " ".join(str(e).split())
            sys.exit(f"{type(e).__name__}: {msg}"[:300])
        return

    exe = args.edgeinfer.resolve()
    if not exe.is_file():
        sys.exit(f"edgeinfer binary not found at {exe}; build it with `cargo build --release` "
                 "or pass --edgeinfer PATH / set EDGEINFER")
    try:
        ort_version = importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:
        sys.exit("onnxruntime is not installed: pip install -r models/requirements.txt")

    stems, explicit_paths = select_models(args.models)
    models = {}
    for s in stems:
        path = explicit_paths.get(s, MODELS_DIR / f"{s}.onnx")
        if ensure_model(s, path):
            models[s] = path
    if not models:
        sys.exit("no model to benchmark")

    report = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine_info(),
            "python": platform.python_version(),
            "ort_version": ort_version,
            "edgeinfer": str(exe),
            "edgeinfer_version": edgeinfer_version(exe),
        },
        # Fixtures on disk that the selection left out, so the reader knows they were not forgotten.
        "skipped": {s: SKIP[s] for s in sorted(SKIP) if s not in models and (MODELS_DIR / f"{s}.onnx").exists()},
        "settings": {"rounds": args.rounds, "runs": args.runs, "min_runs": args.min_runs,
                     "budget_s": args.budget, "warmup": args.warmup},
        "models": {},
    }
    log(f"edgeinfer: {report['meta']['edgeinfer_version']} ({exe}); onnxruntime {ort_version}; "
        f"{len(models)} models, {args.rounds} rounds")

    # The start-up cache for the "cached" measurements; calibration fills it.
    cache_dir = pathlib.Path(tempfile.mkdtemp(prefix="edgeinfer-bench-cache-"))

    # Calibration: a few runs of each engine estimate the inference time, which sets the number
    # of timed runs. It also finds models edgeinfer cannot load at all, once, instead of
    # failing the same way every round. Its figures are kept in the JSON but not reported.
    for stem, path in models.items():
        e, e_err, e_stderr = bench_edgeinfer(exe, path, 5, 2, cache_dir)
        o, o_err, o_stderr = bench_ort(path, 5, 2)
        # Only a model whose entry was written can be measured cached.
        c_err = None
        if e and not (e.get("cache") or "").startswith("miss; written"):
            c_err = e.get("cache") or "no cache entry written"
        est = max([x["p50_ms"] for x in (e, o) if x and x.get("p50_ms") is not None], default=None)
        runs, warmup = plan_runs(est, args)
        log(f"calibrate {stem:28s} est {fmt_ms(est)} ms -> {runs} runs, {warmup} warm-up"
            + (f"  [edgeinfer error: {e_err}]" if e_err else "") + (f"  [ORT error: {o_err}]" if o_err else ""))
        report["models"][stem] = {
            "path": str(path), "quant": quant_of(stem), "runs": runs, "warmup": warmup,
            "calibration": {"est_ms": est, "edgeinfer": e, "ort": o},
            "edgeinfer": {"error": e_err, "stderr": e_stderr, "rounds": [], "summary": None},
            "ort": {"error": o_err, "stderr": o_stderr, "rounds": [], "summary": None,
                    "rss_before_session_kb": None},
            "cached": {"error": e_err or c_err, "rounds": [], "summary": None},
        }

    for rnd in range(args.rounds):
        # Alternate which engine goes first, so neither always runs on a cache/turbo state
        # left behind by the other.
        order = ["edgeinfer", "ort"] if rnd % 2 == 0 else ["ort", "edgeinfer"]
        for stem, path in models.items():
            r = report["models"][stem]
            for engine in order:
                side = r[engine]
                if side["error"] and not side["rounds"]:
                    continue  # failed in calibration: a deterministic failure, don't repeat it
                if engine == "edgeinfer":
                    res, err, stderr = bench_edgeinfer(exe, path, r["runs"], r["warmup"])
                else:
                    res, err, stderr = bench_ort(path, r["runs"], r["warmup"])
                side["rounds"].append({"ok": res, "error": err, "stderr": stderr})
                if err:
                    side["error"] = err
                log(f"round {rnd + 1}/{args.rounds} {stem:28s} {engine:9s} "
                    + (f"p50 {fmt_ms(res['p50_ms'])} ms" if res else f"error: {err}"))
            # Cached start-up right after, in a fresh process: only init and the first run matter.
            cached = r["cached"]
            if not cached["error"]:
                res, err, _ = bench_edgeinfer(exe, path, 1, 0, cache_dir)
                if res and res.get("origin") != "cache":
                    res, err = None, f"not loaded from the cache: {res.get('cache')}"
                cached["rounds"].append({"ok": res, "error": err})
                if err:
                    cached["error"] = err
                else:
                    log(f"round {rnd + 1}/{args.rounds} {stem:28s} cached    start-up {fmt_ms(res['startup_ms'])} ms")

    shutil.rmtree(cache_dir, ignore_errors=True)
    for r in report["models"].values():
        for engine in ("edgeinfer", "ort", "cached"):
            r[engine]["summary"] = summarize(r[engine]["rounds"])
        base = [x["ok"]["rss_before_session_kb"] for x in r["ort"]["rounds"]
                if x["ok"] and x["ok"].get("rss_before_session_kb")]
        r["ort"]["rss_before_session_kb"] = statistics.median(base) if base else None
    report["pairs"] = pair_rows(report)

    md = markdown(report)
    print(md, end="")
    out_md = args.out
    out_json = out_md.with_suffix(".json")
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(md)
    out_json.write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {out_md} and {out_json}")


if __name__ == "__main__":
    main()
