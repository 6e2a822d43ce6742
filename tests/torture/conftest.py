"""Fixtures of the torture tier: one private network namespace for the session (every
bridge, user agent and attack tool runs inside it, so no fuzzed address can send a packet
off the machine), a work folder, and the report table printed at the end."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.netns import NetNs, require_netns

from .harness import REPORT, SCALE, SEED, SIP_BACKEND


@pytest.fixture(scope="session")
def torture_ns():
    require_netns()
    with NetNs() as namespace:
        yield namespace


@pytest.fixture(scope="session")
def torture_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("torture")


def pytest_report_header(config):
    return (f"torture: scale {SCALE.name}, seed {SEED}, SIP stack {SIP_BACKEND} "
            "(TORTURE_SCALE, TORTURE_SEED, TORTURE_SIP_BACKEND)")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not REPORT.rows:
        return
    table = REPORT.markdown()
    terminalreporter.section("torture report")
    terminalreporter.write_line(table)
    failures = REPORT.failures()
    if failures:
        terminalreporter.write_line("")
        terminalreporter.write_line("failed checks:")
        terminalreporter.write_line(failures)
    out = Path(config.rootpath) / "out"
    try:
        out.mkdir(exist_ok=True)
        (out / f"torture-{SCALE.name}.md").write_text(table + ("\n\nfailed checks:\n" + failures if failures else "")
                                                      + "\n")
        terminalreporter.write_line(f"(also written to {out / f'torture-{SCALE.name}.md'})")
    except OSError:
        pass
