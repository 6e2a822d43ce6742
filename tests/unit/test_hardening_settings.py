"""The dead-call and pending-offer settings: defaults, flags and variables, and bad values
refused naming the flag or variable (a typo must not turn a limit off)."""

import argparse
import re

import pytest

from bridge.errors import ConfigError
from bridge.settings import Settings, add_serve_arguments, settings_from
from bridge.webrtc.config import WebRtcSettings


def parse(argv, env=None):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return settings_from(parser.parse_args(argv), env or {})


def test_defaults():
    s = parse([])
    assert s.media_timeout == 30.0
    assert (s.webrtc.connect_timeout, s.webrtc.max_pending, s.webrtc.max_pending_per_source) == (10.0, 4, 2)


def test_flags_and_variables():
    s = parse(["--media-timeout", "0", "--webrtc-connect-timeout", "3"],
              {"DUPLEXLINE_MEDIA_TIMEOUT": "5", "DUPLEXLINE_WEBRTC_MAX_PENDING": "9",
               "DUPLEXLINE_WEBRTC_MAX_PENDING_PER_SOURCE": "7"})
    assert s.media_timeout == 0.0  # the flag wins; 0 turns the timeout off
    assert (s.webrtc.connect_timeout, s.webrtc.max_pending, s.webrtc.max_pending_per_source) == (3.0, 9, 7)


@pytest.mark.parametrize("argv, env, named", [
    (["--media-timeout", "0.5"], {}, "--media-timeout"),  # shorter than network jitter
    (["--media-timeout", "-1"], {}, "--media-timeout"),
    (["--media-timeout", "nan"], {}, "--media-timeout"),
    ([], {"DUPLEXLINE_MEDIA_TIMEOUT": "4000"}, "DUPLEXLINE_MEDIA_TIMEOUT"),
    ([], {"DUPLEXLINE_MEDIA_TIMEOUT": "soon"}, "DUPLEXLINE_MEDIA_TIMEOUT"),
    (["--webrtc-connect-timeout", "0"], {}, "--webrtc-connect-timeout"),
    (["--webrtc-connect-timeout", "301"], {}, "--webrtc-connect-timeout"),
    (["--webrtc-max-pending", "0"], {}, "--webrtc-max-pending"),
    ([], {"DUPLEXLINE_WEBRTC_MAX_PENDING_PER_SOURCE": "two"}, "DUPLEXLINE_WEBRTC_MAX_PENDING_PER_SOURCE"),
])
def test_bad_values_name_the_setting(argv, env, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        parse(argv, env)


def test_built_by_hand_the_same_rules_hold():
    with pytest.raises(ConfigError, match="media_timeout"):
        Settings(media_timeout=0.2)
    for field, value in (("connect_timeout", 0.5), ("max_pending", 0), ("max_pending_per_source", 0)):
        with pytest.raises(ValueError, match=field):
            WebRtcSettings(**{field: value})
