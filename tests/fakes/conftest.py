"""Fixtures for testing the fakes directly (no proxy involved)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from proxy.fakes import (
    DidomiState,
    GetpaidState,
    PrimaerpState,
    SeedFake,
    start_didomi,
    start_getpaid,
    start_primaerp,
)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as s:
        yield s


@pytest.fixture
async def primaerp() -> AsyncIterator[SeedFake[PrimaerpState]]:
    async with await start_primaerp(PrimaerpState(lifetime=60)) as fake:
        yield fake


@pytest.fixture
async def didomi() -> AsyncIterator[SeedFake[DidomiState]]:
    async with await start_didomi(DidomiState(lifetime=60)) as fake:
        yield fake


@pytest.fixture
async def getpaid() -> AsyncIterator[SeedFake[GetpaidState]]:
    async with await start_getpaid(GetpaidState(lifetime=60)) as fake:
        yield fake
