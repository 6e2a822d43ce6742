"""Routes files (bridge/sip/routes.py): a route's settings go through the served agent's
check at start, so nothing an operator configured is silently ignored."""

import json

import pytest

from agent.agents import EchoAgent
from bridge.errors import ConfigError
from bridge.sip.routes import RouteTable


def routes(tmp_path, *entries):
    path = tmp_path / "routes.json"
    path.write_text(json.dumps({"routes": list(entries)}))
    return path


def test_settings_an_agent_does_not_take_stop_the_start_naming_the_route(tmp_path):
    path = routes(tmp_path, {"match": "bot"}, {"match": "*", "settings": {"lang": "de"}})
    with pytest.raises(ConfigError, match=r"routes\[1\].*'echo' takes no route settings.*lang"):
        RouteTable.load(path, "echo", EchoAgent().check_route_settings)


def test_settings_the_check_accepts_reach_the_route(tmp_path):
    seen = []
    path = routes(tmp_path, {"match": "+4930*", "name": "berlin", "settings": {"voice": "anna"}})
    table = RouteTable.load(path, "omniflatten", seen.append)
    assert seen == [{"voice": "anna"}]
    assert table.lookup("+49301234").settings == {"voice": "anna"}


def test_a_check_that_refuses_is_named_with_its_reason(tmp_path):
    def check(settings):
        raise ValueError(f"no voice {settings['voice']!r}: this decoder has default")
    path = routes(tmp_path, {"match": "*", "settings": {"voice": "bob"}})
    with pytest.raises(ConfigError, match=r"routes\[0\]: settings: no voice 'bob'"):
        RouteTable.load(path, "omniflatten", check)
