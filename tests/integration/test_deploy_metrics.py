"""The dashboard and the alerts can never silently show "No data" for a renamed metric.

A real Prometheus (Debian's package) runs the shipped deploy/prometheus/prometheus.yml
(scrape interval cut to 1 s, targets moved to this test's ports, the shipped alerts.yml
loaded) against the deployment's processes, under the job names the config ships: two
workers (`duplexline worker`, the tiny model on the CPU, registered in a real redis-server)
and a bridge (`duplexline serve --agent omniflatten --engine redis`) with a SIP account
whose registrar does not exist. Then what the dashboard shows happens for real:

- a client of the worker protocol (the bridges' own, model/worker_client.py) asks one
  worker for one session more than its slots: the worker refuses it, and counts the client's
  connection as ended when it closes;
- a real SIP call (Debian's baresip, tests/integration/sip_peers.py) to the bridge is
  answered, its model session placed on a worker, scraped while live;
- the worker holding the call is killed (SIGKILL): the bridge loses it and re-homes the call
  on the other worker, where the call goes on until it is hung up.

Then every PromQL expression in the dashboard JSON and alerts.yml is parsed, and every
metric name, label name, literal label value and legend/annotation label it uses must be in
the series Prometheus scraped; every dashboard query must parse on the real Prometheus, and
every alert rule must evaluate there without error, with only the alert that has a real
cause (the unregistered account) active.

Most names are exported before any call (counters and histograms without labels, and
labelled ones whose label sets are pre-initialised, are exported at zero); the refusal, the
call and the lost worker add the rest.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import shutil
import time
from dataclasses import dataclass, field

import pytest
import yaml
from prometheus_client import CollectorRegistry

from model.errors import EngineFull
from model.worker_client import RemoteVoiceEngine
from tests.conftest import RedisServer
from tests.integration.prometheus_process import PrometheusProcess, require_binary
from tests.integration.serve_process import REPO, ServeProcess, free_port, http_json
from tests.integration.sip_peers import BaresipPeer
from tests.integration.test_deploy_compose import WorkerProcess

pytestmark = pytest.mark.timeout(240)

DASHBOARD = REPO / "deploy/grafana/dashboards/duplexline.json"
ALERTS = REPO / "deploy/prometheus/alerts.yml"
PROMETHEUS_CONFIG = REPO / "deploy/prometheus/prometheus.yml"

TEST_ACCOUNT = "test-trunk"

# Grafana variables, as "All" expands them (deploy/grafana/dashboard.py).
GRAFANA_VARIABLES = {"$job": "duplexline-.*", "$instance": ".*", "$worker": ".*"}
WORKER_SLOTS = 2

_SELECTOR = re.compile(r"\b(duplexline_[a-zA-Z0-9_]+)\s*(?:\{([^}]*)\})?")
_UP_SELECTOR = re.compile(r"(?<![a-zA-Z0-9_])up\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_LEGEND = re.compile(r"\{\{\s*(?:\$labels\.)?([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")


@dataclass
class Use:
    """What one PromQL expression needs from the scraped series."""

    where: str
    expr: str
    metrics: set[str] = field(default_factory=set)
    labels: dict[str, set[str]] = field(default_factory=dict)  # metric -> label names
    values: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # (metric, label) -> literals
    grouped: set[str] = field(default_factory=set)  # labels of by/on clauses (what survives aggregation)
    shown: set[str] = field(default_factory=set)  # labels a legend or annotation prints
    job_regexes: set[str] = field(default_factory=set)  # up{job=~"..."}
    uses_up: bool = False


def _paren_span(expr: str, open_at: int) -> int:
    """The index just past the parenthesis that closes the one at `open_at`."""
    depth = 0
    for i in range(open_at, len(expr)):
        depth += {"(": 1, ")": -1}.get(expr[i], 0)
        if depth == 0:
            return i + 1
    raise ValueError(f"unbalanced parentheses in {expr!r}")


def _paren_start(expr: str, close_at: int) -> int:
    depth = 0
    for i in range(close_at, -1, -1):
        depth += {")": 1, "(": -1}.get(expr[i], 0)
        if depth == 0:
            return i
    raise ValueError(f"unbalanced parentheses in {expr!r}")


def parse(expr: str, where: str, shown_in: str = "") -> Use:
    use = Use(where, expr)
    for m in _SELECTOR.finditer(expr):
        name = m.group(1)
        use.metrics.add(name)
        use.labels.setdefault(name, set())
        for label, op, value in _MATCHER.findall(m.group(2) or ""):
            use.labels[name].add(label)
            if op in ("=", "!=") and "$" not in value:
                use.values.setdefault((name, label), set()).add(value)
    for m in _UP_SELECTOR.finditer(expr):
        use.uses_up = True
        for label, op, value in _MATCHER.findall(m.group(1)):
            if label == "job" and "$" not in value:
                use.job_regexes.add(value if op in ("=~", "!~") else re.escape(value))
    for m in _GROUPING.finditer(expr):
        keyword, names = m.group(1), {n.strip() for n in m.group(2).split(",") if n.strip()}
        if keyword in ("by", "without"):
            after = expr[m.end():].lstrip()
            if after.startswith("("):  # sum by (l) (arg)
                start = m.end() + (len(expr[m.end():]) - len(after))
                arg = expr[start:_paren_span(expr, start)]
            else:  # sum (arg) by (l)
                close = expr.rstrip()[:m.start()].rstrip()
                if not close.endswith(")"):
                    raise ValueError(f"{where}: cannot find what `{keyword}` groups in {expr!r}")
                arg = expr[_paren_start(expr, len(close) - 1):len(close)]
            targets = {n.group(1) for n in _SELECTOR.finditer(arg)}
        else:  # on/ignoring/group_*: both sides of the binary operator
            targets = set(use.metrics)
        if keyword in ("by", "on"):
            use.grouped |= names
        for name in targets:
            use.labels.setdefault(name, set()).update(names)
    use.shown = set(_LEGEND.findall(shown_in))
    return use


def dashboard_uses() -> list[Use]:
    dash = json.loads(DASHBOARD.read_text())
    uses = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            uses.append(parse(target["expr"], f"dashboard panel {panel['title']!r} query {target['refId']}",
                              target.get("legendFormat", "")))
    for var in dash["templating"]["list"]:
        uses.append(parse(var["query"]["query"], f"dashboard variable ${var['name']}"))
    return uses


def alert_uses() -> list[Use]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [parse(rule["expr"], f"alert {rule['alert']}", " ".join(rule.get("annotations", {}).values()))
            for group in rules["groups"] for rule in group["rules"]]


# ---- the parser itself, on the forms the files use ----------------------------------------------

def test_the_promql_reader_finds_names_labels_values_and_groupings():
    use = parse('histogram_quantile(0.99, sum by (job, le) (rate(duplexline_a_seconds_bucket{x="1", '
                'y=~"$v", z!="q"}[5m]))) > 1 and on (instance) duplexline_b == 0', "t",
                "{{ $labels.job }} {{instance}}")
    assert use.metrics == {"duplexline_a_seconds_bucket", "duplexline_b"}
    assert use.labels["duplexline_a_seconds_bucket"] == {"x", "y", "z", "job", "le", "instance"}
    assert use.labels["duplexline_b"] == {"instance"}
    assert use.values == {("duplexline_a_seconds_bucket", "x"): {"1"}, ("duplexline_a_seconds_bucket", "z"): {"q"}}
    assert use.grouped == {"job", "le", "instance"} and use.shown == {"job", "instance"}
    postfix = parse("sum(rate(duplexline_c_total[5m])) by (reason)", "t")
    assert postfix.labels["duplexline_c_total"] == {"reason"}
    assert parse('absent(up{job=~"duplexline-(a|b)"} == 1)', "t").job_regexes == {"duplexline-(a|b)"}


# ---- against a real Prometheus scraping real processes -------------------------------------------

def _test_config(workers: list[str], bridge: str) -> dict:
    """The shipped config, scraping this test's processes every second."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update({"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"})
    config["rule_files"] = [str(ALERTS)]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"duplexline-worker", "duplexline-bridge"} <= set(jobs), "prometheus.yml lost a job name"
    jobs["duplexline-worker"]["static_configs"][0]["targets"] = workers
    jobs["duplexline-bridge"]["static_configs"][0]["targets"] = [bridge]
    config["scrape_configs"] = [jobs["duplexline-worker"], jobs["duplexline-bridge"]]
    return config


def _scraped(prom: PrometheusProcess) -> tuple[dict[str, set[str]], dict[tuple[str, str], set[str]], set[str]]:
    series = prom.api("/api/v1/series", {"match[]": '{__name__=~"duplexline_.+"}'})
    labels: dict[str, set[str]] = {}
    values: dict[tuple[str, str], set[str]] = {}
    for s in series:
        name = s["__name__"]
        labels.setdefault(name, set()).update(k for k in s if k != "__name__")
        for k, v in s.items():
            values.setdefault((name, k), set()).add(v)
    jobs = {s["job"] for s in prom.api("/api/v1/series", {"match[]": "up"})}
    return labels, values, jobs


def _timestamp(rfc3339: str) -> float:
    """Prometheus's RFC 3339 times carry nanoseconds; datetime takes microseconds."""
    text = re.sub(r"(\.\d{6})\d+", r"\1", rfc3339).replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(text).timestamp()


def _rules_seen(prom: PrometheusProcess, after: float) -> dict[str, dict] | None:
    """Every rule, once each group was evaluated after `after` (when both targets had been
    scraped): an evaluation before the first scrape sees no `up` series at all."""
    groups = prom.api("/api/v1/rules")["groups"]
    if not all(_timestamp(g.get("lastEvaluation", "0001-01-01T00:00:00Z")) > after for g in groups):
        return None
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    evaluated = all(r["health"] != "unknown" for r in rules.values())
    registration = rules.get("DuplexlineSipRegistrationDown", {}).get("state", "inactive") != "inactive"
    return rules if evaluated and registration else None


def _value(prom: PrometheusProcess, query: str) -> float:
    result = prom.api("/api/v1/query", {"query": query})["result"]
    return float(result[0]["value"][1]) if result else 0.0


async def _overfill(worker: WorkerProcess) -> str:
    """One session more than the worker's slots, through the bridges' own client: the worker
    refuses the last. Returns the refusal's reason; closing the client ends its connection."""
    engine = RemoteVoiceEngine(CollectorRegistry(), bridge_id="deploy-test-client", urls=[worker.address])
    await engine.start()
    sessions = []
    try:
        for _ in range(WORKER_SLOTS):
            sessions.append(await engine.open_session())
        with pytest.raises(EngineFull) as refused:
            await engine.open_session()
        return refused.value.reason
    finally:
        for session in sessions:
            session.close()
        await engine.close()


def _sessions(worker: WorkerProcess) -> int:
    try:
        return http_json("GET", worker.url + "/readyz", timeout=2)[1].get("sessions", 0)
    except OSError:
        return 0


@pytest.fixture(scope="module")
def scrape(tmp_path_factory):
    """Two workers, a bridge and Prometheus up; a refusal, a call, a lost worker, each seen
    in a scrape.

    The bridge has one SIP account whose registrar does not exist (a closed port on
    loopback), so the registration metrics are exported and DuplexlineSipRegistrationDown
    has something real to see."""
    tmp = tmp_path_factory.mktemp("deploy-metrics")
    require_binary("prometheus", "prometheus")
    redis_binary = shutil.which("redis-server")
    if redis_binary is None:
        pytest.fail("redis-server not found on PATH: install it with `apt-get install redis-server`")
    (tmp / "redis").mkdir()
    redis = RedisServer(redis_binary, tmp / "redis")
    accounts = tmp / "accounts.json"
    accounts.write_text(json.dumps([{"name": TEST_ACCOUNT, "user": "1000", "domain": "127.0.0.1",
                                     "password": "not-a-secret", "registrar": f"127.0.0.1:{free_port()}",
                                     "interval": 600}]))
    workers = [WorkerProcess("--worker-id", f"worker-{n}", "--slots", str(WORKER_SLOTS), "--device", "cpu",
                             log_path=tmp / f"worker-{n}.log") for n in ("a", "b")]
    bridge = ServeProcess("--agent", "omniflatten", "--sip-accounts", str(accounts), "--rtp-ports", "23000-23999",
                          log_path=tmp / "bridge.log")
    try:
        redis.start()
        for w in workers:
            w.args += ["--redis", redis.url]
        bridge.args += ["--engine", "redis", "--redis", redis.url]
        for w in workers:
            w.start(timeout=120)
        bridge.start()
        for server in (*workers, bridge):  # as the readiness probes do
            assert http_json("GET", server.url + "/readyz")[0] == 200, server.log()
        config = _test_config([w.address for w in workers], f"127.0.0.1:{bridge.http_port}")
        with PrometheusProcess(config, tmp / "prometheus") as prom:
            prom.wait_for(lambda: sum(t["health"] == "up" for t in prom.targets()) == 3, 30,
                          "the workers and the bridge scraped and up")
            scraped_at = time.time()
            # Rules evaluated on scraped data: the test account's alert is pending by then.
            rules_before_call = prom.wait_for(lambda: _rules_seen(prom, scraped_at), 20,
                                              "every alert rule evaluated, DuplexlineSipRegistrationDown "
                                              "pending for the test account")
            # A full worker refuses a session; the client's connection ends.
            refused_reason = asyncio.run(_overfill(workers[0]))
            prom.wait_for(lambda: _value(prom, "sum(duplexline_worker_refused_total)") >= 1, 15,
                          "the refusal in a scrape")
            prom.wait_for(lambda: _value(prom, "sum(duplexline_worker_bridges_lost_total)") >= 1, 15,
                          "the client's ended connection in a scrape")
            with BaresipPeer(tmp, user="caller") as peer:
                peer.dial(f"sip:agent@127.0.0.1:{bridge.sip_port}")
                peer.wait_event("CALL_ESTABLISHED", timeout=20)
                # Scrapes during the call: it is live, and the model steps its chunks on a worker.
                prom.wait_for(lambda: _value(prom, 'sum(duplexline_calls_active{transport="sip"})') >= 1, 15,
                              "the live call in a scrape")
                prom.wait_for(lambda: _value(prom, "sum(duplexline_agent_chunk_step_seconds_count)") >= 3, 30,
                              f"the call's chunk steps in a scrape; bridge log:\n{bridge.log()}")
                prom.wait_for(lambda: _value(prom, "sum(duplexline_worker_sessions)") >= 1, 15,
                              "the call's session on a worker in a scrape")
                [holder] = [w for w in workers if _sessions(w) == 1]
                [other] = [w for w in workers if w is not holder]
                holder.kill()  # SIGKILL: the bridge must notice and move the call
                prom.wait_for(lambda: _value(prom, "sum(duplexline_agent_rehomes_total)") >= 1, 20,
                              f"the call re-homed in a scrape; bridge log:\n{bridge.log()}")
                steps = _value(prom, "sum(duplexline_agent_chunk_step_seconds_count)")
                prom.wait_for(lambda: _value(prom, "sum(duplexline_agent_chunk_step_seconds_count)") >= steps + 3, 30,
                              f"the call stepping on the other worker; bridge log:\n{bridge.log()}")
                assert _sessions(other) == 1, other.log()
                peer.hangup()
                peer.wait_event("CALL_CLOSED", timeout=10)
            prom.wait_for(lambda: _value(prom, 'sum(duplexline_calls_total{transport="sip"})') >= 1, 15,
                          "the ended call in duplexline_calls_total")
            labels, values, jobs = _scraped(prom)
            yield {"prom": prom, "labels": labels, "values": values, "jobs": jobs,
                   "rules_before_call": rules_before_call, "refused_reason": refused_reason,
                   "holder": holder.address, "other": other.address}
    finally:
        for w in workers:
            w.kill()
        bridge.kill()
        redis.kill()


def test_every_metric_the_dashboard_and_alerts_use_is_scraped(scrape):
    labels, values = scrape["labels"], scrape["values"]
    problems = []
    for use in dashboard_uses() + alert_uses():
        for name in sorted(use.metrics):
            if name not in labels:
                problems.append(f"{use.where}: metric {name} is not exported (scraped: no such series)")
                continue
            for label in sorted(use.labels.get(name, ())):
                if label not in labels[name]:
                    problems.append(f"{use.where}: {name} has no label {label!r} (it has {sorted(labels[name])})")
            for (metric, label), wanted in use.values.items():
                if metric == name and label in labels[name] and not wanted <= values[(name, label)]:
                    problems.append(f"{use.where}: {name}{{{label}=...}} never takes the value(s) "
                                    f"{sorted(wanted - values[(name, label)])} (it takes {sorted(values[(name, label)])})")
        for job_re in use.job_regexes:
            if not any(re.fullmatch(job_re, job) for job in scrape["jobs"]):
                problems.append(f"{use.where}: job regex {job_re!r} matches no scraped job {sorted(scrape['jobs'])}")
        # A label a legend or annotation prints must survive the aggregation.
        available = use.grouped or set().union({"job", "instance"} if use.uses_up else set(),
                                               *(labels.get(n, set()) for n in use.metrics))
        for label in sorted(use.shown - available):
            problems.append(f"{use.where}: prints {{{{{label}}}}} but the expression's result has no such label "
                            f"(it keeps {sorted(available)})")
    assert not problems, "the dashboard or alerts would show no data:\n" + "\n".join(problems)


def test_the_test_call_was_seen_by_prometheus(scrape):
    """The scrapes saw a real SIP call on the bridge: answered, live for a while, set up,
    placed on a worker, stepped there, moved to the other worker when its first one died,
    ended."""
    prom = scrape["prom"]
    bridge = 'job="duplexline-bridge"'
    assert _value(prom, f'sum(duplexline_sip_invites_total{{{bridge}, outcome="answered"}})') == 1
    assert _value(prom, f'max_over_time(duplexline_calls_active{{{bridge}, transport="sip"}}[5m])') == 1
    assert _value(prom, 'sum(duplexline_calls_active)') == 0
    assert _value(prom, f'sum(duplexline_sip_call_setup_seconds_count{{{bridge}}})') == 1
    assert _value(prom, f'sum(duplexline_calls_total{{{bridge}, transport="sip", outcome="completed"}})') == 1
    # The bridge placed the session (and placed it again after the loss) and measured the
    # round trip; it lost one worker and re-homed one call.
    assert _value(prom, f'sum(duplexline_engine_placements_total{{{bridge}, outcome="placed"}})') >= 2
    assert _value(prom, f'sum(duplexline_engine_remote_rtt_seconds_count{{{bridge}}})') >= 1
    assert _value(prom, f'sum(duplexline_engine_workers_lost_total{{{bridge}}})') == 1
    assert _value(prom, f'sum(duplexline_agent_rehomes_total{{{bridge}}})') == 1
    # The engine's work is on the workers, each under its own instance: the first until it
    # died, then the other.
    for address in (scrape["holder"], scrape["other"]):
        worker = f'job="duplexline-worker", instance="{address}"'
        assert _value(prom, f'max_over_time(duplexline_engine_step_duration_seconds_count{{{worker}}}[5m])') >= 1, address
        assert _value(prom, f'max_over_time(duplexline_worker_sessions{{{worker}}}[5m])') == 1, address
    assert _value(prom, 'sum(duplexline_engine_step_duration_seconds_count{job="duplexline-bridge"})') == 0
    # The refusal, counted by the worker that refused (over time: it may be the one killed
    # since), and the client's connection, counted as closed when it closed.
    assert scrape["refused_reason"] in ("no_slot", "deadline")
    refused = 'max_over_time(duplexline_worker_refused_total{job="duplexline-worker"}[5m])'
    assert _value(prom, f"sum({refused})") == 1
    assert _value(prom, f'count(sum by (reason) ({refused}) > 0)') == 1
    assert _value(prom, 'sum(max_over_time(duplexline_worker_bridges_lost_total{how="closed"}[5m]))') >= 1


def test_every_dashboard_query_parses_on_prometheus(scrape):
    prom = scrape["prom"]
    failures = []
    for use in dashboard_uses():
        expr = use.expr
        for var, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(var, value)
        if use.where.startswith("dashboard variable"):
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", expr)
            assert match, f"{use.where}: {expr}"
            expr = match.group(1)
        try:
            prom.api("/api/v1/query", {"query": expr})
        except AssertionError as exc:
            failures.append(f"{use.where}: {exc}")
    assert not failures, "\n".join(failures)


def test_every_alert_rule_evaluates_on_prometheus_without_error(scrape):
    """Each rule of alerts.yml evaluates on the real series without error, and on a healthy
    pair of replicas only the one alert with a real cause is active: the test account's
    registrar does not exist."""
    rules = scrape["rules_before_call"]
    shipped = {rule["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for rule in g["rules"]}
    assert set(rules) == shipped
    bad = {name: r.get("lastError") for name, r in rules.items() if r["health"] != "ok"}
    assert not bad, bad
    active = {name: [a["labels"] for a in r["alerts"]] for name, r in rules.items() if r["state"] != "inactive"}
    assert set(active) == {"DuplexlineSipRegistrationDown"}, active
    [labels] = active["DuplexlineSipRegistrationDown"]
    assert labels["account"] == TEST_ACCOUNT and labels["job"] == "duplexline-bridge", labels
