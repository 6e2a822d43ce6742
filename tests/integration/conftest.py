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


def _has_pjsua2() -> bool:
    try:
        import pjsua2  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module", params=["baresip", pytest.param("pjsua2", marks=pytest.mark.skipif(
    not _has_pjsua2(), reason="the pjsua2 extra is not installed (pip install 'duplexline[pjsua2]')"))])
def sip_backend(request):
    """The SIP end-to-end tests run once per SIP stack (--sip-backend)."""
    return request.param
