#!/usr/bin/env python3
"""Autobahn's counterparts with permessage-deflate: a Python `websockets` echo server and
testee client, for the compression cases (12.* and 13.*) that tungstenite cannot play.

    python autobahn_peer.py serve --listen HOST:PORT
        Echoes every text and binary message back as it came, on HOST:PORT, with
        permessage-deflate (websockets' defaults) and no keepalive pings.
    python autobahn_peer.py client --url ws://HOST:PORT --agent NAME [--header 'K: V']...
        Autobahn's testee-client protocol against `wstest -m fuzzingserver` at URL:
        /getCaseCount, then /runCase?case=N&agent=NAME for every case, echoing every
        message back, then /updateReports?agent=NAME. Offers permessage-deflate. Prints
        {"cases": N, "errors": {kind: count}}.

Runs under target/pyclients (websockets 15.x); benches/autobahn.py starts it.
"""

import argparse
import asyncio
import collections
import json
import sys

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import WebSocketException

# Autobahn's cases send messages of up to 16 MiB (9.*); 12.* and 13.* up to 128 KiB.
MAX_SIZE = 32 * 1024 * 1024
# Each case gets this long: longer than the fuzzing server's own 480 s, for it to decide.
# (12.5.15 alone, 1,000 messages of 128 KiB in 256-byte frames, takes over a minute on two
# busy cores.)
CASE_SECONDS = 600
# The fuzzing server writes every report before it answers /updateReports.
REPORT_SECONDS = 300


async def echo(ws):
    try:
        async for message in ws:
            await ws.send(message)
    except WebSocketException:
        pass


async def run_server(host, port):
    async with serve(echo, host, port, max_size=MAX_SIZE, ping_interval=None,
                     compression="deflate") as server:
        await server.serve_forever()


def dial(url, headers, **extra):
    # proxy=None: the cases run on loopback, whatever the environment's proxy settings say.
    return connect(url, additional_headers=headers, max_size=MAX_SIZE, ping_interval=None,
                   proxy=None, compression="deflate", **extra)


async def run_case(url, headers):
    async with dial(url, headers) as ws:
        async for message in ws:
            await ws.send(message)


async def run_client(base, agent, headers):
    async with dial(f"{base}/getCaseCount", headers) as ws:
        cases = int(await asyncio.wait_for(ws.recv(), CASE_SECONDS))
    errors = collections.Counter()
    for case in range(1, cases + 1):
        try:
            await asyncio.wait_for(
                run_case(f"{base}/runCase?case={case}&agent={agent}", headers), CASE_SECONDS)
        except (WebSocketException, OSError, asyncio.TimeoutError) as e:
            # What a case does to the connection is the report's business, not ours; the
            # kinds are counted so that a run that never connected is visible.
            errors[type(e).__name__] += 1
    async with dial(f"{base}/updateReports?agent={agent}", headers,
                    open_timeout=REPORT_SECONDS):
        pass
    return {"cases": cases, "errors": dict(sorted(errors.items()))}


def header(text):
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = ap.add_subparsers(dest="mode", required=True)
    s = modes.add_parser("serve", help="the echo server (the client leg's upstream)")
    s.add_argument("--listen", required=True, help="HOST:PORT, as `wsload serve --listen`")
    c = modes.add_parser("client", help="the testee client (the upstream leg's client)")
    c.add_argument("--url", required=True, help="the fuzzing server, ws://HOST:PORT")
    c.add_argument("--agent", required=True, help="the name the reports file it under")
    c.add_argument("--header", type=header, action="append", default=[],
                   help="an extra request header, 'Name: value' (repeatable)")
    opts = ap.parse_args()
    if opts.mode == "serve":
        host, _, port = opts.listen.rpartition(":")
        asyncio.run(run_server(host, int(port)))
        return
    try:
        result = asyncio.run(run_client(opts.url.rstrip("/"), opts.agent, opts.header))
    except (WebSocketException, OSError, asyncio.TimeoutError, ValueError) as e:
        sys.exit(f"autobahn_peer: {type(e).__name__}: {e}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
