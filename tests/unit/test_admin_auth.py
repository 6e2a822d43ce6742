"""Who may call the admin routes: the token when one is set, else this host only."""

from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from agent.control import require_admin


def request_from(address: str, authorization: str | None = None) -> web.Request:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (address, 40000) if name == "peername" else default
    headers = {"Authorization": authorization} if authorization else {}
    return make_mocked_request("POST", "/calls", headers=headers, transport=transport)


@pytest.mark.parametrize("address", ["127.0.0.1", "127.8.9.10", "::1"])
def test_without_a_token_this_host_may(address):
    require_admin(request_from(address), None)


@pytest.mark.parametrize("address", ["10.0.0.7", "192.0.2.1", "2001:db8::1"])
def test_without_a_token_another_host_is_forbidden_and_told_why(address):
    with pytest.raises(web.HTTPForbidden) as refused:
        require_admin(request_from(address), None)
    assert "--admin-token" in refused.value.text


def test_with_a_token_only_the_token_counts_wherever_the_request_comes_from():
    require_admin(request_from("192.0.2.1", "Bearer s3cret"), "s3cret")
    for auth in (None, "Bearer wrong", "Basic s3cret"):
        with pytest.raises(web.HTTPUnauthorized):
            require_admin(request_from("127.0.0.1", auth), "s3cret")
