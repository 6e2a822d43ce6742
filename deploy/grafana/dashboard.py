"""The duplexline Grafana dashboard, as code.

    python deploy/grafana/dashboard.py          # rewrite dashboards/duplexline.json
    python deploy/grafana/dashboard.py --check  # exit 1 when the JSON is not what this writes

Grafana provisions dashboards/duplexline.json (provisioning/dashboards/duplexline.yml); this
file is its source, so a review reads panels and queries instead of 2,000 lines of JSON. Edit
here, run it, commit both (tests/integration/test_deploy_grafana.py runs --check).

An operator reads it top to bottom: are calls flowing (live calls, outcomes, alerts), are
they good (setup, time to first audio, frame lateness, barge-in), is there room (engine step
against the chunk budget, batch size, slots, missed deadlines), is the plumbing up
(registrations, Redis, replicas), do the bridges reach the workers (round trip, placements,
workers lost, calls re-homed), and then one row per worker (sessions by bridge, tick time,
refusals, bridge connections), repeated over the `worker` variable: a worker added to the
deployment gets its row without an edit here. Every query but the per-worker rows' filters
by the `job` and `instance` variables, and every metric it names is checked against a real
scrape of a worker (`duplexline worker`) and a bridge (`duplexline serve --engine redis`)
(tests/integration/test_deploy_metrics.py), so a renamed metric fails a test instead of
showing "No data".

Standard library only: it runs with any python3.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "duplexline.json"
DATASOURCE = {"type": "prometheus", "uid": "duplexline-prometheus"}  # provisioning/datasources
SEL = 'job=~"$job", instance=~"$instance"'  # every query's selector
WORKER_JOB = "duplexline-worker"  # prometheus.yml's and prometheus-kubernetes.yml's job name
WSEL = f'job="{WORKER_JOB}", instance=~"$worker"'  # the per-worker rows' selector
TTFA_BUDGET = 1.2  # seconds; the same budget as DuplexlineTimeToFirstAudioHigh in alerts.yml


def q(expr: str, legend: str = "") -> dict:
    """One query; its refId is set by the panel that holds it (refs)."""
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend or "__auto", "refId": "A",
            "range": True}


def quantiles(metric: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.99), prefix: str = "",
              sel: str = SEL) -> list[dict]:
    """p50/p99 (by default) of a histogram over 5 minutes, optionally split by a label."""
    group = f"{by}, le" if by else "le"
    out = []
    for quantile in qs:
        name = f"p{int(quantile * 100)}"
        legend = f"{prefix}{name}" + (f" {{{{{by}}}}}" if by else "")
        out.append(q(f"histogram_quantile({quantile}, sum by ({group}) "
                     f"(rate({metric}_bucket{{{sel}}}[5m])))", legend))
    return out


def refs(targets: list[dict]) -> list[dict]:
    for i, t in enumerate(targets):
        t["refId"] = chr(ord("A") + i)
    return targets


def thresholds(*steps: tuple[float | None, str]) -> dict:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for v, c in steps]}


def timeseries(title: str, desc: str, targets: list[dict], unit: str = "short", *, min0: bool = True,
               overrides: list[dict] | None = None, stack: bool = False, th: dict | None = None) -> dict:
    custom = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if not stack else 40,
              "showPoints": "never", "spanNulls": False,
              "stacking": {"mode": "normal" if stack else "none", "group": "A"}}
    if th is not None:
        custom["thresholdsStyle"] = {"mode": "dashed"}
    defaults: dict = {"unit": unit, "custom": custom, "color": {"mode": "palette-classic"}}
    if min0:
        defaults["min"] = 0
    if th is not None:
        defaults["thresholds"] = th
    return {"type": "timeseries", "title": title, "description": desc, "datasource": DATASOURCE,
            "targets": refs(targets), "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}}}


def stat(title: str, desc: str, expr: str, unit: str = "short", th: dict | None = None,
         mappings: list[dict] | None = None, legend: str = "") -> dict:
    return {"type": "stat", "title": title, "description": desc, "datasource": DATASOURCE,
            "targets": [q(expr, legend)],
            "fieldConfig": {"defaults": {"unit": unit, "mappings": mappings or [],
                                         "thresholds": th or thresholds((None, "green")),
                                         "color": {"mode": "thresholds"}}, "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "background", "graphMode": "none", "textMode": "auto",
                        "justifyMode": "auto", "orientation": "auto"}}


def state_timeline(title: str, desc: str, targets: list[dict], mappings: list[dict]) -> dict:
    return {"type": "state-timeline", "title": title, "description": desc, "datasource": DATASOURCE,
            "targets": refs(targets),
            "fieldConfig": {"defaults": {"mappings": mappings, "color": {"mode": "thresholds"},
                                         "thresholds": thresholds((None, "red"), (1, "green"))},
                            "overrides": []},
            "options": {"showValue": "never", "mergeValues": True, "rowHeight": 0.8,
                        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": False}}}


def up_down(up: str = "up", down: str = "down") -> list[dict]:
    return [{"type": "value", "options": {"0": {"text": down, "color": "red", "index": 0},
                                          "1": {"text": up, "color": "green", "index": 1}}}]


DASHED = {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}}


def series_color(name: str, color: str, dashed: bool = False) -> dict:
    props: list[dict] = [{"id": "color", "value": {"mode": "fixed", "fixedColor": color}}]
    if dashed:
        props.append(DASHED)
    return {"matcher": {"id": "byName", "options": name}, "properties": props}


def right_axis(name: str) -> dict:
    """A count drawn against the right axis of a panel whose left axis is seconds."""
    return {"matcher": {"id": "byName", "options": name},
            "properties": [{"id": "unit", "value": "short"}, {"id": "custom.axisPlacement", "value": "right"}]}


def row(title: str, repeat: str | None = None) -> dict:
    """A row; with `repeat`, Grafana draws it and the panels under it (up to the next row)
    once per value of that variable."""
    out = {"type": "row", "title": title, "collapsed": False, "panels": []}
    if repeat:
        out["repeat"] = repeat
    return out


def panels() -> list[tuple[dict, int, int]]:
    """(panel, width, height) in reading order; laid out left to right in 24 columns."""
    per_min = "* 60"
    return [
        (row("Calls: are they flowing?"), 24, 1),
        (stat("Live calls", "Calls in progress on the selected replicas, every transport.",
              f"sum(duplexline_calls_active{{{SEL}}})"), 4, 4),
        (stat("Replicas up", "Bridge and worker processes Prometheus scrapes successfully.",
              f'sum(up{{{SEL}}})', th=thresholds((None, "red"), (1, "green"))), 4, 4),
        (stat("Slot occupancy", "Engine slots in use / configured (worst replica). Above 90% the "
              "next calls are refused.",
              f"max(duplexline_engine_slots_used{{{SEL}}} / duplexline_engine_slots_total{{{SEL}}})",
              "percentunit", thresholds((None, "green"), (0.75, "yellow"), (0.9, "red"))), 4, 4),
        (stat("Alerts firing", "duplexline alerts firing now (Prometheus /alerts lists them).",
              'count(ALERTS{alertstate="firing", alertname=~"Duplexline.*"}) or vector(0)',
              th=thresholds((None, "green"), (1, "red"))), 4, 4),
        (stat("Redis", "Session store reachable on every selected replica (at its last contact).",
              f"min(duplexline_store_up{{{SEL}}})", th=thresholds((None, "red"), (1, "green")),
              mappings=up_down("reachable", "unreachable")), 4, 4),
        (stat("SIP registrations", "Configured SIP accounts not registered now (0 is good; no "
              "accounts configured also shows 0).",
              f"count(duplexline_sip_registration_up{{{SEL}}} == 0) or vector(0)",
              th=thresholds((None, "green"), (1, "red"))), 4, 4),
        (timeseries("Live calls by transport", "Calls in progress, SIP and WebRTC, stacked.",
                    [q(f"sum by (transport) (duplexline_calls_active{{{SEL}}})", "{{transport}}")],
                    stack=True), 8, 8),
        (timeseries("Call outcomes (per minute)", "Calls that ended or were refused, by transport and "
                    "outcome (completed, refused_draining, refused_<SIP status>).",
                    [q(f"sum by (transport, outcome) (rate(duplexline_calls_total{{{SEL}}}[5m])) {per_min}",
                       "{{transport}} {{outcome}}")], "short", stack=True), 8, 8),
        (timeseries("INVITEs and offers by outcome (per minute)", "New SIP INVITEs and WebRTC offers "
                    "by how they were answered: anything but `answered` is a caller turned away.",
                    [q(f"sum by (outcome) (rate(duplexline_sip_invites_total{{{SEL}}}[5m])) {per_min} > 0",
                       "SIP {{outcome}}"),
                     q(f"sum by (outcome) (rate(duplexline_webrtc_offers_total{{{SEL}}}[5m])) {per_min} > 0",
                       "WebRTC {{outcome}}")],
                    "short", overrides=[series_color("SIP answered", "green"),
                                        series_color("WebRTC answered", "blue")]), 8, 8),

        (row("Call quality: is it good?"), 24, 1),
        (timeseries("Call setup time", "SIP: INVITE received to 200 OK sent. WebRTC: answer sent to "
                    "peer connection connected.",
                    quantiles("duplexline_sip_call_setup_seconds", prefix="SIP ")
                    + quantiles("duplexline_webrtc_connect_seconds", prefix="WebRTC "), "s"), 8, 8),
        (timeseries("Time to first audio", f"Caller stops speaking to the assistant's first audio "
                    f"(p50, p99), against the {TTFA_BUDGET} s budget of the TimeToFirstAudio alert; "
                    f"and the pipeline's response per chunk (end of a user chunk to its audio queued).",
                    quantiles("duplexline_agent_first_audio_seconds")
                    + quantiles("duplexline_agent_response_seconds", qs=(0.99,), prefix="chunk response ")
                    + [q(f"vector({TTFA_BUDGET})", "budget")], "s",
                    overrides=[series_color("budget", "red", dashed=True)]), 8, 8),
        (timeseries("Frame lateness", "How late each caller 20 ms frame reached the agent against the "
                    "call's frame clock (p50, p99), and frames more than one frame period late.",
                    quantiles("duplexline_agent_frame_lateness_seconds")
                    + [q(f"sum(rate(duplexline_agent_late_frames_total{{{SEL}}}[5m]))", "late frames/s")],
                    "s", overrides=[right_axis("late frames/s")]),
         8, 8),
        (timeseries("Barge-in flush time", "From the model going silent on a user interruption to "
                    "playout flushed (p50, p99); barge-ins per minute on the right axis.",
                    quantiles("duplexline_agent_bargein_flush_seconds")
                    + [q(f"sum(rate(duplexline_agent_bargeins_total{{{SEL}}}[5m])) {per_min}", "barge-ins/min")],
                    "s", overrides=[right_axis("barge-ins/min")]),
         8, 8),
        (timeseries("Playout depth", "Assistant audio queued for playout at each chunk (p50, p99): "
                    "growing means the caller hears the assistant later and later.",
                    quantiles("duplexline_agent_playout_depth_seconds"), "s"), 8, 8),
        (timeseries("Dropped audio (per second)", "Caller frames dropped by the agent (backlog, on "
                    "hold) and user chunks the engine dropped (answered with silence).",
                    [q(f"sum by (reason) (rate(duplexline_agent_dropped_frames_total{{{SEL}}}[5m]))",
                       "frames {{reason}}"),
                     q(f"sum(rate(duplexline_engine_dropped_chunks_total{{{SEL}}}[5m]))", "engine chunks")]),
         8, 8),
        (timeseries("Line quality", "Ended calls' estimated MOS (p10, p50; below 3.6 callers notice) and "
                    "packet loss (p90, right axis), by transport (docs/quality.md); dead-air stretches "
                    "per minute.",
                    quantiles("duplexline_line_mos", by="transport", qs=(0.1, 0.5), prefix="MOS ")
                    + quantiles("duplexline_line_packet_loss_ratio", by="transport", qs=(0.9,), prefix="loss ")
                    + [q(f"sum(rate(duplexline_line_dead_air_total{{{SEL}}}[5m])) {per_min}", "dead air/min")],
                    overrides=[{"matcher": {"id": "byRegexp", "options": "loss.*|dead air.*"},
                                "properties": [{"id": "custom.axisPlacement", "value": "right"}]}]), 8, 8),
        (timeseries("Records, webhooks, recordings (per minute)", "Call detail records and webhook "
                    "deliveries that failed or were dropped (full queue), webhook retries, and recording "
                    "frames dropped: each means something an operator relies on is missing "
                    "(docs/cdr.md, docs/webhooks.md, docs/recording.md).",
                    [q(f"sum by (sink, outcome) (increase(duplexline_cdr_records_total{{{SEL}, "
                       f"outcome!=\"written\"}}[1m]))", "CDR {{sink}}: {{outcome}}"),
                     q(f"sum by (outcome) (increase(duplexline_webhook_deliveries_total{{{SEL}, "
                       f"outcome!=\"delivered\"}}[1m]))", "webhook: {{outcome}}"),
                     q(f"sum(increase(duplexline_webhook_retries_total{{{SEL}}}[1m]))", "webhook retries"),
                     q(f"sum(increase(duplexline_recording_frames_dropped_total{{{SEL}}}[1m]))",
                       "recording frames dropped")]), 8, 8),

        (row("Engine: is there room?"), 24, 1),
        (timeseries("Engine step time vs chunk budget", "One batched chunk step (p50, p99) against "
                    "the chunk period every session steps on: a step longer than the period misses "
                    "deadlines.",
                    quantiles("duplexline_engine_step_duration_seconds", by="instance")
                    + [q(f"max(duplexline_engine_chunk_period_seconds{{{SEL}}})", "chunk period (budget)")],
                    "s", overrides=[series_color("chunk period (budget)", "red", dashed=True)]), 8, 8),
        (timeseries("Batch size and slot occupancy", "Sessions stepped together per batch (mean) and "
                    "slots in use / configured.",
                    [q(f"sum(rate(duplexline_engine_batch_size_sum{{{SEL}}}[5m])) / "
                       f"sum(rate(duplexline_engine_batch_size_count{{{SEL}}}[5m]))", "mean batch size"),
                     q(f"sum by (instance) (duplexline_engine_slots_used{{{SEL}}})", "slots used {{instance}}"),
                     q(f"sum by (instance) (duplexline_engine_slots_total{{{SEL}}})", "slots total {{instance}}")],
                    overrides=[{"matcher": {"id": "byRegexp", "options": "slots total.*"},
                                "properties": [DASHED]}]), 8, 8),
        (timeseries("Missed deadlines and refusals (per second)", "Chunk results later than one "
                    "chunk period, and sessions the engine would not admit, by reason.",
                    [q(f"sum by (instance) (rate(duplexline_engine_missed_deadlines_total{{{SEL}}}[5m]))",
                       "missed {{instance}}"),
                     q(f"sum by (reason) (rate(duplexline_engine_admission_refusals_total{{{SEL}}}[5m]))",
                       "refused: {{reason}}")]), 8, 8),

        (row("Plumbing: is it up?"), 24, 1),
        (state_timeline("SIP registrations", "Each configured account: registered or not. Empty when "
                        "no account is configured (inbound-only trunks).",
                        [q(f"duplexline_sip_registration_up{{{SEL}}}", "{{account}} ({{instance}})")],
                        up_down("registered", "not registered")), 8, 8),
        (timeseries("Redis health", "Session store reachable (1) per replica at its last contact; "
                    "failed store operations and outages (became unreachable) per minute.",
                    [q(f"min by (instance) (duplexline_store_up{{{SEL}}})", "up {{instance}}"),
                     q(f"sum by (instance) (increase(duplexline_store_errors_total{{{SEL}}}[1m]))",
                       "errors/min {{instance}}"),
                     q(f"sum by (instance) (increase(duplexline_store_outages_total{{{SEL}}}[1m]))",
                       "outages/min {{instance}}")]), 8, 8),
        (state_timeline("Replicas", "Every bridge and worker process Prometheus scrapes: up or down.",
                        [q(f"up{{{SEL}}}", "{{job}} {{instance}}")], up_down()), 8, 8),

        (row("Bridges to workers: placement"), 24, 1),
        (timeseries("Worker round trip", "Bridge to engine worker and back (ping to pong on the "
                    "session connection), p50 and p99 per bridge: it adds to every chunk's delay.",
                    quantiles("duplexline_engine_remote_rtt_seconds", by="instance"), "s"), 8, 8),
        (timeseries("Placements (per minute)", "Calls' model sessions placed on workers by outcome: "
                    "placed, refused (the worker was full or draining; the next one is asked) and "
                    "unreachable. No `placed` while calls arrive: no worker with room.",
                    [q(f"sum by (outcome) (rate(duplexline_engine_placements_total{{{SEL}}}[5m])) {per_min}",
                       "{{outcome}}")],
                    overrides=[series_color("placed", "green")]), 8, 8),
        (timeseries("Workers lost and calls re-homed (per minute)", "Worker connections a bridge "
                    "lost (worker-lost: closed; heartbeat: silent), and live calls moved to another "
                    "worker by why (the caller heard a short silence).",
                    [q(f"sum by (reason) (increase(duplexline_engine_workers_lost_total{{{SEL}}}[1m]))",
                       "lost: {{reason}}"),
                     q(f"sum by (reason) (increase(duplexline_agent_rehomes_total{{{SEL}}}[1m]))",
                       "re-homed: {{reason}}")]), 8, 8),

        # One row per worker (the `worker` variable): the last row, so it holds every panel
        # below it.
        (row("Worker $worker", repeat="worker"), 24, 1),
        (timeseries("Sessions by bridge", "Sessions open on this worker, per bridge connected, "
                    "stacked, against the worker's slots.",
                    [q(f"sum by (bridge) (duplexline_worker_sessions{{{WSEL}}})", "{{bridge}}"),
                     q(f"max(duplexline_engine_slots_total{{{WSEL}}})", "slots")],
                    overrides=[{"matcher": {"id": "byName", "options": "slots"},
                                "properties": [DASHED, {"id": "custom.stacking",
                                                        "value": {"mode": "none", "group": "A"}}]}],
                    stack=True), 6, 8),
        (timeseries("Tick time", "One engine tick on this worker (p50, p99) against the chunk "
                    "period: a tick longer than the period misses deadlines.",
                    quantiles("duplexline_engine_step_duration_seconds", sel=WSEL)
                    + [q(f"max(duplexline_engine_chunk_period_seconds{{{WSEL}}})", "chunk period (budget)")],
                    "s", overrides=[series_color("chunk period (budget)", "red", dashed=True)]), 6, 8),
        (timeseries("Tick stages", "Where one tick's time goes on this worker, mean per tick: the "
                    "speech tokenizer over the callers' audio, the LLM step, the speech decoder over "
                    "the assistants' codes (each one batch; LLM = tick - tokenizer - decoder).",
                    [q(f"sum(rate(duplexline_engine_tokenizer_duration_seconds_sum{{{WSEL}}}[5m])) / "
                       f"sum(rate(duplexline_engine_step_duration_seconds_count{{{WSEL}}}[5m]))", "tokenizer"),
                     q(f"(sum(rate(duplexline_engine_step_duration_seconds_sum{{{WSEL}}}[5m])) - "
                       f"sum(rate(duplexline_engine_tokenizer_duration_seconds_sum{{{WSEL}}}[5m])) - "
                       f"sum(rate(duplexline_engine_decoder_duration_seconds_sum{{{WSEL}}}[5m]))) / "
                       f"sum(rate(duplexline_engine_step_duration_seconds_count{{{WSEL}}}[5m]))", "LLM"),
                     q(f"sum(rate(duplexline_engine_decoder_duration_seconds_sum{{{WSEL}}}[5m])) / "
                       f"sum(rate(duplexline_engine_step_duration_seconds_count{{{WSEL}}}[5m]))", "decoder")],
                    "s", stack=True), 6, 8),
        (timeseries("Refusals (per second)", "Session opens this worker refused, by reason "
                    "(no_slot, deadline: its step time has no room; draining); bridges then ask "
                    "another worker.",
                    [q(f"sum by (reason) (rate(duplexline_worker_refused_total{{{WSEL}}}[5m]))",
                       "{{reason}}")]), 6, 8),
        (timeseries("Bridge connections", "Bridges connected to this worker, and connections that "
                    "ended per minute by how (closed, idle: the bridge went silent, protocol).",
                    [q(f"sum(duplexline_worker_connections{{{WSEL}}})", "connected"),
                     q(f"sum by (how) (increase(duplexline_worker_bridges_lost_total{{{WSEL}}}[1m]))",
                       "ended/min: {{how}}")]), 6, 8),
    ]


def layout(items: list[tuple[dict, int, int]]) -> list[dict]:
    out, x, y, row_h = [], 0, 0, 0
    for pid, (panel, w, h) in enumerate(items, start=1):
        if x + w > 24:
            x, y, row_h = 0, y + row_h, 0
        panel = {"id": pid, "gridPos": {"x": x, "y": y, "w": w, "h": h}, **panel}
        out.append(panel)
        x, row_h = x + w, max(row_h, h)
    return out


def variable(name: str, label: str, query: str, all_value: str) -> dict:
    return {"name": name, "label": label, "type": "query", "datasource": DATASOURCE,
            "query": {"query": query, "refId": f"{name}-values"}, "definition": query,
            "includeAll": True, "multi": True, "allValue": all_value, "refresh": 2, "sort": 1,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "options": []}


def dashboard() -> dict:
    return {
        "uid": "duplexline",
        "title": "duplexline",
        "description": "Calls, call quality, engine capacity and plumbing of duplexline bridges and "
                       "workers, placement, and a row per worker. Source: deploy/grafana/dashboard.py.",
        "tags": ["duplexline"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "schemaVersion": 39,
        "version": 1,
        "templating": {"list": [
            # "All" jobs means duplexline's, never Prometheus's own `up`.
            variable("job", "Job", 'label_values(up{job=~"duplexline-.*"}, job)', "duplexline-.*"),
            variable("instance", "Instance", 'label_values(up{job=~"$job"}, instance)', ".*"),
            # The per-worker rows repeat over it: every worker scraped, up or down.
            variable("worker", "Worker", f'label_values(up{{job="{WORKER_JOB}"}}, instance)', ".*"),
        ]},
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "links": [],
        "panels": layout(panels()),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if argv[1:] == ["--check"]:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python {Path(__file__).as_posix()}", file=sys.stderr)
            return 1
        return 0
    if argv[1:]:
        print(__doc__, file=sys.stderr)
        return 2
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
