"""What the scripts under benches/ share: paths, ports, processes, tokens.

Only the standard library. Every process started through `Procs` is stopped by
`Procs.stop()`, which the scripts call in a `finally`.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Where `build()` puts the binaries: cargo's CARGO_TARGET_DIR if set (relative to ROOT,
# where cargo runs), else target/.
RELEASE = ROOT / (os.environ.get("CARGO_TARGET_DIR") or "target") / "release"
SECRET = "bench-secret-bench-secret-bench-secret-0123"


def build():
    """The release binaries of the gate and of the load generator."""
    subprocess.run(["cargo", "build", "--release", "--locked", "-p", "wsgate", "-p", "wsload"],
                   cwd=ROOT, check=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, seconds=10):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def token(sub="bench", ttl="2h"):
    """An HS256 token for SECRET, minted by `wsgate token`."""
    out = subprocess.run([str(RELEASE / "wsgate"), "token", "--secret-env", "BENCH_SECRET",
                          "--sub", sub, "--ttl", ttl], capture_output=True, text=True,
                         env={**os.environ, "BENCH_SECRET": SECRET}, check=True)
    return out.stdout.strip()


def gate_command(policy, port, *extra):
    """`wsgate run` on plaintext 127.0.0.1:port with JSON logs and no admin listener."""
    return [str(RELEASE / "wsgate"), "run", "--policy", str(policy), "--plaintext",
            "--listen", f"127.0.0.1:{port}", "--admin", "off", "--log-format", "json",
            *extra]


class Procs:
    """Servers started together and stopped together, each logging to logs/NAME.log."""

    def __init__(self, logs, prefix=()):
        self.logs = Path(logs)
        self.prefix = list(prefix)
        self.procs = {}
        self.ports = {}

    def spawn(self, name, cmd, port, log=True, cwd=None, env=None, start_seconds=10):
        self.logs.mkdir(parents=True, exist_ok=True)
        out = open(self.logs / f"{name}.log", "ab") if log else subprocess.DEVNULL
        proc = subprocess.Popen(self.prefix + list(cmd), stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=cwd,
                                env=env)
        self.procs[name] = proc
        if port is not None:
            if not wait_port(port, proc, start_seconds):
                self.stop()
                sys.exit(f"{name} did not start (see {self.logs / (name + '.log')})")
            self.ports[name] = port
        return proc

    def alias(self, name, existing):
        self.procs[name] = self.procs[existing]
        self.ports[name] = self.ports[existing]

    def stop(self):
        for proc in {id(p): p for p in self.procs.values()}.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
        self.procs.clear()
        self.ports.clear()
