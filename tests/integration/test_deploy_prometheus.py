"""deploy/prometheus/ as Prometheus itself reads it: `promtool check config` on both scrape
configs, `promtool check rules` on the alerts, and `promtool test rules` running
tests/alerts_test.yml, where each alert fires on a synthetic series of its trouble and stays
quiet on a healthy one. The unit tests are shown to bite: with every rule made unable to
fire, each alert's firing case fails; with every rule always firing, each quiet case fails.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.integration.prometheus_process import require_binary
from tests.integration.serve_process import REPO

PROM_DIR = REPO / "deploy/prometheus"
ALERTS = PROM_DIR / "alerts.yml"
UNIT_TESTS = PROM_DIR / "tests/alerts_test.yml"
CONFIGS = ["prometheus.yml", "prometheus-kubernetes.yml"]


def promtool(*args: str, cwd: Path = PROM_DIR) -> subprocess.CompletedProcess:
    binary = require_binary("promtool", "prometheus")
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


@pytest.mark.parametrize("config", CONFIGS)
def test_promtool_check_config(config):
    proc = promtool("check", "config", config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_promtool_check_rules():
    proc = promtool("check", "rules", "alerts.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in proc.stdout


def test_promtool_unit_tests_pass():
    proc = promtool("test", "rules", str(UNIT_TESTS.relative_to(PROM_DIR)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_the_issue_alerts_are_there_with_severity_and_text():
    rules = {rule["alert"]: rule for rule in alert_rules()}
    # The alerts the deployment promises (issue 8), by the metric each watches.
    promised = {
        "DuplexlineNoCallsAnswered": "duplexline_sip_invites_total",
        "DuplexlineEngineMissingDeadlines": "duplexline_engine_missed_deadlines_total",
        "DuplexlineTimeToFirstAudioHigh": "duplexline_agent_first_audio_seconds_bucket",
        "DuplexlineSipRegistrationDown": "duplexline_sip_registration_up",
        "DuplexlineSlotsNearlyFull": "duplexline_engine_slots_used",
        "DuplexlineRedisErrors": "duplexline_store_errors_total",
        "DuplexlineRedisDown": "duplexline_store_up",
        "DuplexlineReplicaDown": "up{",
    }
    for name, metric in promised.items():
        assert name in rules, f"alerts.yml lost {name}"
        assert metric in rules[name]["expr"], (name, rules[name]["expr"])
    docs = (REPO / "docs/deploy.md").read_text()
    for name, rule in rules.items():
        assert name.startswith("Duplexline"), name
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert {"summary", "description"} <= set(rule["annotations"]), name
        assert "for" in rule, f"{name}: say how long the condition must hold (`for:`), even 0m"
        assert name in docs, f"docs/deploy.md has no runbook entry for {name}"


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    tests = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - firing == set(), f"alerts never shown firing: {sorted(names - firing)}"
    assert names - quiet == set(), f"alerts never shown quiet on healthy series: {sorted(names - quiet)}"


@pytest.mark.parametrize("mutation, expr", [("never fires", "vector(1) == 0"), ("always fires", "vector(1)")])
def test_the_unit_tests_bite(tmp_path, mutation, expr):
    """Replace every rule's expression and the unit tests must fail for every alert: the
    firing cases catch a rule that cannot fire, the quiet cases one that always does."""
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["expr"] = expr
    (tmp_path / "tests").mkdir()
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    shutil.copy(UNIT_TESTS, tmp_path / "tests" / UNIT_TESTS.name)
    proc = promtool("test", "rules", f"tests/{UNIT_TESTS.name}", cwd=tmp_path)
    assert proc.returncode != 0, f"the unit tests pass even when every rule {mutation}"
    failed = set(re.findall(r"alertname: (\w+),", proc.stdout + proc.stderr))
    missed = {rule["alert"] for rule in alert_rules()} - failed
    assert not missed, f"when every rule {mutation}, no unit test fails for {sorted(missed)}"
