"""Serve the getpaid fake (OAuth2 client credentials) for the benchmark until SIGTERM/SIGINT.

Started by ``bench/run.py`` in its own process so that the token endpoint's CPU
never lands on the proxy process being measured::

    python bench/getpaid_fake.py --port 8765 --lifetime 3600

Prints one JSON line ``{"event": "ready", "token_url": ...}`` when it listens and
``{"event": "stopped", "token_requests": N}`` when it stops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

from proxy.fakes import GetpaidState, start_getpaid


async def serve(port: int, lifetime: float) -> None:
    fake = await start_getpaid(GetpaidState(lifetime=lifetime), host="127.0.0.1", port=port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(json.dumps({"event": "ready", "token_url": fake.token_url}), flush=True)
    try:
        await stop.wait()
    finally:
        token_requests = fake.state.token_requests
        await fake.close()
        print(json.dumps({"event": "stopped", "token_requests": token_requests}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the getpaid fake for bench/run.py.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--lifetime", type=float, default=3600.0, help="token lifetime, seconds")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.lifetime))


if __name__ == "__main__":
    main()
