#!/usr/bin/env python3
"""A conforming WebSocket echo backend for the Autobahn run (scripts/autobahn.sh).

Python `websockets` (asyncio implementation): every message is sent back as it came
(text as text, binary as binary). No keepalive pings (`ping_interval=None`), so the
only frames on the wire are the ones the test suite provokes; permessage-deflate is
accepted when offered; no message size limit (Autobahn sends 16 MiB messages in 9.x).

    python3 scripts/echo_backend.py --host 127.0.0.1 --port 5080
    python3 scripts/echo_backend.py --port 0 --port-file /tmp/port   # a free port
"""

import argparse
import asyncio
import logging
import os
import signal

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed


async def echo(ws):
    try:
        async for message in ws:
            await ws.send(message)
    except ConnectionClosed:
        pass


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5080, help="0 picks a free port")
    parser.add_argument("--port-file", help="write the bound port here once listening")
    args = parser.parse_args()

    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(
            sig, lambda: stop.done() or stop.set_result(None)
        )

    async with serve(
        echo,
        args.host,
        args.port,
        compression="deflate",
        max_size=None,
        max_queue=None,
        ping_interval=None,
        close_timeout=5,
    ) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"echo backend listening on ws://{args.host}:{port}", flush=True)
        if args.port_file:
            with open(args.port_file + ".tmp", "w") as f:
                f.write(f"{port}\n")
            os.replace(args.port_file + ".tmp", args.port_file)
        await stop


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main())
