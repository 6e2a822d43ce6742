"""Settings: flags beat variables beat defaults; bad values and unknown variables name
themselves; the README documents every option."""

import argparse
import re
from pathlib import Path

import pytest

from bridge.errors import ConfigError
from bridge.options import HostPort
from bridge.settings import OPTIONS, add_serve_arguments, settings_from

README = Path(__file__).resolve().parents[2] / "README.md"


def parse(argv, env=None):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return settings_from(parser.parse_args(argv), env or {})


def test_defaults_are_the_embedded_ones():
    s = parse([])
    assert s.sip_listen == HostPort("127.0.0.1", 5060) and s.http_listen == HostPort("127.0.0.1", 8080)
    assert s.agent == "omniflatten" and s.redis is None and s.store_name == "memory"


def test_flag_beats_variable_beats_default():
    s = parse(["--agent", "echo"], {"DUPLEXLINE_AGENT": "omniflatten", "DUPLEXLINE_SLOTS": "3"})
    assert s.agent == "echo" and s.slots == 3


@pytest.mark.parametrize("argv, env, named", [
    (["--sip-listen", "1.2.3.4"], {}, "--sip-listen"),
    (["--http-listen", "127.0.0.1:99999"], {}, "--http-listen"),
    ([], {"DUPLEXLINE_AGENT": "parrot"}, "DUPLEXLINE_AGENT"),
    ([], {"DUPLEXLINE_REDIS": "localhost:6379"}, "DUPLEXLINE_REDIS"),
    ([], {"DUPLEXLINE_SLOTZ": "4"}, "DUPLEXLINE_SLOTZ"),
    (["--slots", "0"], {}, "--slots"),
    (["--http-listen", "127.0.0.1:5060"], {}, "http_listen"),
])
def test_bad_values_name_the_setting(argv, env, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        parse(argv, env)


def test_admin_token_is_redacted():
    s = parse(["--admin-token", "hunter2"])
    assert "hunter2" not in repr(s) and s.admin_token == "hunter2"


def test_readme_documents_every_option():
    text = README.read_text()
    for opt in OPTIONS:
        assert f"`{opt.flag}`" in text, f"README lacks {opt.flag}"
        assert f"`{opt.env}`" in text, f"README lacks {opt.env}"
