"""The Grafana dashboard as code: the JSON is what deploy/grafana/dashboard.py writes, it is
a dashboard Grafana lays out without overlaps, every panel uses the provisioned data source,
and it shows what an operator needs at a glance (issue 8's list), the bridges' view of the
workers, and a row per worker. Whether its queries name real metrics is
test_deploy_metrics.py's job, against a real Prometheus."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from tests.integration.serve_process import REPO

GRAFANA = REPO / "deploy/grafana"
DASHBOARD = GRAFANA / "dashboards/duplexline.json"


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_the_json_is_what_the_script_writes():
    proc = subprocess.run([sys.executable, str(GRAFANA / "dashboard.py"), "--check"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_panels_are_laid_out_on_the_grid_without_overlap():
    panels = dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_every_query_uses_the_provisioned_data_source():
    provisioned = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    [ds] = provisioned["datasources"]
    dash = dashboard()
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == ds["uid"], p["title"]
        assert p["targets"], f"{p['title']!r} has no query"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == ds["uid"] and t["expr"].strip(), (p["title"], t["refId"])
        assert p.get("description"), f"{p['title']!r}: say what the panel shows"
    for var in dash["templating"]["list"]:
        assert var["datasource"]["uid"] == ds["uid"]
    assert dash["uid"] == "duplexline" and dash["title"] == "duplexline"


def test_the_dashboard_shows_what_an_operator_reads_at_a_glance():
    """Issue 8's list, each by the panel that shows it and the metric it reads."""
    panels = {p["title"]: " ".join(t["expr"] for t in p.get("targets", [])) for p in dashboard()["panels"]}
    wanted = {
        "Live calls by transport": "duplexline_calls_active",
        "Call outcomes (per minute)": "duplexline_calls_total",
        "Call setup time": "duplexline_sip_call_setup_seconds_bucket",
        "Frame lateness": "duplexline_agent_frame_lateness_seconds_bucket",
        "Time to first audio": "duplexline_agent_first_audio_seconds_bucket",
        "Barge-in flush time": "duplexline_agent_bargein_flush_seconds_bucket",
        "Engine step time vs chunk budget": "duplexline_engine_chunk_period_seconds",
        "Batch size and slot occupancy": "duplexline_engine_batch_size_count",
        "Missed deadlines and refusals (per second)": "duplexline_engine_missed_deadlines_total",
        "SIP registrations": "duplexline_sip_registration_up",
        "Redis health": "duplexline_store_up",
        "Replicas": "up{",
    }
    for title, metric in wanted.items():
        assert title in panels, f"no panel {title!r}"
        assert metric in panels[title], (title, metric)
    assert "duplexline_engine_step_duration_seconds_bucket" in panels["Engine step time vs chunk budget"]
    assert "duplexline_engine_slots_total" in panels["Batch size and slot occupancy"]
    # The bridges' side of the split: reaching the workers.
    for title, metric in {"Worker round trip": "duplexline_engine_remote_rtt_seconds_bucket",
                          "Placements (per minute)": "duplexline_engine_placements_total",
                          "Workers lost and calls re-homed (per minute)": "duplexline_agent_rehomes_total"}.items():
        assert title in panels and metric in panels[title], (title, metric)
    assert "duplexline_engine_workers_lost_total" in panels["Workers lost and calls re-homed (per minute)"]
    # The operators' records: line quality, and what would leave a gap in records or recordings.
    assert "duplexline_line_mos_bucket" in panels["Line quality"]
    assert "duplexline_line_packet_loss_ratio_bucket" in panels["Line quality"]
    for metric in ("duplexline_cdr_records_total", "duplexline_webhook_deliveries_total",
                   "duplexline_recording_frames_dropped_total"):
        assert metric in panels["Records, webhooks, recordings (per minute)"], metric


def _worker_jobs() -> set[str]:
    """The job name both scrape configs give the workers."""
    jobs = set()
    for name in ("prometheus.yml", "prometheus-kubernetes.yml"):
        config = yaml.safe_load((REPO / "deploy/prometheus" / name).read_text())
        jobs |= {j["job_name"] for j in config["scrape_configs"] if "worker" in j["job_name"]}
    return jobs


def test_a_row_per_worker():
    """The issue's "a row per worker": a row repeated over the `worker` variable (every
    instance of the workers' job, up or down), holding sessions, tick time, refusals and
    connections of that one worker."""
    dash = dashboard()
    [job] = _worker_jobs()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    worker = variables["worker"]
    assert worker["query"]["query"] == f'label_values(up{{job="{job}"}}, instance)'
    assert worker["includeAll"] and worker["multi"], "a repeated row needs every worker selectable"
    panels = dash["panels"]
    rows = [i for i, p in enumerate(panels) if p["type"] == "row"]
    repeated = [i for i in rows if panels[i].get("repeat")]
    assert len(repeated) == 1 and panels[repeated[0]]["repeat"] == "worker"
    assert repeated[0] == rows[-1], "the repeated row must be last: it holds every panel below it"
    assert "$worker" in panels[repeated[0]]["title"]
    below = panels[repeated[0] + 1:]
    assert below and all(p["gridPos"]["y"] > panels[repeated[0]]["gridPos"]["y"] for p in below)
    wanted = {"Sessions by bridge": "duplexline_worker_sessions", "Tick time": "duplexline_engine_step_duration_seconds_bucket",
              "Refusals (per second)": "duplexline_worker_refused_total",
              "Bridge connections": "duplexline_worker_connections"}
    titles = {p["title"]: p for p in below}
    assert set(wanted) <= set(titles), sorted(titles)
    for title, metric in wanted.items():
        exprs = [t["expr"] for t in titles[title]["targets"]]
        assert any(metric in e for e in exprs), (title, metric)
    for p in below:  # each panel shows the row's worker, and only workers
        for t in p["targets"]:
            if "duplexline_" in t["expr"]:
                assert 'instance=~"$worker"' in t["expr"] and f'job="{job}"' in t["expr"], (p["title"], t["expr"])
                assert "$instance" not in t["expr"], (p["title"], t["expr"])
    # Panels above the repeated row do not depend on it (they would show one worker only).
    for p in panels[:repeated[0]]:
        assert all("$worker" not in t["expr"] for t in p.get("targets", [])), p["title"]


def test_the_provider_serves_the_folder_and_keeps_ui_edits_out():
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/duplexline.yml").read_text())
    [prov] = provider["providers"]
    assert prov["type"] == "file" and prov["allowUiUpdates"] is False
    assert prov["options"]["path"].startswith("/var/lib/grafana/dashboards")
