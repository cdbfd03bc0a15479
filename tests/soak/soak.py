#!/usr/bin/env python3
"""Soak test: the daemon for an hour (or --duration seconds) with faults
coming and going, then a report.

What runs (all real parts, on loopback):
- mosquitto with persistence, stopped for 20 s every 4 minutes;
- the release daemon with three pipelines and a crash-safe disk queue whose
  bound is small enough that every broker outage fills it:
  - `cam`: a camera through `pipe` (ffmpeg looping a photo as MJPEG) that
    exits after 100 s, so the source dies and is restarted, through MobileNetV2 int8;
  - `vib`: a synthetic accelerometer, 10 windows/s, through the vibration model;
  - `tab`: an MQTT source fed by a publisher at 100 messages/s, one in 50 of
    them malformed (bad JSON, wrong length, binary garbage, an empty payload);
- SIGHUP (reload in place) every 7 minutes;
- a persistent-session subscriber that records every result.

Every 10 s it records RSS, open file descriptors, threads, the disk queue,
the MQTT buffer and latency. At the end it checks that no result was lost
without being counted (seq contiguous per run; gaps only where the disk
queue dropped its oldest and said so), reports the RSS and fd slopes and
whether p99 latency held, and writes a Markdown table and a PNG plot.

    python3 -m venv /tmp/soak && /tmp/soak/bin/pip install -r tests/soak/requirements.txt
    cargo build --release
    /tmp/soak/bin/python tests/soak/soak.py --duration 3600 --out docs/soak

Not part of CI: it takes an hour. Exit status 1 if a check failed.
"""

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt

ROOT = Path(__file__).resolve().parents[2]
DEVICE = "soak"
PIPELINES = ("cam", "tab", "vib")
BROKER_PERIOD_S = 240
BROKER_DOWN_S = 20
HUP_PERIOD_S = 420
SAMPLE_S = 10
MQTT_RATE = 100
QUEUE_MAX_BYTES = 96 * 1024


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


class Broker:
    """mosquitto with persistence, so the subscriber's session survives a restart."""

    def __init__(self, port, workdir):
        self.port = port
        self.dir = Path(workdir) / "mosquitto"
        self.dir.mkdir(exist_ok=True)
        # mosquitto started as root drops to its own user, which must reach and write this
        # directory: without it no session survives a restart and a subscriber that was away
        # misses what was published meanwhile.
        os.chmod(workdir, 0o755)
        os.chmod(self.dir, 0o777)
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {self.dir}/\nmax_queued_messages 0\nmax_inflight_messages 100\n"
        )
        self.proc = None
        self.restarts = 0

    def start(self):
        self.proc = subprocess.Popen(
            [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if not wait_port(self.port):
            raise SystemExit("mosquitto did not start")

    def stop(self):
        if self.proc:
            self.proc.send_signal(signal.SIGTERM)  # it saves its sessions first
            self.proc.wait(timeout=20)
            self.proc = None
            if not (self.dir / "mosquitto.db").exists():
                raise SystemExit(f"mosquitto saved no sessions in {self.dir}: the soak's delivery check needs them")


def config(mqtt_port, http_port, queue_dir, ffmpeg):
    photo = ROOT / "models/samples/detect/faces.jpg"
    cam = [
        "timeout", "100", ffmpeg, "-loglevel", "error", "-re", "-loop", "1", "-framerate", "4",
        "-i", str(photo), "-vf", "scale=320:240", "-f", "mjpeg", "-q:v", "5", "-",
    ]
    return f"""
device = "{DEVICE}"
[mqtt]
url = "mqtt://127.0.0.1:{mqtt_port}"
keep_alive_s = 5
reconnect_min_ms = 200
reconnect_max_ms = 1000
queue_dir = "{queue_dir}"
queue_max_bytes = {QUEUE_MAX_BYTES}
[health]
interval_s = 10
[http]
listen = "127.0.0.1:{http_port}"

[[pipelines]]
name = "cam"
model = "{ROOT}/models/mobilenetv2_int8.onnx"
source = {{ type = "pipe", format = "mjpeg", command = {json.dumps(cam)} }}
preprocess = {{ type = "image", resize = "stretch", mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225] }}
postprocess = {{ type = "classify", top_k = 1 }}
  [[pipelines.outputs]]
  type = "mqtt"
  qos = 1

[[pipelines]]
name = "vib"
model = "{ROOT}/models/vibration_int8.onnx"
source = {{ type = "synthetic", signal = "vibration", rate_hz = 1280 }}
postprocess = {{ type = "classify", top_k = 1 }}
  [[pipelines.outputs]]
  type = "mqtt"
  qos = 1

[[pipelines]]
name = "tab"
model = "{ROOT}/models/breast_cancer_mlp_f32.onnx"
source = {{ type = "mqtt", topic = "soak/tab", format = "json" }}
postprocess = {{ type = "classify", top_k = 1 }}
  [[pipelines.outputs]]
  type = "mqtt"
  qos = 1
"""


class Collector:
    """The persistent-session subscriber: every result's (pipeline, seq, captured_ms, arrival)."""

    def __init__(self, port):
        self.lock = threading.Lock()
        self.results = []
        self.health = []
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="soak-sub", clean_session=False)
        c.max_inflight_messages_set(100)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(min_delay=1, max_delay=2)
        c.on_connect = lambda cl, *_: cl.subscribe(f"edgeinfer/{DEVICE}/#", qos=1)
        c.on_message = self.on_message
        c.connect_async("127.0.0.1", port, keepalive=5)
        c.loop_start()
        self.client = c

    def on_message(self, _c, _u, m):
        now = time.time() * 1000
        parts = m.topic.split("/")
        if len(parts) == 4 and parts[3] == "result":
            try:
                p = json.loads(m.payload)
            except ValueError:
                return
            with self.lock:
                self.results.append((parts[2], p["seq"], p["captured_ms"], now, p["latency_ms"]["total"]))
        elif m.topic.endswith("/health") and m.payload:
            with self.lock:
                self.health.append(json.loads(m.payload))

    def since(self, index):
        with self.lock:
            return self.results[index:], len(self.results)


class Publisher(threading.Thread):
    """Feeds `soak/tab` at MQTT_RATE messages/s; one in 50 is malformed."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.sent = 0
        self.malformed = 0
        self.stop = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="soak-pub")
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.connect_async("127.0.0.1", port, keepalive=5)
        self.client.loop_start()
        self.rng = random.Random(7)

    def payload(self):
        r = self.rng
        if r.random() < 0.02:
            self.malformed += 1
            return r.choice(
                [
                    b"{not json",
                    json.dumps([r.random() for _ in range(29)]).encode(),
                    bytes(r.getrandbits(8) for _ in range(r.randrange(1, 200))),
                    b"",
                    b'{"a": "text"}',
                    json.dumps([float("nan")] * 30).encode(),
                    b"[" + b"1," * 5000 + b"1]",
                ]
            )
        return json.dumps([round(r.uniform(0, 2), 4) for _ in range(30)]).encode()

    def run(self):
        period = 1.0 / MQTT_RATE
        nxt = time.time()
        while not self.stop.is_set():
            if self.client.is_connected():
                self.client.publish("soak/tab", self.payload(), qos=0)
                self.sent += 1
            nxt += period
            time.sleep(max(0.0, nxt - time.time()))


def proc_stats(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss_kb = int(fields["VmRSS"].split()[0])
    threads = int(fields["Threads"])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss_kb, fds, threads


def api_status(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=2) as r:
            return json.loads(r.read())["health"]
    except (OSError, ValueError):
        return None


def counted_drops(st):
    m = st["mqtt"]
    q = m.get("disk_queue") or {}
    return {
        "dropped_full": q.get("dropped_full", 0),
        "dropped_age": q.get("dropped_age", 0),
        "mqtt_dropped": m.get("dropped", 0),
        "expired": m.get("expired", 0),
    }


def pctl(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def slope_per_hour(ts, ys):
    """Least-squares slope, per hour."""
    n = len(ts)
    if n < 2:
        return 0.0
    mt, my = sum(ts) / n, sum(ys) / n
    var = sum((t - mt) ** 2 for t in ts)
    return 0.0 if var == 0 else sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var * 3600


def main():
    global HUP_PERIOD_S, BROKER_PERIOD_S
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=3600, help="seconds of faults (default 3600)")
    ap.add_argument("--bin", default=str(ROOT / "target/release/edgeinfer"))
    ap.add_argument("--out", default=str(ROOT / "docs/soak"), help="where report.md and soak.png go")
    ap.add_argument("--hup-every", type=int, default=HUP_PERIOD_S, help="seconds between SIGHUP reloads")
    ap.add_argument("--broker-every", type=int, default=BROKER_PERIOD_S, help="seconds between broker stops")
    ap.add_argument("--report-from", help="write the report again from a finished run's run.json")
    ap.add_argument("--health-log", help="with --report-from: health messages logged on the side (JSON lines)")
    a = ap.parse_args()
    HUP_PERIOD_S, BROKER_PERIOD_S = a.hup_every, a.broker_every
    if a.report_from:
        run = json.loads(Path(a.report_from).read_text())
        if a.health_log:
            logged = [json.loads(line)["health"] for line in Path(a.health_log).read_text().splitlines() if line]
            run["health"] = run.get("health", []) + logged
        report(a, Path(a.report_from).parent, run)
    ffmpeg = shutil.which("ffmpeg") or sys.exit("ffmpeg is needed (apt-get install -y ffmpeg)")
    work = Path(tempfile.mkdtemp(prefix="edgeinfer-soak-"))
    mport, hport = free_port(), free_port()
    broker = Broker(mport, work)
    broker.start()
    collector = Collector(mport)
    cfg = work / "soak.toml"
    cfg.write_text(config(mport, hport, work / "queue", ffmpeg))
    log = open(work / "daemon.log", "w")
    env = dict(os.environ, RUST_LOG="warn")
    daemon = subprocess.Popen([a.bin, "run", str(cfg)], stdout=log, stderr=subprocess.STDOUT, env=env)
    if not wait_port(hport, 60):
        sys.exit(f"the daemon did not start: see {work}/daemon.log")
    time.sleep(3)  # the MQTT source's subscription
    pub = Publisher(mport)
    pub.start()

    samples, run_drops, cur_drops, hup_times = [], [], None, []
    hups = 0
    seen_index = 0
    start = time.time()
    next_sample = start + SAMPLE_S
    next_hup = start + HUP_PERIOD_S
    broker_down_at = start + BROKER_PERIOD_S - BROKER_DOWN_S
    broker_up_at = None
    print(f"soak: {a.duration} s; work dir {work}; status page http://127.0.0.1:{hport}/", flush=True)
    while time.time() - start < a.duration:
        now = time.time()
        if broker_up_at is None and now >= broker_down_at:
            broker.stop()
            broker_up_at = now + BROKER_DOWN_S
        elif broker_up_at is not None and now >= broker_up_at:
            broker.start()
            broker.restarts += 1
            broker_up_at = None
            broker_down_at += BROKER_PERIOD_S
        if now >= next_hup and broker_up_at is None:
            # The counters of this run just before it ends (its final health, which the report
            # prefers, also counts what dropped during the reload itself).
            st = api_status(hport)
            run_drops.append(counted_drops(st) if st else cur_drops or {})
            cur_drops = None
            daemon.send_signal(signal.SIGHUP)
            hup_times.append(round(now - start, 1))
            hups += 1
            next_hup += HUP_PERIOD_S
            wait_port(hport, 60)
        if now >= next_sample:
            next_sample += SAMPLE_S
            if daemon.poll() is not None:
                print(f"the daemon exited with {daemon.returncode}: see {work}/daemon.log")
                break
            rss, fds, threads = proc_stats(daemon.pid)
            st = api_status(hport) or {}
            if st:
                cur_drops = counted_drops(st)
            new, seen_index = collector.since(seen_index)
            e2e = [arr - cap for (_, _, cap, arr, _) in new]
            total = [t for (*_, t) in new]
            m = st.get("mqtt", {})
            q = m.get("disk_queue") or {}
            s = {
                "t": round(now - start, 1),
                "rss_mb": rss / 1024,
                "fds": fds,
                "threads": threads,
                "queue_records": q.get("records", 0),
                "queue_kb": q.get("bytes", 0) / 1024,
                "buffer": m.get("queue_depth", 0),
                "connected": m.get("connected", False),
                "received": len(new),
                "e2e_p50": pctl(e2e, 0.5),
                "e2e_p99": pctl(e2e, 0.99),
                "total_p99": pctl(total, 0.99),
                "cam_running": st.get("pipelines", {}).get("cam", {}).get("source", {}).get("running"),
            }
            samples.append(s)
            print(
                f"t={s['t']:7.0f}s rss={s['rss_mb']:6.1f}MB fds={fds:3d} thr={threads:3d} "
                f"queue={s['queue_records']:5d} rec/{s['queue_kb']:6.1f}KiB conn={s['connected']!s:5} "
                f"recv={len(new):5d} e2e p99={s['e2e_p99']:8.1f}ms total p99={s['total_p99']:6.1f}ms",
                flush=True,
            )
        if daemon.poll() is not None:
            print(f"the daemon exited with {daemon.returncode}: see {work}/daemon.log")
            break
        time.sleep(0.2)

    # Drain: the broker up, the publisher stopped, the disk queue emptied, then a clean stop.
    pub.stop.set()
    if broker.proc is None:
        broker.start()
    end = time.time() + 120
    while time.time() < end:
        st = api_status(hport)
        if st and st["mqtt"]["connected"] and (st["mqtt"].get("disk_queue") or {}).get("records", 1) == 0:
            break
        time.sleep(1)
    st = api_status(hport)
    run_drops.append(counted_drops(st) if st else cur_drops or {})
    crashed = daemon.poll() is not None
    daemon.send_signal(signal.SIGTERM)
    daemon.wait(timeout=60)
    time.sleep(5)
    collector.client.loop_stop()
    broker.stop()
    run = {
        "duration": a.duration,
        "samples": samples,
        "results": collector.results,
        "run_drops": run_drops,
        "hups": hups,
        "hup_times": hup_times,
        "hup_period": HUP_PERIOD_S,
        "broker_period": BROKER_PERIOD_S,
        "health": collector.health,
        "broker_restarts": broker.restarts,
        "published": pub.sent,
        "malformed": pub.malformed,
        "crashed": crashed,
    }
    (work / "run.json").write_text(json.dumps(run))
    report(a, work, run)


def final_health_per_run(health):
    """Each daemon run's last health message (the one it publishes at shutdown counts
    everything): runs are told apart by their start time, `time_ms - uptime_s`."""
    runs = {}
    for h in health:
        started = round(h["time_ms"] / 1000 - h["uptime_s"])
        key = next((k for k in runs if abs(k - started) <= 2), started)
        if key not in runs or h["uptime_s"] > runs[key]["uptime_s"]:
            runs[key] = h
    return [runs[k] for k in sorted(runs)]


def report(a, work, run):
    samples, run_drops, hups, crashed = run["samples"], run["run_drops"], run["hups"], run["crashed"]
    hup_period = run.get("hup_period", HUP_PERIOD_S)
    hup_times = run.get("hup_times") or [hup_period * (k + 1) for k in range(hups)]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    by_pipe = {p: [] for p in PIPELINES}
    for pipe, seq, cap, _arr, _t in run["results"]:
        by_pipe.setdefault(pipe, []).append((seq, cap))
    finals = final_health_per_run(run.get("health", []))
    missing, tails, checked_runs = 0, 0, 0
    rows = []
    for pipe, rs in sorted(by_pipe.items()):
        runs = split_runs(rs) if rs else []
        # Gaps below the highest seq received in each run.
        miss = sum(max(r) - len(r) for r in runs if r)
        # Results computed after the last one received: each run's final health says how many
        # there were. Matched from the last run back (the health log may start late).
        tail = 0
        for r, h in zip(reversed(runs), reversed(finals)):
            computed = h["pipelines"].get(pipe, {}).get("inferences", 0)
            tail += max(0, computed - max(r))
            checked_runs += 1
        distinct = sum(len(r) for r in runs)
        d = len(rs) - distinct
        rows.append((pipe, len(runs), distinct, d, miss, tail))
        missing += miss
        tails += tail
    # The drop counters: from each run's final health where there is one, else from the
    # status page read just before the reload.
    # Runs with a final health count from it (it includes what dropped during the reload);
    # earlier ones from the status page read just before their reload.
    k = min(len(finals), len(run_drops))
    per_run = run_drops[: len(run_drops) - k] + [counted_drops(h) for h in finals[len(finals) - k :]]
    drops = {k: sum(r.get(k, 0) for r in per_run) for k in ("dropped_full", "dropped_age", "mqtt_dropped", "expired")}
    counted = sum(drops.values())
    uncounted = max(0, missing + tails - counted)

    ts = [s["t"] for s in samples]
    warm = [s for s in samples if s["t"] >= 300] or samples
    rss_slope = slope_per_hour([s["t"] for s in warm], [s["rss_mb"] for s in warm])
    fd_slope = slope_per_hour([s["t"] for s in warm], [s["fds"] for s in warm])
    thr_slope = slope_per_hour([s["t"] for s in warm], [s["threads"] for s in warm])
    # Each reload starts a fresh process image (exec): the slope inside each run, after its first minute.
    run_slopes = []
    bounds = [0.0] + list(hup_times) + [float("inf")]
    for k in range(len(bounds) - 1):
        lo, hi = bounds[k] + 60, bounds[k + 1]
        seg = [s for s in samples if lo <= s["t"] < hi]
        if len(seg) >= 10:
            run_slopes.append(slope_per_hour([s["t"] for s in seg], [s["rss_mb"] for s in seg]))
    half = len(warm) // 2
    p99_first = statistics.median([s["total_p99"] for s in warm[:half] if s["total_p99"] == s["total_p99"]] or [0])
    p99_second = statistics.median([s["total_p99"] for s in warm[half:] if s["total_p99"] == s["total_p99"]] or [0])

    checks = {
        "no result lost uncounted": uncounted == 0,
        "the daemon never crashed": not crashed,
        "every pipeline delivered from every run": all(n == hups + 1 for _, n, *_ in rows),
        "every run's end checked against its final health": checked_runs == len(PIPELINES) * (hups + 1),
        # A leak grows: a falling RSS (a reload that maps less) is not one.
        "RSS does not grow (slope under +2 MB/h after warm-up)": rss_slope < 2,
        "fds flat (slope within 1 per hour)": abs(fd_slope) < 1,
        "p99 of capture-to-result stable (second half <= 1.5x first half)": p99_second <= 1.5 * max(p99_first, 1),
    }
    plot(out / "soak.png", samples)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    dur = ts[-1] if ts else 0
    lines = [
        f"# Soak run: {dur / 60:.0f} minutes",
        "",
        f"Command: `python3 tests/soak/soak.py --duration {run['duration']}` (release build) on {cpu}, "
        f"{os.cpu_count()} cores. Faults: mosquitto stopped for {BROKER_DOWN_S} s every {BROKER_PERIOD_S} s "
        f"({run['broker_restarts']} restarts), SIGHUP every {HUP_PERIOD_S} s ({hups} reloads), the camera command "
        f"exits every 100 s, {run['malformed']} malformed messages among {run['published']} published, disk queue "
        f"bound {QUEUE_MAX_BYTES // 1024} KiB.",
        "",
        "| pipeline | runs | results received (distinct) | duplicates | missing seqs | computed after the last received (final health) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| `{p}` | {n} | {dist} | {d} | {m} | {t} |" for p, n, dist, d, m, t in rows]
    lines += [
        "",
        "| figure | value |",
        "|---|---:|",
        f"| missing seqs, all pipelines | {missing} |",
        f"| results computed after each run's last received one, all pipelines | {tails} (runs checked against their final health: {checked_runs // len(PIPELINES)} of {hups + 1}) |",
        f"| counted drops (disk queue full / aged, MQTT buffer, expired) | {counted} ({', '.join(f'{k} {v}' for k, v in drops.items())}) |",
        f"| lost without being counted | {uncounted} |",
        f"| RSS first / last / slope after 5 min | {warm[0]['rss_mb']:.1f} MB / {warm[-1]['rss_mb']:.1f} MB / {rss_slope:+.2f} MB/h |"
        if warm else "| RSS | no samples |",
        f"| RSS slope inside each run (between reloads, after its first minute): median / max | "
        f"{statistics.median(run_slopes or [0]):+.2f} / {max(run_slopes or [0]):+.2f} MB/h over {len(run_slopes)} runs |",
        f"| open fds min / max / slope | {min(s['fds'] for s in samples)} / {max(s['fds'] for s in samples)} / {fd_slope:+.2f} per h |"
        if samples else "",
        f"| threads min / max / slope | {min(s['threads'] for s in samples)} / {max(s['threads'] for s in samples)} / {thr_slope:+.2f} per h |"
        if samples else "",
        f"| disk queue peak | {max((s['queue_kb'] for s in samples), default=0):.0f} KiB of {QUEUE_MAX_BYTES // 1024} KiB |",
        f"| capture-to-result p99 (median of 10 s windows), first / second half | {p99_first:.1f} ms / {p99_second:.1f} ms |",
        f"| capture-to-subscriber p99 while connected (median of windows) | "
        f"{statistics.median([s['e2e_p99'] for s in samples if s['connected'] and s['e2e_p99'] == s['e2e_p99']] or [0]):.1f} ms |",
        "",
        "| check | result |",
        "|---|---|",
    ]
    lines += [f"| {k} | {'pass' if v else '**FAIL**'} |" for k, v in checks.items()]
    lines += ["", "![RSS, fds, threads, disk queue and latency over the run](soak.png)", ""]
    (out / "report.md").write_text("\n".join(line for line in lines if line is not None) + "\n")
    print("\n".join(lines))
    print(f"report: {out}/report.md; work dir (daemon log) {work}")
    sys.exit(0 if all(checks.values()) else 1)


def split_runs(rs):
    """One pipeline's (seq, captured_ms) split into runs (sets of seqs). A
    redelivered result repeats its (seq, captured_ms) pair; within a run seq
    grows with the capture time, so in capture order a seq that does not grow
    starts the next run (after a reload the daemon numbers from 1 again)."""
    ordered = sorted(set(rs), key=lambda r: (r[1], r[0]))
    runs, cur, prev = [], set(), 0
    for seq, _ in ordered:
        if cur and seq <= prev:
            runs.append(cur)
            cur = set()
        cur.add(seq)
        prev = seq
    if cur:
        runs.append(cur)
    return runs


def plot(path, samples):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] / 60 for s in samples]
    fig, ax = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    ax[0].plot(t, [s["rss_mb"] for s in samples])
    ax[0].set_ylabel("RSS (MB)")
    ax[1].plot(t, [s["fds"] for s in samples], label="open fds")
    ax[1].plot(t, [s["threads"] for s in samples], label="threads")
    ax[1].legend(loc="upper left")
    ax[2].plot(t, [s["queue_kb"] for s in samples], label="disk queue (KiB)")
    ax[2].plot(t, [s["buffer"] for s in samples], label="MQTT buffer (messages)")
    ax[2].legend(loc="upper left")
    ax[3].plot(t, [s["total_p99"] for s in samples], label="capture to result, p99")
    ax[3].plot(t, [s["e2e_p50"] for s in samples], label="capture to subscriber, p50")
    ax[3].set_yscale("log")
    ax[3].set_ylabel("ms")
    ax[3].legend(loc="upper left")
    ax[3].set_xlabel("minutes")
    for a in ax:
        for s in samples:
            if not s["connected"]:
                a.axvspan(s["t"] / 60 - SAMPLE_S / 120, s["t"] / 60 + SAMPLE_S / 120, color="0.9", lw=0)
    ax[0].set_title("edgeinfer soak (grey: broker down)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
