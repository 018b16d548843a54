"""A collector whose batch answers come late, for the fault tests: it stores each batch as
``numwatch serve`` does, then holds the answer for ``--delay`` seconds (a middleware this
script adds; the shipped collector has no such setting).

    python tests/support/slow_collector.py --port P --database-url URL --delay 1.5
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from numwatch.monitor.app import create_app
from numwatch.monitor.settings import Settings


class DelayBatchAnswers:
    """ASGI middleware: the answer to every POST of a batch starts ``delay`` seconds late."""

    def __init__(self, app: ASGIApp, delay: float) -> None:
        self.app = app
        self.delay = delay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/batches"):
            await self.app(scope, receive, send)
            return

        async def send_late(message: Message) -> None:
            if message["type"] == "http.response.start":
                await asyncio.sleep(self.delay)
            await send(message)

        await self.app(scope, receive, send_late)


def argv(port: int, database_url: str, delay: float) -> list[str]:
    """The command line that runs this script: a slow collector on 127.0.0.1:``port`` (auth off)."""
    return [
        sys.executable,
        str(Path(__file__)),
        "--port",
        str(port),
        "--database-url",
        database_url,
        "--delay",
        str(delay),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--delay", type=float, required=True, help="seconds each batch answer waits")
    args = parser.parse_args()
    app = create_app(Settings(host="127.0.0.1", port=args.port, database_url=args.database_url, auth="off"))
    app.add_middleware(DelayBatchAnswers, delay=args.delay)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
