"""Listening on a Unix socket (SPEC §10, `listen.path`), as `kubectl proxy --unix-socket`.

`bind_unix` makes the listening socket, used by the single-process server and by the
supervisor that binds once for its workers:

* A socket file left by a process that crashed (nothing accepts on it: connecting is
  refused) is replaced; one a live process still listens on is an error, and so is
  a path that holds anything but a socket (it is never deleted).
* The file is created with `listen.mode` (default 0600) under a matching umask, so it
  never exists with wider permissions, not even for an instant.
* `UnixSocketFile.remove` deletes it at exit only if it is still the one we bound,
  not a successor's that replaced it meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

__all__ = ["UnixSocketFile", "bind_unix"]

PROBE_TIMEOUT = 1.0  # seconds to find out whether a live process owns the socket


@dataclass(frozen=True, slots=True)
class UnixSocketFile:
    path: Path
    device: int
    inode: int

    def remove(self) -> None:
        """Delete the socket file if it is still ours: the same inode (numbers are
        reused, so also) with nobody listening on it — call it after closing ours."""
        with contextlib.suppress(OSError):
            st = self.path.lstat()
            if (st.st_dev, st.st_ino) == (self.device, self.inode) and not _is_live(self.path):
                self.path.unlink()


def bind_unix(
    path: str, mode: int = 0o600, backlog: int = 128
) -> tuple[socket.socket, UnixSocketFile]:
    """A listening Unix socket at `path` with `mode`. OSError with a message for a
    person when the path is taken."""
    target = Path(path)
    _clear_stale(target)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(str(target))
        finally:
            os.umask(old)
        os.chmod(target, mode)  # exactly: the umask can only take bits away
        st = target.lstat()
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock, UnixSocketFile(target, st.st_dev, st.st_ino)


def _clear_stale(target: Path) -> None:
    try:
        st = target.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(
            errno.EEXIST,
            f"listen.path {target} exists and is not a socket; remove it or choose another path",
        )
    if not _is_live(target):
        with contextlib.suppress(FileNotFoundError):
            target.unlink()  # a stale socket from a process that died
        return
    raise OSError(
        errno.EADDRINUSE,
        f"listen.path {target}: another process is listening on it (is authproxy running?)",
    )


def _is_live(target: Path) -> bool:
    """Whether a process accepts on the socket at `target`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_TIMEOUT)
    try:
        probe.connect(str(target))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except TimeoutError:
        return True  # a full backlog: somebody is listening
    finally:
        probe.close()
    return True
