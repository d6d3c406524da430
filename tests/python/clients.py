"""Python `websockets` clients driven by tests/python_clients.rs.

    python clients.py slow_reader URL SECONDS
        Asks the test upstream to stream ("flood 100000 1024") and reads one message every
        5 ms for SECONDS: a reader that is slow but alive. Prints {"received": N,
        "close": CODE or null, "reason": ...}.
    python clients.py flood_then_read URL
        Sends 300 messages of 4 KiB as fast as it can, then reads until the connection
        closes. Prints {"close": CODE or null, "error": ...}.
"""
import asyncio
import json
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


def done(result):
    print(json.dumps(result), flush=True)


async def slow_reader(url, seconds):
    received = 0
    async with connect(url, max_size=None, ping_interval=None) as ws:
        await ws.send("flood 100000 1024")
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        try:
            while loop.time() < end:
                await asyncio.wait_for(ws.recv(), timeout=5)
                received += 1
                await asyncio.sleep(0.01)
        except ConnectionClosed as e:
            rcvd = e.rcvd
            return done({"received": received, "close": rcvd.code if rcvd else None,
                         "reason": rcvd.reason if rcvd else str(e)})
        except asyncio.TimeoutError:
            return done({"received": received, "close": None, "reason": "stalled"})
    done({"received": received, "close": None, "reason": None})


async def burst_reader(url, count, size, pause):
    """One burst that the socket buffers hold whole, read a message at a time with a pause
    after each; then one echo to show the connection is still open."""
    received = 0
    async with connect(url, max_size=None, ping_interval=None, max_queue=4) as ws:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await ws.send(f"flood {count} {size}")
        try:
            while received < count:
                await asyncio.wait_for(ws.recv(), timeout=5)
                received += 1
                await asyncio.sleep(pause)
            await ws.send("still here")
            echo = await asyncio.wait_for(ws.recv(), timeout=5)
        except ConnectionClosed as e:
            rcvd = e.rcvd
            return done({"received": received, "close": rcvd.code if rcvd else None,
                         "reason": rcvd.reason if rcvd else str(e),
                         "seconds": loop.time() - started})
        except asyncio.TimeoutError:
            return done({"received": received, "close": None, "reason": "stalled"})
        done({"received": received, "close": None, "echo": echo,
              "seconds": loop.time() - started})


async def flood_then_read(url):
    async with connect(url, max_size=None) as ws:
        try:
            for _ in range(300):
                await ws.send("x" * 4096)
            while True:
                await asyncio.wait_for(ws.recv(), timeout=10)
        except ConnectionClosed as e:
            rcvd = e.rcvd
            return done({"close": rcvd.code if rcvd else None, "error": None if rcvd else str(e)})
        except Exception as e:  # a reset, a timeout: what the test is about
            return done({"close": None, "error": repr(e)})


if __name__ == "__main__":
    mode, url = sys.argv[1], sys.argv[2]
    if mode == "slow_reader":
        asyncio.run(slow_reader(url, float(sys.argv[3])))
    elif mode == "burst_reader":
        count, size, pause = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
        asyncio.run(burst_reader(url, count, size, pause))
    elif mode == "flood_then_read":
        asyncio.run(flood_then_read(url))
    else:
        sys.exit("usage: clients.py slow_reader URL SECONDS | flood_then_read URL")
