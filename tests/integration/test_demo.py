"""`authproxy demo`, the README's first command: the curl commands it prints work."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.support import free_port, wait_until

AUTHPROXY = Path(sys.executable).parent / "authproxy"

# What a client might carry: none of it may reach a fake API (SPEC §4 "Stripping").
CLIENT_MARK = "client-own-cred-3f9a"
CLIENT_CREDENTIALS = {
    "Authorization": f"Bearer {CLIENT_MARK}",
    "Proxy-Authorization": f"Basic {CLIENT_MARK}",
    "Cookie": f"session={CLIENT_MARK}",
}
# Paymo's injected header: replaced on the Paymo route (other routes may pass it on).
CLIENT_SESSION = {"X-Session": "client-session-77c1"}


def start_demo(port: int, out: Path, err: Path) -> subprocess.Popen[bytes]:
    with out.open("wb") as stdout, err.open("wb") as stderr:
        return subprocess.Popen(
            [str(AUTHPROXY), "demo", "--port", str(port), "--lifetime", "2"],
            stdout=stdout,
            stderr=stderr,
        )


async def test_demo_serves_the_printed_commands_offline_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    out, err = tmp_path / "demo.out", tmp_path / "demo.err"
    proc = start_demo(port, out, err)
    try:

        def printed() -> bool:
            assert proc.poll() is None, err.read_text()
            return "curl" in err.read_text()

        await wait_until(printed, 20, what="the demo to print its commands", interval=0.05)
        await asyncio.sleep(0.1)  # the rest of the banner
        urls = re.findall(r"curl (http://localhost:\d+/\S+)", err.read_text())
        assert len(urls) == 5, err.read_text()
        async with aiohttp.ClientSession() as client:
            for _ in range(2):  # the second round outlives the 2 s demo tokens
                for url in urls:
                    target = url.replace("localhost", "127.0.0.1")
                    headers = {**CLIENT_CREDENTIALS, **CLIENT_SESSION}
                    async with client.get(target, headers=headers) as resp:
                        assert resp.status == 200, (url, await resp.text())
                        body = await resp.json()
                    if "/-/" not in url:
                        # The fake saw the proxy's credential, never a client's.
                        echo = body["echo"]
                        assert echo["method"] == "GET"
                        seen = {name.lower(): value for name, value in echo["headers"]}
                        assert CLIENT_MARK not in json.dumps(echo), (url, echo)
                        assert "cookie" not in seen, (url, echo)
                        assert "proxy-authorization" not in seen, (url, echo)
                        if "/paymo/" in url:
                            assert seen["x-session"] != CLIENT_SESSION["X-Session"], echo
                await asyncio.sleep(2.1)
            async with client.get(f"http://127.0.0.1:{port}/-/status") as resp:
                status = await resp.json()
        assert {u["token"]["state"] for u in status["upstreams"].values()} <= {"valid", "expired"}
        proc.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(proc.wait, 15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = [
        json.loads(line)["event"] for line in out.read_text().splitlines() if line.startswith("{")
    ]
    assert events.count("token_acquired") == 4
    assert "token_refreshed" in events  # the 2 s tokens were renewed while we watched
    assert "token_logout" in events  # Paymo's session ended on Ctrl-C
    assert "Traceback" not in err.read_text() + out.read_text()
