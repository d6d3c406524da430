#!/usr/bin/env python3
"""The Autobahn|Testsuite through wsgate, on both legs, against direct baselines.

    python3 benches/autobahn.py            # cases 1-7, 9, 10, 12 and 13 (~15 minutes)
    python3 benches/autobahn.py --cases 1.*,2.*,12.1.*

Four runs for each kind of counterpart, each with fresh processes:
  client-direct    wstest fuzzingclient -> echo server
  client-gate      wstest fuzzingclient -> wsgate -> echo server
  upstream-direct  testee client -> wstest fuzzingserver
  upstream-gate    testee client -> wsgate -> wstest fuzzingserver

Cases 1-10 run against tungstenite (`wsload serve`, `wsload autobahn`), which has no
permessage-deflate, leg after leg, each direct run first. The compression cases, 12.* and
13.*, run against Python `websockets` with it (benches/autobahn_peer.py, in the virtualenv
target/pyclients, made here from tests/python/requirements.txt when missing); they are
slow, so their two legs run side by side, and their direct runs take only the cases that
were neither OK nor INFORMATIONAL through the gate (none, when all went well). A --cases
pattern starting 12. or 13. goes to the websockets runs, any other to the tungstenite ones.

The gate runs with auth required (the token in the query on the client leg, in an
Authorization header on the upstream leg) and limits raised to what the cases send
(16 MiB messages, thousands of messages a second). It fails, exit 1, when a gate run has
a FAILED case, or a NON-STRICT or UNIMPLEMENTED case that is not the same in the
direct run of its leg with the same counterpart. `autobahntestsuite` needs Python 2.7:
the virtualenv is made in target/autobahn/venv from pyenv's 2.7 (or --python) the first
time.
"""

import argparse
import collections
import concurrent.futures
import functools
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
CASES = "1.*,2.*,3.*,4.*,5.*,6.*,7.*,9.*,10.*,12.*,13.*"
# The compression cases: they need a counterpart with permessage-deflate.
DEFLATE_SECTIONS = {"12", "13"}
PYCLIENTS = ROOT / "target" / "pyclients"
PEER = ROOT / "benches" / "autobahn_peer.py"
# A run of 12.* and 13.* takes 10 to 20 minutes on two busy cores.
RUN_SECONDS = 3600
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


def pyclients_python():
    """target/pyclients/bin/python with websockets, made as .ci/run makes it when missing."""
    exe = PYCLIENTS / "bin" / "python"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PYCLIENTS)], check=True)
    if subprocess.run([str(exe), "-c", "import websockets"],
                      stderr=subprocess.DEVNULL).returncode != 0:
        subprocess.run([str(exe), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "-r", str(ROOT / "tests" / "python" / "requirements.txt")], check=True)
    return exe


# The counterpart of a set of runs: the agent name of its direct runs, the program whose
# `serve --listen ADDR` is the echo server and whose TESTEE mode (--url, --agent, --header)
# is the testee client. `heavy`: its cases are slow (12.* and 13.*: zlib and Python at both
# ends, 10 minutes and more a run) and none is timing-sensitive, so its two legs run side
# by side, each gate run first and the direct run only on the cases that need a baseline.
Peer = collections.namedtuple("Peer", "agent program testee heavy")


def tungstenite():
    return Peer("tungstenite", [str(RELEASE / "wsload")], "autobahn", heavy=False)


def websockets():
    return Peer("websockets", [str(pyclients_python()), str(PEER)], "client", heavy=True)


def split_cases(cases):
    """The patterns for tungstenite and those for websockets (12.*, 13.*)."""
    plain = [c for c in cases if c.split(".")[0] not in DEFLATE_SECTIONS]
    deflate = [c for c in cases if c.split(".")[0] in DEFLATE_SECTIONS]
    return plain, deflate


def gate_policy(path, upstream):
    (path.parent / "secret").write_text(SECRET)
    path.write_text(f"""version: 1
defaults:
  upstream: ws://127.0.0.1:{upstream}
  auth: {{required: true, algorithms: [HS256], keys: [{{hmac_secret_file: secret}}]}}
  origin: {{allow_missing: true}}
  # Autobahn's cases send messages of up to 16 MiB, thousands per second; the compression
  # cases (12.*, 13.*) agree permessage-deflate end to end through the gate.
  messages: {{compression: pass, max_frame_bytes: 20971520, max_message_bytes: 20971520, per_second: 1000000, burst: 1000000}}
  rate: {{upgrades_per_second: 10000, burst: 10000}}
  # The gate's own pings would be unexpected frames in the cases' transcripts.
  heartbeat: {{interval_seconds: 3600}}
routes:
  - path: /
""")


def run_client_leg(exe, peer, work, cases, through_gate, bearer):
    """wstest fuzzingclient against the echo server, directly or through the gate."""
    procs = Procs(work / "logs")
    try:
        up = free_port()
        procs.spawn("echo", peer.program + ["serve", "--listen", f"127.0.0.1:{up}"], up,
                    start_seconds=60)
        url = f"ws://127.0.0.1:{up}/"
        if through_gate:
            gate_policy(work / "policy" / "policy.yaml", up)
            port = free_port()
            procs.spawn("wsgate", gate_command(work / "policy" / "policy.yaml", port), port)
            url = f"ws://127.0.0.1:{port}/?access_token={bearer}"
        agent = "wsgate" if through_gate else peer.agent
        spec = {"outdir": str(work / "report"), "servers": [{"agent": agent, "url": url}],
                "cases": cases, "exclude-cases": [], "exclude-agent-cases": {}}
        (work / "spec.json").write_text(json.dumps(spec))
        with open(work / "logs" / "wstest.log", "ab") as log:
            subprocess.run([str(exe), "-m", "fuzzingclient", "-s", str(work / "spec.json")],
                           cwd=work, stdout=log, stderr=log, timeout=RUN_SECONDS, check=True)
        return agent
    finally:
        procs.stop()


def run_upstream_leg(exe, peer, work, cases, through_gate, bearer):
    """The testee client against wstest fuzzingserver, directly or through the gate."""
    procs = Procs(work / "logs")
    try:
        up = free_port()
        spec = {"url": f"ws://127.0.0.1:{up}", "outdir": str(work / "report"),
                "cases": cases, "exclude-cases": [], "exclude-agent-cases": {}}
        (work / "spec.json").write_text(json.dumps(spec))
        # wstest (Python 2.7, Twisted) takes seconds to listen on a loaded machine.
        procs.spawn("wstest", [str(exe), "-m", "fuzzingserver", "-s", str(work / "spec.json"),
                               "--webport", "0"], up, cwd=work, start_seconds=60)
        url, headers = f"ws://127.0.0.1:{up}", []
        if through_gate:
            gate_policy(work / "policy" / "policy.yaml", up)
            port = free_port()
            procs.spawn("wsgate", gate_command(work / "policy" / "policy.yaml", port), port)
            url, headers = f"ws://127.0.0.1:{port}", ["--header", f"Authorization: Bearer {bearer}"]
        agent = "wsgate" if through_gate else peer.agent
        out = subprocess.run(peer.program + [peer.testee, "--url", url, "--agent", agent]
                             + headers, capture_output=True, text=True, timeout=RUN_SECONDS)
        if out.returncode != 0:
            sys.exit(f"autobahn: the {peer.agent} testee client failed: {out.stderr.strip()}")
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


def compare(what, direct, gate):
    """The gate's cases that are neither fine nor the same as in the direct run."""
    failures = []
    for case_id in sorted(gate, key=case_key):
        b = gate[case_id]["behavior"]
        base = direct.get(case_id, {}).get("behavior")
        if b in FINE or (b in TOLERATED and b == base):
            continue
        failures.append(f"{what} case {case_id}: {b} through the gate (direct: {base}); "
                        f"{gate[case_id].get('reportfile')}")
    return failures


def one_run(exe, peer, leg, through_gate, cases, tmp, bearer):
    """One run of a leg: its results by case id, and a line saying what they were."""
    name = f"{leg}-{'gate' if through_gate else 'direct'}"
    work = Path(tmp) / peer.agent / name
    (work / "policy").mkdir(parents=True)
    started = time.monotonic()
    run = run_client_leg if leg == "client" else run_upstream_leg
    got = results(work, run(exe, peer, work, cases, through_gate, bearer))
    behavior, close = summary(got)
    print(f"autobahn {name:16} {peer.agent:11} {len(got)} cases in "
          f"{time.monotonic() - started:.0f} s; behavior {dict(sorted(behavior.items()))}; "
          f"close {dict(sorted(close.items()))}", flush=True)
    return got


def test_leg(exe, peer, leg, cases, tmp, bearer):
    """A leg through the gate against its direct baseline: the failures."""
    if not peer.heavy:
        direct = one_run(exe, peer, leg, False, cases, tmp, bearer)
        gate = one_run(exe, peer, leg, True, cases, tmp, bearer)
        return compare(f"{leg} leg ({peer.agent})", direct, gate)
    gate = one_run(exe, peer, leg, True, cases, tmp, bearer)
    # A case OK or INFORMATIONAL through the gate passes whatever the direct run says; the
    # others need its verdict (NON-STRICT and UNIMPLEMENTED pass when it shares them, and a
    # FAILED case's line says what it was directly).
    need = sorted((c for c, r in gate.items() if r["behavior"] not in FINE), key=case_key)
    direct = {}
    if need:
        direct = one_run(exe, peer, leg, False, need, tmp, bearer)
    else:
        print(f"autobahn {leg + '-direct':16} {peer.agent:11} not run: every case passed "
              f"through the gate", flush=True)
    return compare(f"{leg} leg ({peer.agent})", direct, gate)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=CASES, help=f"comma-separated (default {CASES})")
    ap.add_argument("--python", help="the Python 2.7 interpreter for the virtualenv")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--keep", help="keep the reports in this directory")
    opts = ap.parse_args()
    plain, deflate = split_cases(opts.cases.split(","))
    if not opts.no_build:
        build()
    exe = wstest(opts.python)
    bearer = token(sub="autobahn", ttl="4h")
    sets = [(peer, cases) for peer, cases in ((tungstenite, plain), (websockets, deflate)) if cases]
    failures = []
    tmp = tempfile.mkdtemp(prefix="wsgate-autobahn-")
    try:
        for make_peer, cases in sets:
            peer = make_peer()
            legs = [functools.partial(test_leg, exe, peer, leg, cases, tmp, bearer)
                    for leg in ("client", "upstream")]
            if peer.heavy:
                # Each leg is a ping-pong between two single-threaded processes: side by
                # side, the two legs keep both cores busy.
                with concurrent.futures.ThreadPoolExecutor(len(legs)) as pool:
                    for done in [pool.submit(leg) for leg in legs]:
                        failures += done.result()
            else:
                for leg in legs:
                    failures += leg()
    finally:
        if opts.keep:
            shutil.copytree(tmp, opts.keep, dirs_exist_ok=True)
            print(f"autobahn: reports in {opts.keep}")
        shutil.rmtree(tmp, ignore_errors=True)
    for f in failures:
        print(f"autobahn: {f}")
    if failures:
        sys.exit(1)
    print("autobahn: 0 FAILED on both legs; every non-OK case matches the direct run's own")


if __name__ == "__main__":
    main()
