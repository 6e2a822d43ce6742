"""Fixtures the integration tests share."""

from __future__ import annotations

import pytest

from .netns import NetNs, require_netns


@pytest.fixture(scope="module")
def workdir(request, tmp_path_factory):
    """One temporary folder per test module (logs, peers' config, recordings)."""
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_"))


@pytest.fixture(scope="module")
def ns():
    """A network namespace for one test module's WebRTC peers (server and browser both
    inside it), removed afterwards."""
    require_netns()
    with NetNs() as namespace:
        yield namespace
