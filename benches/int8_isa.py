#!/usr/bin/env python3
"""Int8 on every instruction set edgeinfer has kernels for, against ONNX Runtime on the same CPU.

One command, two parts, one markdown report (default benches/int8_isa.md, raw figures beside it
as .json):

* ARM, as a cost proxy: instructions per inference under qemu for edgeinfer's aarch64 binary
  and ONNX Runtime's aarch64 wheel on an emulated Cortex-A72 (Pi 4: the `neon` rung) and
  Cortex-A76 (Pi 5: `dotprod`), through the shared harness `../shared/armcost/measure.py`
  (set it up once as its README says). Instructions are not time: no caches, no pipeline.
* armv7 (32-bit Raspberry Pi OS), the same proxy: instructions per inference of edgeinfer's
  armv7 binary under a plugin-enabled `qemu-arm -cpu cortex-a7` (`benches/qemu-arm.sh` builds
  it once from armcost's qemu source), int8 on its default rung, int8 capped to `scalar`
  (tract's float kernels: what 32-bit boards ran before the `neon` rung) and float. ONNX
  Runtime ships no armv7 wheel, so this part compares edgeinfer with itself.
* x86, timed on this machine: `edgeinfer bench` capped at each rung this CPU has
  (EDGEINFER_ISA=scalar, avx2, avxvnni, avx512; `scalar` is tract's float kernels) and ONNX
  Runtime (one thread, whatever kernels it picks here), interleaved in rounds, medians of p50.

Each table gives edgeinfer / ONNX Runtime and int8 / own float, per model and CPU.

    cargo build --release                                         # x86 binary
    cargo build --release --target aarch64-unknown-linux-gnu      # aarch64 binary (ARM part)
    cargo build --release --target armv7-unknown-linux-gnueabihf  # armv7 binary (armv7 part)
    python3 benches/int8_isa.py                                   # both parts, ~25 min
    python3 benches/int8_isa.py --skip-arm --rounds 5             # x86 only
    python3 benches/int8_isa.py --skip-arm --skip-x86             # armv7 only (~3 min)
    python3 benches/int8_isa.py --models dynint8                  # the pairs whose int8 stem has "dynint8"

It reports; it asserts nothing about speed.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benches"))
import compare_ort  # noqa: E402  (run_json, bench_ort, machine_info)

PAIRS = [("mobilenetv2_int8", "mobilenetv2_f32"), ("digits_cnn_int8", "digits_cnn_f32"),
         ("vibration_int8", "vibration_f32"), ("dw5x5_cnn_int8", "dw5x5_cnn_f32"),
         ("frames_mlp_int8", "frames_mlp_f32"),
         # onnxruntime's quantize_dynamic (DynamicQuantizeLinear -> ConvInteger / MatMulInteger)
         ("mobilenetv2_dynint8", "mobilenetv2_f32"), ("digits_cnn_dynint8", "digits_cnn_f32")]
RUNS = {"mobilenetv2": 30, "digits": 300, "vibration": 1000, "dw5x5": 200, "frames": 1000}
ARM_CPUS = {"cortex-a72": "Pi 4", "cortex-a76": "Pi 5"}


def runs_for(stem):
    return next((n for k, n in RUNS.items() if stem.startswith(k)), 100)


def model_path(stem):
    p = REPO / "models" / f"{stem}.onnx"
    if not p.exists():
        compare_ort.ensure_model(stem, p)
    return p


def x86_rungs(exe):
    """The rungs this CPU has: the cap that `inspect --json` reports back unchanged."""
    rungs = []
    for name in ["scalar", "avx2", "avxvnni", "avx512"]:
        env = dict(os.environ, EDGEINFER_ISA=name, RUST_LOG="error")
        v, err, _ = compare_ort.run_json([str(exe), "inspect", str(model_path("vibration_int8")), "--json"], env)
        if v and v.get("isa") == name:
            rungs.append(name)
    return rungs


def x86_part(exe, rounds):
    rungs = x86_rungs(exe)
    stems = list(dict.fromkeys(s for pair in PAIRS for s in pair))
    p50 = {}  # (stem, engine) -> [per-round p50]
    for r in range(rounds):
        order = [("ort", None)] + [("edgeinfer", rung) for rung in rungs]
        if r % 2:
            order.reverse()
        for stem in stems:
            model = model_path(stem)
            n = runs_for(stem)
            for engine, rung in order:
                if engine == "ort":
                    v, err, _ = compare_ort.bench_ort(model, n, 5)
                    key = (stem, "ort")
                else:
                    env = dict(os.environ, EDGEINFER_ISA=rung, RUST_LOG="error")
                    cmd = [str(exe), "bench", str(model), "--runs", str(n), "--warmup", "5", "--json"]
                    v, err, _ = compare_ort.run_json(cmd, env)
                    key = (stem, rung)
                if v is None:
                    print(f"  {key}: {err}", file=sys.stderr)
                    continue
                p50.setdefault(key, []).append(v["p50_ms"])
            print(f"round {r + 1}/{rounds}: {stem} done", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in p50.items()}
    return {"rungs": rungs, "p50_ms": {f"{s}|{e}": v for (s, e), v in med.items()}, "rounds": rounds}


def arm_part(armcost, bin_a64, out_json):
    models = ",".join(dict.fromkeys(s for pair in PAIRS for s in pair))
    env = dict(os.environ, EDGEINFER_A64=str(bin_a64))
    subprocess.run([sys.executable, str(armcost / "measure.py"), "--cpus", ",".join(ARM_CPUS),
                    "--models", models, "--out", str(out_json)], check=True, env=env, cwd=REPO)
    raw = json.loads(out_json.read_text())
    insns = {f"{r['cpu']}|{r['model']}|{r['engine']}": r["pi"]["insns"] for r in raw["per_inference"]}
    isa = {}
    qemu = pathlib.Path(os.environ.get("ARMCOST", "/tmp/armcost")) / "qemu" / "bin" / "qemu-aarch64"
    for cpu in ARM_CPUS:
        cmd = [str(qemu), "-cpu", cpu, "-L", "/usr/aarch64-linux-gnu", str(bin_a64), "inspect",
               str(model_path("vibration_int8")), "--json"]
        v, err, _ = compare_ort.run_json(cmd, dict(os.environ, RUST_LOG="error"))
        isa[cpu] = v["isa"] if v else f"? ({err})"
    return {"insns": insns, "isa": isa}


def armv7_count(qemu, plugin, exe, model, runs, env):
    """Instructions `edgeinfer bench --runs RUNS` executes under qemu-arm, counted by libinsn."""
    log = REPO / "target" / "armv7-insns.log"
    cmd = [str(qemu), "-cpu", "cortex-a7", "-L", "/usr/arm-linux-gnueabihf", "-plugin", str(plugin),
           "-d", "plugin", "-D", str(log), str(exe), "bench", str(model), "--runs", str(runs),
           "--warmup", "1", "--threads", "1", "--json"]
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    total = [ln for ln in log.read_text().splitlines() if ln.startswith("total insns:")]
    return int(total[-1].split(":")[1])


def armv7_part(armcost, exe):
    """Per pair: instructions per inference (two run counts' difference) of int8 on the default
    rung, int8 on `scalar` and float, and the rung `inspect` reports."""
    qemu = armcost / "qemu" / "bin" / "qemu-arm"
    plugin = armcost / "qemu" / "plugins" / "libinsn.so"
    if not qemu.exists():
        sys.exit(f"{qemu} is missing: run benches/qemu-arm.sh once (after armcost's build-qemu.sh)")
    # tract reads NEON from /proc/cpuinfo, which under qemu-user is this host's.
    base = dict(os.environ, RUST_LOG="error", TRACT_CPU_ARM32_NEON="true")
    base.pop("EDGEINFER_ISA", None)
    insns, isa = {}, None
    for i8, f32 in PAIRS:
        for stem, label, cap in ((i8, "default", None), (i8, "scalar", "scalar"), (f32, "float", None)):
            env = dict(base, **({"EDGEINFER_ISA": cap} if cap else {}))
            model = model_path(stem)
            n = max(2, runs_for(stem) // 10)
            lo = armv7_count(qemu, plugin, exe, model, 1, env)
            hi = armv7_count(qemu, plugin, exe, model, 1 + n, env)
            insns[f"{stem}|{label}"] = (hi - lo) / n
            print(f"armv7: {stem} ({label}) {fmt_n(insns[f'{stem}|{label}'])}", file=sys.stderr)
    cmd = ["qemu-arm", "-cpu", "cortex-a7", "-L", "/usr/arm-linux-gnueabihf", str(exe), "inspect",
           str(model_path("vibration_int8")), "--json"]
    v, err, _ = compare_ort.run_json(cmd, base)
    isa = v["isa"] if v else f"? ({err})"
    return {"insns": insns, "isa": isa}


def fmt_n(x):
    for unit, d in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= d:
            return f"{x / d:.3g} {unit}"
    return f"{x:.0f}"


def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "-"


def markdown(report):
    lines = [f"# Int8 across instruction sets ({report['date']})", "",
             f"x86 host: {report['cpu']}. ONNX Runtime {report['ort']}, one thread.", ""]
    arm = report.get("arm")
    if arm:
        lines += ["## ARM: instructions per inference under qemu (a proxy, not time)", "",
                  "| CPU | edgeinfer rung | model | edgeinfer | ONNX Runtime | edgeinfer / ORT | "
                  "int8 / own float: edgeinfer | ORT |", "|---|---|---|---:|---:|---:|---:|---:|"]
        g = arm["insns"]
        for cpu, board in ARM_CPUS.items():
            for i8, f32 in PAIRS:
                e8, o8 = g.get(f"{cpu}|{i8}|edgeinfer"), g.get(f"{cpu}|{i8}|ort")
                ef, of = g.get(f"{cpu}|{f32}|edgeinfer"), g.get(f"{cpu}|{f32}|ort")
                lines.append(f"| {cpu} ({board}) | {arm['isa'][cpu]} | {i8} | {fmt_n(e8) if e8 else '-'} | "
                             f"{fmt_n(o8) if o8 else '-'} | {ratio(e8, o8)} | {ratio(e8, ef)} | {ratio(o8, of)} |")
                lines.append(f"| {cpu} ({board}) | float | {f32} | {fmt_n(ef) if ef else '-'} | "
                             f"{fmt_n(of) if of else '-'} | {ratio(ef, of)} | | |")
        lines.append("")
    a7 = report.get("armv7")
    if a7:
        g = a7["insns"]
        lines += ["## armv7: instructions per inference under qemu-arm -cpu cortex-a7 (a proxy, not time)", "",
                  f"`{a7['isa']}` is the rung int8 models take by default; `scalar` keeps tract's float kernels "
                  "with rounded activations (what 32-bit boards ran before). No ONNX Runtime armv7 wheel exists.",
                  "", "| model | int8 (default rung) | int8 (`scalar`) | float | default / float | scalar / float |",
                  "|---|---:|---:|---:|---:|---:|"]
        for i8, f32 in PAIRS:
            d, sc, fl = g.get(f"{i8}|default"), g.get(f"{i8}|scalar"), g.get(f"{f32}|float")
            lines.append(f"| {i8} | {fmt_n(d)} | {fmt_n(sc)} | {fmt_n(fl)} | {ratio(d, fl)} | {ratio(sc, fl)} |")
        lines.append("")
    x86 = report.get("x86")
    if x86:
        lines += [f"## x86: p50 time on this host (ms, median of {x86['rounds']} interleaved rounds)", "",
                  "`scalar` is tract's float kernels with rounded activations (no integer kernels); the "
                  "float model always runs tract's float kernels (and on AVX-512 our float 1x1 operator).",
                  "", "| model | ONNX Runtime | " + " | ".join(f"edgeinfer {r}" for r in x86["rungs"]) +
                  " | best rung / ORT | best rung int8 / own float |",
                  "|---|---:|" + "---:|" * len(x86["rungs"]) + "---:|---:|"]
        p = x86["p50_ms"]
        for i8, f32 in PAIRS:
            for stem in (i8, f32):
                cells = [p.get(f"{stem}|{r}") for r in x86["rungs"]]
                best = cells[-1] if cells else None
                ort = p.get(f"{stem}|ort")
                own_float = p.get(f"{f32}|{x86['rungs'][-1]}") if stem == i8 and x86["rungs"] else None
                lines.append(f"| {stem} | {ort:.3f} | " + " | ".join(f"{c:.3f}" if c else "-" for c in cells) +
                             f" | {ratio(best, ort)} | {ratio(best, own_float) if stem == i8 else ''} |")
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--armcost", type=pathlib.Path, default=REPO.parent / "shared" / "armcost")
    ap.add_argument("--edgeinfer", type=pathlib.Path, default=REPO / "target" / "release" / "edgeinfer")
    ap.add_argument("--edgeinfer-a64", type=pathlib.Path,
                    default=REPO / "target" / "aarch64-unknown-linux-gnu" / "release" / "edgeinfer")
    ap.add_argument("--edgeinfer-armv7", type=pathlib.Path,
                    default=REPO / "target" / "armv7-unknown-linux-gnueabihf" / "release" / "edgeinfer")
    ap.add_argument("--skip-armv7", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-arm", action="store_true")
    ap.add_argument("--skip-x86", action="store_true")
    ap.add_argument("--out", type=pathlib.Path, default=REPO / "benches" / "int8_isa.md")
    ap.add_argument("--models", nargs="+", metavar="TEXT",
                    help="only the pairs whose int8 model's name contains one of these")
    args = ap.parse_args()
    if args.models:
        PAIRS[:] = [p for p in PAIRS if any(t in p[0] for t in args.models)]
        if not PAIRS:
            sys.exit(f"no pair's int8 model matches {args.models}")
    info = compare_ort.machine_info()
    ort = subprocess.run([sys.executable, "-c", "import onnxruntime; print(onnxruntime.__version__)"],
                         capture_output=True, text=True).stdout.strip() or "?"
    flags = pathlib.Path("/proc/cpuinfo").read_text().split()
    isa = ", ".join(f for f in ("avx2", "avx_vnni", "avx512f", "avx512_vnni") if f in flags)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "cpu": f"{info.get('cpu', platform.processor())} ({isa or 'no AVX2'})", "ort": ort}
    if not args.skip_arm:
        report["arm"] = arm_part(args.armcost, args.edgeinfer_a64.resolve(), args.out.with_suffix(".arm.json"))
    if not args.skip_armv7:
        armcost_dir = pathlib.Path(os.environ.get("ARMCOST", "/tmp/armcost"))
        report["armv7"] = armv7_part(armcost_dir, args.edgeinfer_armv7.resolve())
    if not args.skip_x86:
        report["x86"] = x86_part(args.edgeinfer.resolve(), args.rounds)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.write_text(markdown(report) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
