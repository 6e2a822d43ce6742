"""Fixtures the unit tests share."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small models' modules on one torch thread: two OpenMP threads on a busy two-core
    box spin-wait for milliseconds per tiny op. Use with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
