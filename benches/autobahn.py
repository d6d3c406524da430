#!/usr/bin/env python3
"""The Autobahn|Testsuite through wsgate, on both legs, against tungstenite baselines.

    python3 benches/autobahn.py            # cases 1-7, 9 and 10 (a few minutes)
    python3 benches/autobahn.py --cases 1.*,2.*

Four runs, each with fresh processes:
  client-direct    wstest fuzzingclient -> wsload serve (a tungstenite echo server)
  client-gate      wstest fuzzingclient -> wsgate -> wsload serve
  upstream-direct  wsload autobahn (a tungstenite client) -> wstest fuzzingserver
  upstream-gate    wsload autobahn -> wsgate -> wstest fuzzingserver

The gate runs with auth required (the token in the query on the client leg, in an
Authorization header on the upstream leg) and limits raised to what the cases send
(16 MiB messages, thousands of messages a second). It fails, exit 1, when a gate run has
a FAILED case, or a NON-STRICT or UNIMPLEMENTED case that is not the same in the
direct run of its leg. `autobahntestsuite` needs Python 2.7: the virtualenv is made in
target/autobahn/venv from pyenv's 2.7 (or --python) the first time.
"""

import argparse
import collections
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RELEASE, ROOT, SECRET, Procs, build, free_port, gate_command, token  # noqa: E402

VERSION = "25.10.1"
VENV = ROOT / "target" / "autobahn" / "venv"
CASES = "1.*,2.*,3.*,4.*,5.*,6.*,7.*,9.*,10.*"
# What a gate run may show besides OK, when the direct run of its leg shows it too.
TOLERATED = {"NON-STRICT", "UNIMPLEMENTED"}
FINE = {"OK", "INFORMATIONAL"}


def python27(hint):
    candidates = [hint] if hint else []
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/2.7*/bin/python2.7")))
    candidates += [shutil.which("python2.7")]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    sys.exit("autobahn: Python 2.7 not found (pyenv install 2.7.18, or --python)")


def wstest(hint):
    """target/autobahn/venv/bin/wstest, creating the virtualenv the first time."""
    exe = VENV / "bin" / "wstest"
    if exe.exists():
        return exe
    py = python27(hint)
    tool = VENV.parent / "virtualenv"
    # virtualenv 20.21 is the last release that creates Python 2.7 environments.
    subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "--target", str(tool), "virtualenv<20.22"], check=True)
    subprocess.run([py, "-m", "virtualenv", "-q", str(VENV)], check=True,
                   env={**os.environ, "PYTHONPATH": str(tool)})
    subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                    f"autobahntestsuite=={VERSION}"], check=True)
    return exe


def gate_policy(path, upstream):
    (path.parent / "secret").write_text(SECRET)
    path.write_text(f"""version: 1
defaults:
  upstream: ws://127.0.0.1:{upstream}
  auth: {{required: true, algorithms: [HS256], keys: [{{hmac_secret_file: secret}}]}}
  origin: {{allow_missing: true}}
  # Autobahn's cases send messages of up to 16 MiB, thousands per second.
  messages: {{max_frame_bytes: 20971520, max_message_bytes: 20971520, per_second: 1000000, burst: 1000000}}
  rate: {{upgrades_per_second: 10000, burst: 10000}}
  # The gate's own pings would be unexpected frames in the cases' transcripts.
  heartbeat: {{interval_seconds: 3600}}
routes:
  - path: /
""")


def run_client_leg(exe, work, cases, through_gate, bearer):
    """wstest fuzzingclient against the echo server, directly or through the gate."""
    procs = Procs(work / "logs")
    try:
        up = free_port()
        procs.spawn("echo", [str(RELEASE / "wsload"), "serve", "--listen", f"127.0.0.1:{up}"],
                    up)
        url = f"ws://127.0.0.1:{up}/"
        if through_gate:
            gate_policy(work / "policy" / "policy.yaml", up)
            port = free_port()
            procs.spawn("wsgate", gate_command(work / "policy" / "policy.yaml", port), port)
            url = f"ws://127.0.0.1:{port}/?access_token={bearer}"
        agent = "wsgate" if through_gate else "tungstenite"
        spec = {"outdir": str(work / "report"), "servers": [{"agent": agent, "url": url}],
                "cases": cases, "exclude-cases": [], "exclude-agent-cases": {}}
        (work / "spec.json").write_text(json.dumps(spec))
        with open(work / "logs" / "wstest.log", "ab") as log:
            subprocess.run([str(exe), "-m", "fuzzingclient", "-s", str(work / "spec.json")],
                           cwd=work, stdout=log, stderr=log, timeout=1800, check=True)
        return agent
    finally:
        procs.stop()


def run_upstream_leg(exe, work, cases, through_gate, bearer):
    """wsload's testee client against wstest fuzzingserver, directly or through the gate."""
    procs = Procs(work / "logs")
    try:
        up = free_port()
        spec = {"url": f"ws://127.0.0.1:{up}", "outdir": str(work / "report"),
                "cases": cases, "exclude-cases": [], "exclude-agent-cases": {}}
        (work / "spec.json").write_text(json.dumps(spec))
        procs.spawn("wstest", [str(exe), "-m", "fuzzingserver", "-s", str(work / "spec.json"),
                               "--webport", "0"], up, cwd=work)
        url, headers = f"ws://127.0.0.1:{up}", []
        if through_gate:
            gate_policy(work / "policy" / "policy.yaml", up)
            port = free_port()
            procs.spawn("wsgate", gate_command(work / "policy" / "policy.yaml", port), port)
            url, headers = f"ws://127.0.0.1:{port}", ["--header", f"Authorization: Bearer {bearer}"]
        agent = "wsgate" if through_gate else "tungstenite"
        out = subprocess.run([str(RELEASE / "wsload"), "autobahn", "--url", url, "--agent", agent]
                             + headers, capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            sys.exit(f"autobahn: wsload autobahn failed: {out.stderr.strip()}")
        # updateReports writes the report before it answers; give the file a moment.
        for _ in range(50):
            if (work / "report" / "index.json").exists():
                break
            time.sleep(0.1)
        return agent
    finally:
        procs.stop()


def results(work, agent):
    index = json.loads((work / "report" / "index.json").read_text())
    return index[agent]


def summary(cases):
    behavior = collections.Counter(r["behavior"] for r in cases.values())
    close = collections.Counter(r["behaviorClose"] for r in cases.values())
    return behavior, close


def case_key(case_id):
    return tuple(int(p) for p in case_id.split("."))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=CASES, help=f"comma-separated (default {CASES})")
    ap.add_argument("--python", help="the Python 2.7 interpreter for the virtualenv")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--keep", help="keep the reports in this directory")
    opts = ap.parse_args()
    cases = opts.cases.split(",")
    if not opts.no_build:
        build()
    exe = wstest(opts.python)
    bearer = token(sub="autobahn", ttl="4h")
    failures = []
    tmp = tempfile.mkdtemp(prefix="wsgate-autobahn-")
    try:
        for leg, run in (("client", run_client_leg), ("upstream", run_upstream_leg)):
            got = {}
            for through_gate in (False, True):
                name = f"{leg}-{'gate' if through_gate else 'direct'}"
                work = Path(tmp) / name
                (work / "policy").mkdir(parents=True)
                started = time.monotonic()
                agent = run(exe, work, cases, through_gate, bearer)
                got[through_gate] = results(work, agent)
                behavior, close = summary(got[through_gate])
                print(f"autobahn {name:16} {len(got[through_gate])} cases in "
                      f"{time.monotonic() - started:.0f} s; behavior {dict(sorted(behavior.items()))}; "
                      f"close {dict(sorted(close.items()))}", flush=True)
            direct, gate = got[False], got[True]
            for case_id in sorted(gate, key=case_key):
                b = gate[case_id]["behavior"]
                base = direct.get(case_id, {}).get("behavior")
                if b in FINE or (b in TOLERATED and b == base):
                    continue
                failures.append(f"{leg} leg case {case_id}: {b} through the gate "
                                f"(direct: {base}); {gate[case_id].get('reportfile')}")
    finally:
        if opts.keep:
            shutil.copytree(tmp, opts.keep, dirs_exist_ok=True)
            print(f"autobahn: reports in {opts.keep}")
        shutil.rmtree(tmp, ignore_errors=True)
    for f in failures:
        print(f"autobahn: {f}")
    if failures:
        sys.exit(1)
    print("autobahn: 0 FAILED on both legs; every non-OK case matches tungstenite's own")


if __name__ == "__main__":
    main()
