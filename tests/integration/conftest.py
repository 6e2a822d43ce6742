"""Fixtures the integration tests share."""

from __future__ import annotations

import pytest

from .netns import NetNs, require_netns


@pytest.fixture(scope="module")
def ns():
    """A network namespace for one test module's WebRTC peers (server and browser both
    inside it), removed afterwards."""
    require_netns()
    with NetNs() as namespace:
        yield namespace
