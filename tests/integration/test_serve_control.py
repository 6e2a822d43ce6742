"""`duplexline serve` as a user runs it: it starts, answers the control plane, refuses
admin calls without the token, drains and exits cleanly on SIGTERM or POST /admin/drain."""

import re
import subprocess
import sys

import pytest

from tests.integration.serve_process import REPO, ServeProcess, http_json

AGENT_METRICS = [
    "duplexline_calls_active", "duplexline_calls_total", "duplexline_agent_frame_lateness_seconds",
    "duplexline_agent_playout_depth_seconds", "duplexline_agent_response_seconds",
    "duplexline_agent_bargein_flush_seconds", "duplexline_agent_chunk_step_seconds",
    "duplexline_agent_late_frames_total", "duplexline_agent_dropped_frames_total", "duplexline_store_up",
]
ENGINE_METRICS = [
    "duplexline_engine_step_duration_seconds", "duplexline_engine_batch_size", "duplexline_engine_slots_used",
    "duplexline_engine_missed_deadlines_total", "duplexline_engine_admission_refusals_total",
    "duplexline_engine_tokens_generated_total",
]


def test_serve_answers_the_control_plane_and_stops_on_sigterm(tmp_path):
    with ServeProcess("--agent", "omniflatten", "--admin-token", "s3cret",
                      log_path=tmp_path / "serve.log") as server:
        status, ready = http_json("GET", server.url + "/readyz")
        assert status == 200 and ready["ready"] and ready["agent"] == "omniflatten" and ready["store"] == "memory"
        assert http_json("GET", server.url + "/calls")[0] == 401  # call records are admin data
        assert http_json("GET", server.url + "/calls", token="s3cret") == (200, {"calls": []})
        assert http_json("GET", server.url + "/calls/nope", token="s3cret")[0] == 404
        assert http_json("POST", server.url + "/calls/nope/hangup")[0] == 401
        assert http_json("POST", server.url + "/calls/nope/hangup", token="wrong")[0] == 401
        assert http_json("POST", server.url + "/calls/nope/hangup", token="s3cret")[0] == 404
        status, body = http_json("GET", server.url + "/metrics")
        text = body["raw"]
        for name in AGENT_METRICS + ENGINE_METRICS:
            assert re.search(rf"^# TYPE {name} ", text, re.M), name
        assert "call_id" not in text  # bounded labels: never a call id
        assert server.terminate() == 0
        assert "untrained" in server.log().lower()
        assert "event loop uvloop" in server.log()  # the default
        assert "duplexline: stopped" in server.log()


def test_admin_drain_stops_the_process_on_the_standard_event_loop(tmp_path):
    with ServeProcess("--agent", "echo", "--event-loop", "asyncio", log_path=tmp_path / "serve.log") as server:
        status, body = http_json("POST", server.url + "/admin/drain")
        assert status == 202 and body["draining"]
        assert server.proc.wait(timeout=30) == 0
        assert "event loop asyncio" in server.log()


def test_bad_settings_are_refused_with_the_flag_named():
    proc = subprocess.run([sys.executable, "-m", "bridge.cli", "serve", "--sip-listen", "nowhere"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--sip-listen" in proc.stderr and "HOST:PORT" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "bridge.cli", "serve"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={"DUPLEXLINE_AGNET": "echo", "PATH": "/usr/bin"})
    assert proc.returncode == 2 and "DUPLEXLINE_AGNET" in proc.stderr and "unknown" in proc.stderr


def test_a_corrupt_model_folder_is_a_clear_error(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{not json")
    proc = subprocess.run([sys.executable, "-m", "bridge.cli", "serve", "--model", str(tmp_path / "m")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "config.json" in proc.stderr and "JSON" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["model", "init", "--help"]])
def test_help_describes_every_option(argv):
    proc = subprocess.run([sys.executable, "-m", "bridge.cli", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0
    if argv == ["serve", "--help"]:
        for flag in ("--sip-listen", "--http-listen", "--agent", "--model", "--redis", "--admin-token",
                     "--slots", "--device", "--drain-timeout"):
            assert flag in proc.stdout
        assert "DUPLEXLINE_SIP_LISTEN" in proc.stdout
