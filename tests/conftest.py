"""Shared pytest fixtures (keep small: one fixture per shared need)."""

from __future__ import annotations

from pathlib import Path

import pytest

# Real sample radiographs live beside the repository (../shared/data), never inside it.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ``../shared/data``; the test is skipped when that folder is absent (fresh checkouts)."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data absent")
    return SHARED_DATA
