"""The processes a run starts and what /proc says about them: CPU time, resident
memory, their process groups, and waiting for them to answer HTTP.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.settings import GETPAID_CLIENT_SECRET, BenchError, log

CLK_TCK = os.sysconf("SC_CLK_TCK")
RSS_INTERVAL_S = 0.02


# --------------------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (after the parenthesised comm), or None if gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rindex(")") + 2 :].split()


def children_of(pid: int) -> list[int]:
    """Direct children, by scanning /proc for ppid (works without CONFIG_PROC_CHILDREN)."""
    found: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and int(fields[1]) == pid:  # field 4: ppid
            found.append(int(entry.name))
    return found


def process_tree(pid: int) -> list[int]:
    pids = [pid]
    for child in children_of(pid):
        pids.extend(process_tree(child))
    return pids


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime (fields 14 and 15 of /proc/<pid>/stat) summed over `pids`."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def children_cpu_seconds() -> float:
    """User + system CPU of this process's finished children (wrk and curl, once waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_cpu() -> tuple[float, float]:
    """CPU-seconds the whole machine has been busy (every CPU, every process, anyone's)
    and stolen by the hypervisor, from the first line of /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


def status_kib(pid: int, key: str) -> int | None:
    """A ``kB`` line of /proc/<pid>/status (VmRSS, VmHWM), or None."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def reset_hwm(pid: int) -> bool:
    """Reset VmHWM to the current VmRSS (``echo 5 > /proc/<pid>/clear_refs``)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class RssWatch:
    """Resident memory of a process tree around one transfer.

    Samples the summed VmRSS every ~20 ms on a thread; the kernel's VmHWM is
    reset before the transfer and read after it, so a peak shorter than the
    sampling interval is not missed (for a multi-process tree the summed VmHWM
    is an upper bound). ``lifetime_hwm_kib`` keeps the largest VmHWM ever read,
    i.e. the peak over the whole run although the counter gets reset.
    """

    def __init__(self, pids_fn: Callable[[], list[int]]) -> None:
        self._pids_fn = pids_fn
        self.lifetime_hwm_kib = 0
        self._pids: list[int] = []
        self._samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hwm_reset = False
        self.before_kib = 0

    def _sum(self, key: str) -> int:
        return sum(status_kib(pid, key) or 0 for pid in self._pids)

    def note_hwm(self) -> int:
        self._pids = self._pids_fn()
        hwm = self._sum("VmHWM")
        self.lifetime_hwm_kib = max(self.lifetime_hwm_kib, hwm)
        return hwm

    def start(self) -> None:
        self.note_hwm()
        self._hwm_reset = all([reset_hwm(pid) for pid in self._pids])  # noqa: C419 (reset all)
        self.before_kib = self._sum("VmRSS")
        self._samples = [self.before_kib]
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(RSS_INTERVAL_S):
            self._samples.append(self._sum("VmRSS"))

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._samples.append(self._sum("VmRSS"))
        sampled_peak = max(self._samples)
        hwm = self.note_hwm()
        peak = max(sampled_peak, hwm) if self._hwm_reset else sampled_peak
        return {
            "rss_before_kib": self.before_kib,
            "rss_peak_kib": peak,
            "rss_sampled_peak_kib": sampled_peak,
            "rss_growth_kib": peak - self.before_kib,
            "rss_samples": len(self._samples),
            "hwm_reset": self._hwm_reset,
        }


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env() -> dict[str, str]:
    """Our environment without proxy variables (loopback only) and AUTHPROXY_* overrides."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy") and not k.startswith("AUTHPROXY_")
    }
    env["BENCH_GETPAID_CLIENT_SECRET"] = GETPAID_CLIENT_SECRET
    return env


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    pgid_members: set[int] = field(default_factory=set)

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Services:
    """Every process we started; all of them are stopped by :meth:`stop_all`."""

    def __init__(self) -> None:
        self.items: list[Service] = []

    def start(self, name: str, argv: list[str], port: int, log_path: Path, cwd: Path) -> Service:
        with log_path.open("wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=child_env(),
                start_new_session=True,  # own process group: no terminal Ctrl-C, killpg works
            )
        service = Service(name=name, proc=proc, port=port, log_path=log_path)
        self.items.append(service)
        return service

    def check_alive(self) -> None:
        for s in self.items:
            if not s.alive():
                raise BenchError(
                    f"{s.name} (pid {s.proc.pid}) exited with {s.proc.returncode}; "
                    f"last lines of {s.log_path.name}:\n{s.log_tail()}"
                )

    def stop_all(self) -> None:
        """SIGTERM every process group (newest first), wait, then SIGKILL what is left."""
        for s in self.items:
            s.pgid_members = {pid for pid in s.pids() if _pgid(pid) == s.proc.pid}
        for s in reversed(self.items):
            if s.alive():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(s.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for s in reversed(self.items):
            try:
                s.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(f"{s.name} did not stop on SIGTERM; killing it")
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(s.proc.pid, signal.SIGKILL)
                s.proc.wait()
        # Stragglers of a group whose leader already exited (e.g. an nginx worker): by pid.
        time.sleep(0.05)
        for s in self.items:
            for pid in s.pgid_members:
                if pid != s.proc.pid and _pgid(pid) == s.proc.pid:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)


def _pgid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[2]) if fields is not None else None  # field 5: pgrp


_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET without any proxy from the environment: this traffic stays on 127.0.0.1."""
    try:
        with _NO_PROXY_OPENER.open(url, timeout=timeout) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def wait_http(service: Service, url: str, timeout: float = 30.0) -> None:
    """Until `url` answers 200 (or the process dies, or `timeout`)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not service.alive():
            raise BenchError(
                f"{service.name} exited with {service.proc.returncode} during start-up:\n"
                f"{service.log_tail()}"
            )
        try:
            status, _ = http_get(url, timeout=2.0)
        except OSError as exc:
            last = str(exc)
        else:
            if status == 200:
                return
            last = f"status {status}"
        time.sleep(0.05)
    raise BenchError(f"{service.name} not ready at {url} after {timeout:.0f}s ({last})")


def wait_listening(service: Service, url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not service.alive():
            raise BenchError(f"{service.name} exited during start-up:\n{service.log_tail()}")
        try:
            http_get(url, timeout=2.0)
        except OSError:
            time.sleep(0.05)
        else:
            return
    raise BenchError(f"{service.name} not listening at {url} after {timeout:.0f}s")
