"""Helpers shared by every test module: one of each, so a fix lands everywhere.

- `net`: `free_port`
- `wire`: `bearer` (a header to send), `bearer_of` (the token a recorded request carried),
  `error_shape` / `error_of` (the SPEC's JSON error, shape checked)
- `logs`: `log_lines`, `access_lines`
- `polling`: `wait_until` (async) and `wait_until_sync`: poll a condition with a deadline
"""

from __future__ import annotations

from tests.support.logs import access_lines, log_lines
from tests.support.net import free_port
from tests.support.polling import wait_until, wait_until_sync
from tests.support.wire import bearer, bearer_of, error_of, error_shape

__all__ = [
    "access_lines",
    "bearer",
    "bearer_of",
    "error_of",
    "error_shape",
    "free_port",
    "log_lines",
    "wait_until",
    "wait_until_sync",
]
