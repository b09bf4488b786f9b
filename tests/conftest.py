"""Shared pytest fixtures (keep small: one fixture per shared need)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Real sample radiographs live beside the repository (../shared/data), never inside it.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ``../shared/data``; the test is skipped when that folder is absent (fresh checkouts)."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data absent")
    return SHARED_DATA


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine, spinning OpenMP threads slow tiny models down.

    Modules of tiny-model tests use it for every test: ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
