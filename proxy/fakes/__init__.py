"""Fake upstream APIs for the tests and for ``authproxy demo``.

Four seed APIs (Paymo, primaERP, Didomi, getpaid) follow their published
authentication docs (``/work/shared/seeds``); ``echo`` is a generic
unauthenticated upstream for the proxy-core tests. Only aiohttp and the
standard library are used, so the fakes share no code with the proxy.
"""

from __future__ import annotations

from .common import (
    CHUNK_SIZE,
    ISSUED,
    TOKEN_FAILURE_MODES,
    Fakes,
    FakeState,
    RecordedRequest,
    RunningFake,
    SeedFake,
    TokenFailure,
    jwt_decode,
    jwt_encode,
    jwt_unverified_claims,
    pattern_chunks,
    pattern_sha256,
    run_fakes,
    serve,
)
from .didomi import DIDOMI_BASE, DidomiState, create_didomi_app, start_didomi
from .echo import EchoState, create_echo_app, echo_endpoint
from .getpaid import (
    GETPAID_BASE,
    GETPAID_TOKEN_PATH,
    GetpaidState,
    create_getpaid_app,
    start_getpaid,
)
from .paymo import PAYMO_BASE, PaymoState, create_paymo_app, paymo_time, start_paymo
from .primaerp import PRIMAERP_BASE, PrimaerpState, create_primaerp_app, ms_date, start_primaerp

__all__ = [
    "CHUNK_SIZE",
    "DIDOMI_BASE",
    "GETPAID_BASE",
    "GETPAID_TOKEN_PATH",
    "ISSUED",
    "PAYMO_BASE",
    "PRIMAERP_BASE",
    "TOKEN_FAILURE_MODES",
    "DidomiState",
    "EchoState",
    "FakeState",
    "Fakes",
    "GetpaidState",
    "PaymoState",
    "PrimaerpState",
    "RecordedRequest",
    "RunningFake",
    "SeedFake",
    "TokenFailure",
    "create_didomi_app",
    "create_echo_app",
    "create_getpaid_app",
    "create_paymo_app",
    "create_primaerp_app",
    "echo_endpoint",
    "jwt_decode",
    "jwt_encode",
    "jwt_unverified_claims",
    "ms_date",
    "pattern_chunks",
    "pattern_sha256",
    "paymo_time",
    "run_fakes",
    "serve",
    "start_didomi",
    "start_getpaid",
    "start_paymo",
    "start_primaerp",
]
