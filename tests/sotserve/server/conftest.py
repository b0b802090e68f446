"""A client session on the shared ``sotserve serve`` process (see tests/conftest.py)."""

from __future__ import annotations

import aiohttp
import pytest


@pytest.fixture
async def http(sotserve_url):
    async with aiohttp.ClientSession(
        sotserve_url, timeout=aiohttp.ClientTimeout(total=120)
    ) as session:
        yield session
