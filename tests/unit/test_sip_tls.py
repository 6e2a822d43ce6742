"""The TLS front door's settings and context (bridge/sip/tls.py, bridge/sip/config.py):
every bad file or combination is an error naming the option, before anything listens."""

import json
import ssl

import pytest

from bridge.errors import ConfigError
from bridge.settings import settings_from
from bridge.sip.accounts import load_accounts
from bridge.sip.tls import server_context, stack_tls_config
from tests.integration.tls_certs import self_signed


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return self_signed(tmp_path_factory.mktemp("tls"))


def test_the_context_speaks_tls_1_2_at_least(certs):
    ctx = server_context(certs.cert, certs.key)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION


def test_a_key_of_another_certificate_is_named(certs, tmp_path):
    other = self_signed(tmp_path, name="other")
    with pytest.raises(ConfigError, match=r"invalid sip_tls_key=.*does not match the certificate"):
        server_context(certs.cert, other.key)


def test_a_file_that_is_not_pem_is_named(certs, tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(ConfigError, match=r"invalid sip_tls_cert=.*not a PEM file"):
        server_context(junk, certs.key)


def test_an_unreadable_key_is_named(certs, tmp_path):
    with pytest.raises(ConfigError, match=r"invalid sip_tls_key=.*cannot read it"):
        server_context(certs.cert, tmp_path)  # a folder: open() fails


@pytest.mark.parametrize("env, named", [
    ({"DUPLEXLINE_SIP_TLS_LISTEN": "127.0.0.1:5061"}, "needs --sip-tls-cert"),
    ({"DUPLEXLINE_SIP_TLS_CERT": "{cert}", "DUPLEXLINE_SIP_TLS_KEY": "{key}"}, "set --sip-tls-listen"),
    ({"DUPLEXLINE_SIP_TLS_LISTEN": "127.0.0.1:5060", "DUPLEXLINE_SIP_TLS_CERT": "{cert}",
      "DUPLEXLINE_SIP_TLS_KEY": "{key}"}, "invalid sip_tls_listen="),
    ({"DUPLEXLINE_SIP_TLS_LISTEN": "127.0.0.1:5061", "DUPLEXLINE_SIP_TLS_CERT": "/nonexistent.pem",
      "DUPLEXLINE_SIP_TLS_KEY": "{key}"}, "invalid DUPLEXLINE_SIP_TLS_CERT="),
])
def test_incomplete_or_clashing_tls_settings_stop_the_start(certs, env, named):
    env = {k: v.format(cert=certs.cert, key=certs.key) for k, v in env.items()}
    with pytest.raises(ConfigError, match=named):
        settings_from(None, env)


def test_complete_tls_settings_are_taken(certs):
    s = settings_from(None, {"DUPLEXLINE_SIP_TLS_LISTEN": "127.0.0.1:5061", "DUPLEXLINE_SIP_TLS_CERT": str(certs.cert),
                             "DUPLEXLINE_SIP_TLS_KEY": str(certs.key)})
    assert (s.sip.tls_listen.port, s.sip.tls_cert, s.sip.tls_key) == (5061, certs.cert, certs.key)


def test_the_stack_always_verifies_against_the_given_ca(certs):
    text = stack_tls_config(certs.cert)
    assert "sip_verify_server yes\n" in text and f"sip_cafile {certs.cert.resolve()}\n" in text


def test_accounts_take_tls_and_an_srtp_policy(tmp_path):
    path = tmp_path / "accounts.json"
    path.write_text(json.dumps([{"user": "a", "domain": "example.com", "transport": "tls", "srtp": "required"},
                                {"user": "b", "domain": "example.com"}]))
    a, b = load_accounts(path, ("pcmu",))
    assert (a.spec.transport, a.spec.mediaenc) == ("tls", "srtp-mand")
    assert (b.spec.transport, b.spec.mediaenc) == ("udp", None)
    path.write_text(json.dumps([{"user": "a", "domain": "example.com", "srtp": "yes"}]))
    with pytest.raises(ConfigError, match=r"accounts\[0\]: 'srtp' must be one of"):
        load_accounts(path, ("pcmu",))
