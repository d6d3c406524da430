"""Python `websockets` peers with permessage-deflate, driven by tests/compression.rs.

    python deflate.py server [default|no_context|windows]
        An echo server on 127.0.0.1 (free port) that negotiates permessage-deflate with the
        given settings. Prints {"port": N} once listening, then serves until stdin closes.
        The message "extensions?" is answered with the Sec-WebSocket-Extensions the server
        was offered and the one it answered, as JSON.
    python deflate.py client URL [default|no_context|windows]
        Connects with permessage-deflate offered with the given settings, sends JSON-like
        text and binary messages, checks every echo, then asks "extensions?". Prints
        {"ok": bool, "answer": the 101's Sec-WebSocket-Extensions, "upstream": {...},
        "echoed": N} or {"ok": false, "error": ...}.
"""
import asyncio
import json
import sys

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.extensions.permessage_deflate import (
    ClientPerMessageDeflateFactory,
    ServerPerMessageDeflateFactory,
)

SERVER = {
    # websockets' own default: 12-bit windows both ways, context taken over.
    "default": dict(server_max_window_bits=12, client_max_window_bits=12),
    "no_context": dict(server_no_context_takeover=True, client_no_context_takeover=True),
    "windows": dict(server_max_window_bits=9, client_max_window_bits=10),
}
CLIENT = {
    # What browsers offer.
    "default": dict(client_max_window_bits=True),
    "no_context": dict(server_no_context_takeover=True, client_no_context_takeover=True),
    "windows": dict(server_max_window_bits=10, client_max_window_bits=11),
}


def done(result):
    print(json.dumps(result), flush=True)


def json_text(i):
    rows = [{"id": i * 100 + n, "user": f"user-{n % 7}", "room": "lobby", "ok": n % 3 == 0,
             "text": f"message {n} of {i}"} for n in range(150)]
    return json.dumps(rows)


async def server(settings):
    async def echo(ws):
        offered = ws.request.headers.get("Sec-WebSocket-Extensions")
        answered = ws.response.headers.get("Sec-WebSocket-Extensions")
        async for message in ws:
            if message == "extensions?":
                await ws.send(json.dumps({"offered": offered, "answered": answered}))
            else:
                await ws.send(message)

    factory = ServerPerMessageDeflateFactory(**SERVER[settings])
    async with serve(echo, "127.0.0.1", 0, extensions=[factory], compression=None,
                     max_size=None, ping_interval=None) as srv:
        port = srv.sockets[0].getsockname()[1]
        done({"port": port})
        loop = asyncio.get_running_loop()
        # Serve until the test closes our stdin (or kills us).
        await loop.run_in_executor(None, sys.stdin.read)


async def client(url, settings):
    factory = ClientPerMessageDeflateFactory(**CLIENT[settings])
    try:
        async with connect(url, extensions=[factory], compression=None, max_size=None,
                           ping_interval=None, open_timeout=5) as ws:
            answer = ws.response.headers.get("Sec-WebSocket-Extensions")
            echoed = 0
            for i in range(20):
                message = json_text(i) if i % 2 == 0 else json_text(i).encode() * 2
                await ws.send(message)
                got = await asyncio.wait_for(ws.recv(), timeout=5)
                if got != message:
                    return done({"ok": False, "error": f"echo {i} differs"})
                echoed += 1
            await ws.send("extensions?")
            upstream = json.loads(await asyncio.wait_for(ws.recv(), timeout=5))
            return done({"ok": True, "answer": answer, "upstream": upstream, "echoed": echoed})
    except Exception as e:  # what the test reports
        return done({"ok": False, "error": repr(e)})


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "server":
        asyncio.run(server(sys.argv[2] if len(sys.argv) > 2 else "default"))
    elif mode == "client":
        asyncio.run(client(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "default"))
    else:
        sys.exit("usage: deflate.py server [SETTINGS] | client URL [SETTINGS]")
