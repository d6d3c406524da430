#!/usr/bin/env python3
"""wsgate's benchmark harness: wsgate against a direct connection, nginx and HAProxy.

One run measures every target in front of the same echo upstream (`wsload serve`),
round-robin over the repetitions, servers pinned to CPU 0 and the load to CPU 1 with
taskset. It prints the medians, the ratios to direct and wsgate's ratio to the best of
nginx and HAProxy, and writes a markdown report and a JSON file.

    python3 benches/run.py                 # the full run (3 repetitions, ~20 minutes)
    python3 benches/run.py --smoke         # 1 short repetition, small N (seconds; CI)

The compressed rows (`--deflate`) go to an upstream of their own, `wsload serve --deflate`,
which accepts permessage-deflate and sends each frame back as it came: nginx and HAProxy
pass the compressed frames blindly, wsgate relays them with `messages: {compression: pass}`
(inflating a copy of each message to check it). wsgate's ratio to nginx on those rows is the
target the issue set (TARGETS).

The HTTP/2 rows (RFC 8441: WebSockets as extended CONNECT streams, h2c with prior
knowledge) run on wsgate alone, since nginx and HAProxy do not proxy them; each is read
against wsgate's HTTP/1.1 row of the same run (H2_VERSUS).

Only the standard library; nginx and HAProxy come from Debian's packages (skipped, and
said so, when missing). Every process started here is stopped before it returns.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RELEASE, ROOT, SECRET, Procs, build, free_port, gate_command  # noqa: E402

ORIGIN = "https://app.example"

# test name -> (load mode, arguments, targets, headline metric)
ECHO_TARGETS = ["direct", "nginx", "haproxy", "wsgate"]
PROXIES = ["nginx", "haproxy"]
LOWER_IS_BETTER = {"kib_per_connection", "rss_growth_kib"}
# Tests on servers started for them (see tests()).
FRESH = {"hold compressed", "big message 16 MiB"}
# test -> (proxy, least ratio of wsgate to it): targets printed with the report (never
# enforced: a shared machine's noise must not fail a run).
TARGETS = {"echo 16 KiB JSON compressed C=50": ("nginx", 0.8)}
# The HTTP/2 rows (RFC 8441 WebSockets on extended CONNECT streams; wsgate only: nginx and
# HAProxy do not proxy them) -> (the HTTP/1.1 row each is read against, on wsgate in the
# same run, and the least ratio the issue set, or None where the ratio is only reported).
# `--only` that picks an HTTP/2 row runs its HTTP/1.1 row too (on wsgate alone if that row
# was not picked itself).
H2_ECHO = "echo 64 B over h2 C=50 on 5 connections"
H2_UPGRADES = "upgrades/s over one h2 connection"
H2_VERSUS = {H2_ECHO: ("echo 64 B C=50", 0.8), H2_UPGRADES: ("connect C=16", None)}
# wsgate's compressed route, and what it needs there (`compression: pass` relays
# permessage-deflate; a gate that does not know the field refuses the policy).
DEFLATE_PATH = "/deflate"
DEFLATE_MESSAGES = "{compression: pass}"

# wsgate with a token (a pool of clients, each with its own) and an Origin check:
# target -> (route, algorithm, pool size). "warm": 1,000 tokens, which the gate's table of
# verified tokens (4,096) holds after their first round; "cold": 10,000, used in turn, so
# that every upgrade pays a full verification.
AUTH = {
    "wsgate-auth": ("/auth", "HS256", 1000),
    "wsgate-es256": ("/auth-es256", "ES256", 1000),
    "wsgate-es256-cold": ("/auth-es256", "ES256", 10000),
    "wsgate-rs256": ("/auth-rs256", "RS256", 1000),
    "wsgate-rs256-cold": ("/auth-rs256", "RS256", 10000),
}
KEYS = {"ES256": ROOT / "tests/keys/ec", "RS256": ROOT / "tests/keys/rsa"}


def tests(smoke):
    d = ["-d", "0.5", "--warmup", "0.2"] if smoke else ["-d", "5", "--warmup", "1"]
    n_hold = "200" if smoke else "9000"
    hold_s = "1" if smoke else "30"
    n_big = "1" if smoke else "3"
    # Compressed connections each carry one 16 KiB message each way, then idle: what a
    # target keeps per compressed connection after a message. The window is short (the
    # plain hold row measures idle CPU).
    n_hold_z = "100" if smoke else "9000"
    hold_z_s = "0.2" if smoke else "5"
    return [
        # Hold first in every repetition: each repetition starts fresh servers, so the
        # RSS per connection is measured on a process that has not yet grown for load.
        ("hold", "hold", ["-n", n_hold, "-d", hold_s], ECHO_TARGETS, "kib_per_connection"),
        ("hold TLS", "hold", ["-n", n_hold, "-d", hold_s], ["nginx-tls", "wsgate-tls"],
         "kib_per_connection"),
        # On servers of their own, like hold's: the heap freed by hold's connections would
        # absorb these.
        ("hold compressed", "hold", ["-n", n_hold_z, "-d", hold_z_s, "--deflate"], ECHO_TARGETS,
         "kib_per_connection"),
        ("echo 64 B C=50", "echo", ["-c", "50", "-s", "64"] + d, ECHO_TARGETS, "messages_per_s"),
        # The same 50 WebSockets as streams over 5 h2c connections (10 each), right after
        # their HTTP/1.1 row so that the two share the machine's moment.
        (H2_ECHO, "echo", ["-c", "50", "-s", "64", "--h2", "5"] + d, ["wsgate"],
         "messages_per_s"),
        ("echo 16 KiB C=50", "echo", ["-c", "50", "-s", "16384"] + d, ECHO_TARGETS, "mb_per_s"),
        # JSON-like text that deflate shrinks ~5x, compressed on both legs; MB/s of message
        # (inflated) bytes, the wire's beside it.
        ("echo 16 KiB JSON compressed C=50", "echo", ["-c", "50", "-s", "16384", "--deflate"] + d,
         ECHO_TARGETS, "mb_per_s"),
        # The same with 1,024 different messages sent in turn: more than wsgate remembers
        # as already checked (128 per worker thread), so that it inflates every one.
        ("echo 16 KiB JSON compressed, all distinct C=50", "echo",
         ["-c", "50", "-s", "16384", "--deflate", "--distinct", "1024"] + d, ECHO_TARGETS,
         "mb_per_s"),
        ("echo 1 MiB C=10", "echo", ["-c", "10", "-s", "1048576"] + d, ECHO_TARGETS, "mb_per_s"),
        ("connect C=16", "connect", ["-c", "16"] + d, ECHO_TARGETS + list(AUTH),
         "upgrades_per_s"),
        # 16 workers opening WebSocket streams on one h2c connection opened before the
        # load: extended CONNECT, 200, one echo, close; beside connect C=16, which opens a
        # TCP connection for every upgrade. Each client ends its half of the stream right
        # behind its close frame (wsload's `--h2-end early`); `late` (END_STREAM after the
        # close handshake) runs as well (docs/performance.md, HTTP/2).
        (H2_UPGRADES, "connect", ["-c", "16", "--h2", "1"] + d, ["wsgate"], "upgrades_per_s"),
        ("TLS connect C=16", "connect", ["-c", "16"] + d, ["nginx-tls", "wsgate-tls"],
         "upgrades_per_s"),
        ("TLS resumed C=16", "connect", ["-c", "16", "--resume"] + d,
         ["nginx-tls", "wsgate-tls"], "upgrades_per_s"),
        # On servers of their own (main restarts them): a heap grown by the loads before,
        # hold's 9,000 connections above all, absorbs most of the message and hides it.
        ("big message 16 MiB", "big", ["-s", str(16 << 20), "-n", n_big], ECHO_TARGETS,
         "rss_growth_kib"),
    ]


class Servers:
    """The upstreams and every proxy, started together and stopped together."""

    # Said once a run: this wsgate refuses `compression: pass`.
    told_no_deflate = False

    def __init__(self, work, taskset, have):
        self.work = work
        self.have = have
        # Logs go beside, not into, the directory wsgate watches for policy changes.
        self.p = Procs(work / "logs", taskset)
        self.procs = self.p.procs
        self.ports = self.p.ports

    def spawn(self, name, cmd, port, log):
        self.p.spawn(name, cmd, port, log)

    def start(self):
        w = self.work
        up = free_port()
        self.spawn("upstream", [str(RELEASE / "wsload"), "serve", "--listen",
                                f"127.0.0.1:{up}"], up, False)
        upz = free_port()
        self.spawn("upstream-deflate", [str(RELEASE / "wsload"), "serve", "--deflate",
                                        "--listen", f"127.0.0.1:{upz}"], upz, False)
        pol = w / "policy"
        pol.mkdir(exist_ok=True)
        (pol / "secret").write_text(SECRET)
        (pol / "policy.yaml").write_text(f"""version: 1
max_connections: 100000
defaults:
  upstream: ws://127.0.0.1:{up}
  auth: {{required: false}}
  origin: {{allow_missing: true}}
  messages: {{per_second: 100000000, burst: 100000000, max_frame_bytes: 2097152, max_message_bytes: 2097152}}
  rate: {{upgrades_per_second: 1000000, burst: 1000000, max_connections_per_ip: 100000, max_connections_per_subject: 100000}}
routes:
  - path: /ws
  - path: /big
    messages: {{max_frame_bytes: 33554432, max_message_bytes: 33554432}}
  - path: /auth
    auth: {{required: true, algorithms: [HS256], keys: [{{hmac_secret_file: secret}}]}}
    origin: {{allow: ["{ORIGIN}"], allow_missing: false}}
  - path: /auth-es256
    auth: {{required: true, algorithms: [ES256], keys: [{{public_key_file: "{KEYS['ES256']}.pub.pem"}}]}}
    origin: {{allow: ["{ORIGIN}"], allow_missing: false}}
  - path: /auth-rs256
    auth: {{required: true, algorithms: [RS256], keys: [{{public_key_file: "{KEYS['RS256']}.pub.pem"}}]}}
    origin: {{allow: ["{ORIGIN}"], allow_missing: false}}
  - path: {DEFLATE_PATH}
    upstream: ws://127.0.0.1:{upz}
""")
        self.deflate_route(pol / "policy.yaml")
        gate = [str(RELEASE / "wsgate"), "run", "--policy", str(pol / "policy.yaml"),
                "--admin", "off", "--log-format", "json"]
        port = free_port()
        self.spawn("wsgate", gate_command(pol / "policy.yaml", port), port, True)
        port = free_port()
        self.spawn("wsgate-tls", gate + ["--listen", f"127.0.0.1:{port}",
                                         "--tls-cert", str(ROOT / "certs/localhost.pem"),
                                         "--tls-key", str(ROOT / "certs/localhost.key")],
                   port, True)
        if "nginx" in self.have:
            plain, tls = free_port(), free_port()
            p = w / "nginx"
            (p / "logs").mkdir(parents=True, exist_ok=True)
            (p / "nginx.conf").write_text(f"""worker_processes 1;
daemon off;
master_process off;
worker_rlimit_nofile 20000;
pid {p}/nginx.pid;
error_log {p}/logs/error.log warn;
events {{ worker_connections 19500; }}
http {{
  access_log {p}/logs/access.log;
  client_body_temp_path {p}/body; proxy_temp_path {p}/proxy; fastcgi_temp_path {p}/fcgi;
  uwsgi_temp_path {p}/uwsgi; scgi_temp_path {p}/scgi;
  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
  upstream echo {{ server 127.0.0.1:{up}; }}
  upstream echo_deflate {{ server 127.0.0.1:{upz}; }}
  proxy_http_version 1.1;
  proxy_set_header Upgrade $http_upgrade;
  proxy_set_header Connection $connection_upgrade;
  proxy_read_timeout 3600s;
  proxy_send_timeout 3600s;
  server {{
    listen 127.0.0.1:{plain};
    listen 127.0.0.1:{tls} ssl;
    ssl_certificate {ROOT}/certs/localhost.pem;
    ssl_certificate_key {ROOT}/certs/localhost.key;
    location / {{ proxy_pass http://echo; }}
    # Sec-WebSocket-Extensions passes both ways, as every header nginx does not set.
    location {DEFLATE_PATH} {{ proxy_pass http://echo_deflate; }}
  }}
}}
""")
            self.spawn("nginx", [self.have["nginx"], "-p", str(p), "-c", str(p / "nginx.conf")],
                       plain, True)
            self.ports["nginx-tls"] = tls
            self.procs["nginx-tls"] = self.procs["nginx"]
        if "haproxy" in self.have:
            port = free_port()
            (w / "haproxy.cfg").write_text(f"""global
  maxconn 9300
defaults
  mode http
  log stdout format raw local0
  option httplog
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  timeout tunnel 1h
frontend fe
  bind 127.0.0.1:{port}
  use_backend be_deflate if {{ path_beg {DEFLATE_PATH} }}
  default_backend be
backend be
  server s1 127.0.0.1:{up}
backend be_deflate
  server s1 127.0.0.1:{upz}
""")
            self.spawn("haproxy", [self.have["haproxy"], "-f", str(w / "haproxy.cfg"), "-db"],
                       port, True)
        self.p.alias("direct", "upstream")
        for target in AUTH:
            self.p.alias(target, "wsgate")

    def deflate_route(self, policy):
        """Adds `messages: {compression: pass}` to the compressed route (the policy's last)
        if this wsgate accepts it; one that does not keeps the route without it, and its
        compressed rows fail at the 101 (permessage-deflate not accepted), not the run."""
        plain = policy.read_text()
        policy.write_text(plain + f"    messages: {DEFLATE_MESSAGES}\n")
        check = subprocess.run([str(RELEASE / "wsgate"), "check", str(policy)],
                               capture_output=True, text=True)
        if check.returncode != 0:
            policy.write_text(plain)
            if not Servers.told_no_deflate:
                Servers.told_no_deflate = True
                why = (check.stderr or check.stdout).strip().splitlines()
                print(f"bench: this wsgate refuses messages: {DEFLATE_MESSAGES} "
                      f"({why[0] if why else check.returncode}); its compressed rows will fail")

    def stop(self):
        self.p.stop()


def mint(work, smoke=False):
    """The token pools of AUTH, minted by `wsload tokens`: target -> file. The smoke run
    takes 100 of each (minting 10,000 RS256 tokens takes seconds; it checks nothing)."""
    pools = {}
    for target, (_, alg, n) in AUTH.items():
        n = min(n, 100) if smoke else n
        path = work / f"tokens-{alg}-{n}.txt"
        if not path.exists():
            cmd = [str(RELEASE / "wsload"), "tokens", "--alg", alg, "-n", str(n),
                   "--out", str(path)]
            if alg in KEYS:
                cmd += ["--key", f"{KEYS[alg]}.key"]
            subprocess.run(cmd, check=True, capture_output=True,
                           env={**os.environ, "BENCH_SECRET": SECRET})
        pools[target] = path
    return pools


def load(servers, taskset_load, mode, args, target, pools):
    deflate = "--deflate" in args
    # The compressed rows' direct target is their own upstream.
    server = "upstream-deflate" if deflate and target == "direct" else target
    port = servers.ports[server]
    tls = target.endswith("-tls")
    # wsgate's /big route lets the 16 MiB message through; nginx and HAProxy proxy every path
    # (DEFLATE_PATH to the compressed upstream).
    path = (AUTH[target][0] if target in AUTH else "/big" if mode == "big"
            else DEFLATE_PATH if deflate else "/ws")
    cmd = taskset_load + [str(RELEASE / "wsload"), mode,
                          "--url", f"{'wss' if tls else 'ws'}://{'localhost' if tls else '127.0.0.1'}:{port}{path}"]
    if tls:
        cmd += ["--no-verify"]
    if target in AUTH:
        cmd += ["--tokens", str(pools[target]), "--header", f"Origin: {ORIGIN}"]
    # The target's process: hold and big measure its RSS, echo and connect its CPU.
    cmd += ["--pid", str(servers.procs[server].pid)]
    out = subprocess.run(cmd + args, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        return {"failed": out.stderr.strip()[-300:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def metric(result, name):
    value = result.get(name)
    return value if isinstance(value, (int, float)) else None


# The unit of each rate a row's CPU is divided by (target CPU per message or per upgrade).
PER = {"messages_per_s": "message", "upgrades_per_s": "upgrade"}


def cpu_us(result, key):
    """The target's CPU time per message or upgrade, in µs: its share of a core over the
    window divided by the rate. Steadier than the rate on a shared machine, where the
    target gets what CPU the machine's other work leaves it."""
    cpu, rate = metric(result, "target_cpu_percent_of_core"), metric(result, key)
    return cpu / 100 / rate * 1e6 if key in PER and cpu is not None and rate else None


def p99(result):
    return (result.get("latency") or {}).get("p99_ms")


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, digits=1):
    if value is None:
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="1 short repetition, small N")
    ap.add_argument("--out", default=str(ROOT / "benches" / "results"))
    ap.add_argument("--only", help="run only tests whose name contains this (or one of "
                    "these, comma-separated)")
    ap.add_argument("--no-build", action="store_true")
    opts = ap.parse_args()
    reps = 1 if opts.smoke else opts.reps

    if not opts.no_build:
        build()
    have = {}
    for name in ("nginx", "haproxy"):
        path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
        if path:
            have[name] = path
        else:
            print(f"bench: {name} not installed; its rows are skipped")
    taskset = shutil.which("taskset") and os.cpu_count() and os.cpu_count() >= 2
    pin_servers = ["taskset", "-c", "0"] if taskset else []
    pin_load = ["taskset", "-c", "1"] if taskset else []
    if not taskset:
        print("bench: taskset or a second CPU missing; nothing is pinned")

    plan = select(tests(opts.smoke), opts.only.split(",") if opts.only else None)
    results = {name: {} for name, *_ in plan}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="wsgate-bench-") as tmp:
        work = Path(tmp)
        pools = mint(work, opts.smoke)
        for rep in range(reps):
            servers = Servers(work, pin_servers, have)
            try:
                servers.start()
                for i, (name, mode, args, targets, _) in enumerate(plan):
                    if name in FRESH and i > 0:
                        # Its own fresh servers (see tests()).
                        servers.stop()
                        servers.start()
                    # Each repetition starts one target later, so no target always runs
                    # right after the same one (a connect run leaves tens of thousands of
                    # sockets in TIME_WAIT for a minute, which slows the next run).
                    shift = rep % len(targets)
                    for target in targets[shift:] + targets[:shift]:
                        if target not in servers.ports:
                            continue
                        r = load(servers, pin_load, mode, args, target, pools)
                        results[name].setdefault(target, []).append(r)
                        brief = r.get("failed") or {k: r.get(k) for k in (
                            "messages_per_s", "mb_per_s", "wire_mb_per_s", "upgrades_per_s",
                            "kib_per_connection", "rss_growth_kib", "alive",
                            "cpu_percent_of_core", "target_cpu_percent_of_core",
                            "load_cpu_percent_of_core") if k in r}
                        print(f"[{rep + 1}/{reps}] {name:18} {target:12} {brief}", flush=True)
                        time.sleep(0.2 if opts.smoke else 1)
            finally:
                servers.stop()

    report = summarize(plan, results, reps, bool(taskset), time.time() - started)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"bench-{stamp}.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (out / f"bench-{stamp}.md").write_text(md)
    print(md)
    for line in target_lines(report):
        print(f"bench: {line}")
    print(f"bench: wrote {out}/bench-{stamp}.md and .json")


def select(plan, only):
    """The tests whose name contains one of `only` (all without it), and the HTTP/1.1 row
    of each HTTP/2 row picked, on wsgate alone unless that row was picked itself."""
    if not only:
        return plan
    picked = {t[0] for t in plan if any(o in t[0] for o in only)}
    pulled = {H2_VERSUS[name][0] for name in picked if name in H2_VERSUS} - picked
    return [(name, mode, args, ["wsgate"] if name in pulled else targets, key)
            for name, mode, args, targets, key in plan if name in picked | pulled]


def summarize(plan, results, reps, pinned, seconds):
    rows = []
    for name, mode, args, targets, key in plan:
        med = {}
        for target, runs in results[name].items():
            med[target] = {
                "value": median(metric(r, key) for r in runs),
                "p99_ms": median(p99(r) for r in runs),
                "alive": median(metric(r, "alive") for r in runs),
                "cpu_percent_of_core": median(metric(r, "cpu_percent_of_core") for r in runs),
                "mb_per_s": median(metric(r, "mb_per_s") for r in runs),
                "wire_mb_per_s": median(metric(r, "wire_mb_per_s") for r in runs),
                "target_cpu": median(metric(r, "target_cpu_percent_of_core") for r in runs),
                "target_cpu_us": median(cpu_us(r, key) for r in runs),
                "load_cpu": median(metric(r, "load_cpu_percent_of_core") for r in runs),
                "failed": [r["failed"] for r in runs if "failed" in r],
                "errors": [r.get("errors") for r in runs if r.get("errors")],
            }
        lower_is_better = key in LOWER_IS_BETTER
        direct = (med.get("direct") or {}).get("value")
        proxies = [med[p]["value"] for p in med if p.split("-")[0] in PROXIES
                   and med[p]["value"] is not None]
        best = (min(proxies) if lower_is_better else max(proxies)) if proxies else None
        for target, m in med.items():
            v = m["value"]
            m["ratio_to_direct"] = v / direct if v is not None and direct else None
            if target.startswith("wsgate") and best:
                m["ratio_to_best_proxy"] = v / best if v is not None else None
        plain = med.get("wsgate", {}).get("value")
        for target in AUTH:
            if target in med and plain:
                a = med[target]["value"]
                med[target]["ratio_to_wsgate"] = a / plain if a else None
        row = {"test": name, "mode": mode, "args": args, "metric": key,
               "lower_is_better": lower_is_better, "best_proxy": best, "targets": med,
               "runs": results[name]}
        if name in TARGETS:
            proxy, least = TARGETS[name]
            v = (med.get("wsgate") or {}).get("value")
            p = (med.get(proxy) or {}).get("value")
            ratio = v / p if v is not None and p else None
            row["target"] = {"proxy": proxy, "least": least, "ratio": ratio,
                             "met": ratio >= least if ratio is not None else None}
        rows.append(row)
    # Each HTTP/2 row against wsgate's HTTP/1.1 row of the same run: the ratio of the
    # medians, and of each repetition's pair (run a few seconds apart).
    by_name = {r["test"]: r for r in rows}
    for name, (versus, least) in H2_VERSUS.items():
        if name not in by_name or versus not in by_name:
            continue
        h2 = (by_name[name]["targets"].get("wsgate") or {}).get("value")
        h1 = (by_name[versus]["targets"].get("wsgate") or {}).get("value")
        ratio = h2 / h1 if h2 is not None and h1 else None
        key = by_name[name]["metric"]
        pairs = [metric(a, key) / metric(b, key) if metric(a, key) is not None and metric(b, key)
                 else None for a, b in zip(results[name].get("wsgate", []),
                                           results[versus].get("wsgate", []))]
        cpu = (by_name[name]["targets"].get("wsgate") or {}).get("target_cpu_us")
        cpu1 = (by_name[versus]["targets"].get("wsgate") or {}).get("target_cpu_us")
        by_name[name]["versus_http1"] = {
            "test": versus, "ratio": ratio, "least": least,
            "cpu_per_op_ratio": cpu / cpu1 if cpu is not None and cpu1 else None,
            "met": None if least is None or ratio is None else ratio >= least,
            "per_repetition": pairs, "median_of_pairs": median(pairs)}
    # The compressed hold beside the plain one: what compression adds per connection (not
    # for direct, whose two rows measure two different upstreams).
    by_name = {r["test"]: r for r in rows}
    if "hold compressed" in by_name and "hold" in by_name:
        for target, m in by_name["hold compressed"]["targets"].items():
            if target == "direct":
                continue
            plain = (by_name["hold"]["targets"].get(target) or {}).get("value")
            if m["value"] is not None and plain is not None:
                m["over_plain_kib"] = m["value"] - plain
    return {"reps": reps, "pinned": pinned, "seconds": round(seconds),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(), "tests": rows}


def markdown(report):
    lines = [f"# wsgate benchmark — {report['date']}", "",
             f"Medians of {report['reps']} round-robin repetition(s); "
             f"{'servers on CPU 0, load on CPU 1' if report['pinned'] else 'not pinned'}; "
             f"{report['seconds']} s in all. Ratios are within this run.", "",
             "| test | metric | target | median | p99 ms | ratio to direct | wsgate / best proxy | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for row in report["tests"]:
        for target, m in row["targets"].items():
            notes = []
            if m.get("ratio_to_wsgate") is not None:
                notes.append(f"{m['ratio_to_wsgate']:.2f}× of wsgate without auth")
            if row["mode"] == "hold":
                if m["alive"] is not None:
                    notes.append(f"{m['alive']:.0f} alive")
                if m["cpu_percent_of_core"] is not None:
                    notes.append(f"CPU {m['cpu_percent_of_core']:.2f}% of a core")
            if row["mode"] == "big" and m["mb_per_s"] is not None:
                notes.append(f"{fmt(m['mb_per_s'])} MB/s")
            if m.get("wire_mb_per_s") is not None:
                notes.append(f"wire {fmt(m['wire_mb_per_s'])} MB/s")
            if m.get("over_plain_kib") is not None:
                notes.append(f"{m['over_plain_kib']:+.1f} KiB over plain hold")
            v = row.get("versus_http1")
            if v and target == "wsgate":
                notes.append(versus_line(row["test"], v, short=True))
            if row["mode"] in ("echo", "connect") and m.get("target_cpu") is not None:
                load_cpu = m.get("load_cpu")
                per = (f" ({m['target_cpu_us']:.1f} µs per {PER[row['metric']]})"
                       if m.get("target_cpu_us") is not None else "")
                notes.append(f"CPU: target {m['target_cpu']:.0f} %{per}, load "
                             f"{'—' if load_cpu is None else f'{load_cpu:.0f}'} % of a core")
            t = row.get("target")
            if t and target == "wsgate":
                notes.append(target_line(row["test"], t, short=True))
            if m["failed"]:
                notes.append(f"failed: {m['failed'][0][:80]}")
            if m["errors"]:
                notes.append(f"errors: {m['errors'][0]}")
            ratio = m.get("ratio_to_best_proxy")
            if ratio is not None:
                versus = f"**{ratio:.2f}×**"
            elif target.startswith("wsgate") and row["best_proxy"] == 0:
                # A proxy whose RSS did not grow at all leaves no ratio: say so instead.
                versus = "best proxy 0"
            else:
                versus = ""
            lines.append("| {} | {} | {} | {} | {} | {} | {} | {} |".format(
                row["test"], row["metric"], target, fmt(m["value"], 2),
                fmt(m["p99_ms"], 2) if row["mode"] not in ("hold", "big") else "",
                fmt(m["ratio_to_direct"], 2) if m.get("ratio_to_direct") is not None else "",
                versus, "; ".join(notes)))
    return "\n".join(lines) + "\n"


def target_line(test, t, short=False):
    ratio = "—" if t["ratio"] is None else f"{t['ratio']:.2f}×"
    verdict = "no figure" if t["met"] is None else "met" if t["met"] else "NOT met"
    head = "" if short else f"{test}: "
    return f"{head}wsgate / {t['proxy']} {ratio} (target ≥ {t['least']}×: {verdict})"


def versus_line(test, v, short=False):
    ratio = "—" if v["ratio"] is None else f"{v['ratio']:.2f}×"
    pairs = ", ".join("—" if p is None else f"{p:.2f}" for p in v["per_repetition"])
    if v.get("median_of_pairs") is not None and len(v["per_repetition"]) > 1:
        pairs += f" (median {v['median_of_pairs']:.2f})"
    goal = ("reported" if v["least"] is None else
            f"target ≥ {v['least']}×: "
            f"{'no figure' if v['met'] is None else 'met' if v['met'] else 'NOT met'}")
    head = "" if short else f"{test}: "
    cpu = ("" if v.get("cpu_per_op_ratio") is None
           else f"; wsgate's CPU per operation {v['cpu_per_op_ratio']:.2f}× HTTP/1.1's")
    return (f"{head}{ratio} of wsgate's {v['test']} (HTTP/1.1; per repetition {pairs}; "
            f"{goal}){cpu}")


def target_lines(report):
    return ([target_line(row["test"], row["target"]) for row in report["tests"]
             if "target" in row]
            + [versus_line(row["test"], row["versus_http1"]) for row in report["tests"]
               if "versus_http1" in row])


if __name__ == "__main__":
    main()
