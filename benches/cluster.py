#!/usr/bin/env python3
"""Upgrades/s through one gate with `cluster` set against the same gate without it.

    python3 benches/cluster.py              # 3 rounds of 5 s each, alternating
    python3 benches/cluster.py --no-build --reps 1 --seconds 2

Both gates front one `wsload serve` upstream; the clustered one shares its limits through
a `redis-server` (Debian's package) started here on a free loopback port. Each upgrade is
`wsload connect` (TCP, upgrade, one echo, close; 16 workers), so the clustered gate makes
one Redis round trip per upgrade (the rate and the per-IP lease) and one batched release.

Pinned as benches/run.py pins them: the servers under test (the gates and their upstream)
on CPU 0, the load on CPU 1, and Redis, a service of its own in a real deployment, beside
the load. `--upstream-cpu 1` moves the upstream to CPU 1 too (this script's first layout):
CPU 1 then runs at 98-99 % with or without `cluster`, so the rate is the starved load
generator's and Redis's work slows it, while the gate idles. Each round samples both
CPUs' busy time, so a saturated CPU 1 shows.

Prints the medians, the ratio (and each round's), the gates' CPU per upgrade and the CPUs'
busy share. Every process started here is stopped before it returns.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RELEASE, Procs, build, free_port, gate_command  # noqa: E402


def policy(upstream, cluster):
    text = f"""version: 1
max_connections: 100000
defaults:
  upstream: ws://127.0.0.1:{upstream}
  auth: {{required: false}}
  origin: {{allow_missing: true}}
  rate: {{upgrades_per_second: 1000000, burst: 1000000, max_connections_per_ip: 100000}}
routes:
  - path: /ws
"""
    if cluster:
        text += "cluster: {redis_url_env: WSGATE_REDIS_URL, on_failure: closed}\n"
    return text


def cpu_busy():
    """(busy, total) jiffies of CPU 0 and CPU 1, from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        f = line.split()
        if f[0] in ("cpu0", "cpu1"):
            v = [int(x) for x in f[1:8]]
            out[f[0]] = (sum(v) - v[3] - v[4], sum(v))
    return out


def busy_share(before, after):
    return {c: 100 * (after[c][0] - before[c][0]) / max(1, after[c][1] - before[c][1])
            for c in after if c in before}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--upstream-cpu", type=int, default=0, choices=(0, 1))
    args = ap.parse_args()
    if not shutil.which("redis-server"):
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    if not args.no_build:
        build()
    pin = (lambda cpu: ["taskset", "-c", str(cpu)]) if shutil.which("taskset") else (lambda _: [])
    work = Path(tempfile.mkdtemp(prefix="wsgate-cluster-bench-"))
    procs = Procs(work / "logs")
    try:
        redis_port, upstream = free_port(), free_port()
        procs.spawn("redis", pin(1) + ["redis-server", "--port", str(redis_port), "--bind",
                                       "127.0.0.1", "--save", "", "--appendonly", "no",
                                       "--dir", str(work)], redis_port)
        procs.spawn("upstream", pin(args.upstream_cpu) + [str(RELEASE / "wsload"), "serve",
                                                          "--listen", f"127.0.0.1:{upstream}"],
                    upstream, False)
        env = {"WSGATE_REDIS_URL": f"redis://127.0.0.1:{redis_port}/", "PATH": "/usr/bin:/bin"}
        for name, cluster in (("alone", False), ("cluster", True)):
            (work / f"{name}.yaml").write_text(policy(upstream, cluster))
            port = free_port()
            procs.spawn(name, pin(0) + gate_command(work / f"{name}.yaml", port), port,
                        env=env)
        results = {"alone": [], "cluster": []}
        busy = {"alone": [], "cluster": []}
        for _ in range(args.reps):
            for name in results:
                cmd = pin(1) + [str(RELEASE / "wsload"), "connect", "--url",
                                f"ws://127.0.0.1:{procs.ports[name]}/ws", "-c", "16",
                                "-d", str(args.seconds), "--pid", str(procs.procs[name].pid)]
                # The CPUs' busy share over the measured window (after wsload's warm-up).
                window = {}
                sampler = threading.Timer(1.5, lambda w=window: w.update(start=cpu_busy()))
                sampler.start()
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
                sampler.join()
                if "start" in window:
                    busy[name].append(busy_share(window["start"], cpu_busy()))
                if out.returncode != 0:
                    sys.exit(f"{name}: {out.stderr.strip()[-300:]}")
                results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
        rates = {n: statistics.median(r["upgrades_per_s"] for r in rs)
                 for n, rs in results.items()}
        for name, rs in results.items():
            key = "target_cpu_percent_of_core"
            cpu = [r[key] for r in rs if isinstance(r.get(key), (int, float))]
            per = (f", gate CPU {statistics.median(cpu) / 100 / rates[name] * 1e6:.0f} µs/upgrade"
                   if cpu else "")
            runs = ", ".join(f"{r['upgrades_per_s']:.0f}" for r in rs)
            cpus = ", ".join(f"{c} {statistics.median(b[c] for b in busy[name]):.0f} %"
                             for c in ("cpu0", "cpu1") if busy[name])
            print(f"{name:8} {rates[name]:9.0f} upgrades/s (runs: {runs}){per}; busy: {cpus}")
        rounds = ", ".join(f"{c['upgrades_per_s'] / a['upgrades_per_s']:.2f}"
                           for a, c in zip(results["alone"], results["cluster"]))
        print(f"cluster / alone: {rates['cluster'] / rates['alone']:.2f} (rounds: {rounds})")
    finally:
        procs.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
