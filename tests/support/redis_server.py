"""A real `redis-server` (Debian's) on a free loopback port, persistence off.

Stopped by its PID; `kill()` and `restart()` (same port, empty) let tests break
the shared token store the way production breaks it. `leaks()` scans every key
and value for credentials in any readable form (SPEC §8 promise 6).
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import redis

from tests.support.net import free_port

REDIS_SERVER = "/usr/bin/redis-server"


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, deadline_s: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--enable-debug-command", "local"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + deadline_s
        while True:
            assert self.proc.poll() is None, "redis-server exited at start-up"
            try:
                if self.client().ping():
                    return
            except redis.ConnectionError:
                pass
            assert time.monotonic() < deadline, "redis-server never answered PING"
            time.sleep(0.02)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)

    def kill(self) -> None:
        """SIGKILL by PID: the store vanishes mid-conversation, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def restart(self) -> None:
        """Killed and started again on the same port: empty, as after a crash."""
        self.kill()
        self.start()

    def dump(self) -> list[tuple[bytes, bytes]]:
        """Every key with its value (strings; other types by their type name)."""
        client = self.client()
        found = []
        for key in client.scan_iter(count=1000):
            kind = client.type(key)
            value = client.get(key) if kind == b"string" else kind
            found.append((key, value if isinstance(value, bytes) else b""))
        return found

    def leaks(self, secrets: Iterable[str]) -> list[str]:
        """Which of `secrets` appear in any key or value, raw or encoded."""
        dump = b"\n".join(k + b"\x00" + v for k, v in self.dump())
        candidates = sorted({s for s in secrets if len(s) >= 4})
        forms: dict[bytes, str] = {}
        for secret in candidates:
            raw = secret.encode()
            for form in (
                raw,
                base64.b64encode(raw),
                base64.urlsafe_b64encode(raw),
                raw.hex().encode(),
            ):
                forms[form.rstrip(b"=")] = secret
        for user in candidates:  # every Basic encoding of two of them
            for password in [*candidates, ""]:
                basic = base64.b64encode(f"{user}:{password}".encode()).rstrip(b"=")
                forms[basic] = f"Basic({user[:4]}...)"
        return sorted({name[:6] + "..." for form, name in forms.items() if form in dump})
