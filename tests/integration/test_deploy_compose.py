"""docker-compose.yml, the Dockerfile and .dockerignore, checked the way Docker reads them.

No Docker engine runs here, so nothing is built or started: `docker-compose config`
(Debian's docker-compose) validates and resolves the compose file, and the tests read the
resolved services; .dockerignore is evaluated with docker-py's own implementation (it comes
with docker-compose). The healthcheck commands the containers run are run for real against
a real `duplexline serve`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.prometheus_process import require_binary
from tests.integration.serve_process import REPO, ServeProcess, http_json

pytestmark = pytest.mark.timeout(120)

REQUIRED_ENV = {"DUPLEXLINE_ADMIN_TOKEN": "test-admin-token", "DUPLEXLINE_SIP_PUBLIC_ADDRESS": "192.0.2.10"}
DUPLEXLINE_SERVICES = ("worker", "worker-cpu", "bridge")


def compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    binary = require_binary("docker-compose", "docker-compose")
    # A clean environment: the caller's DUPLEXLINE_* variables must not leak into the check.
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([binary, "--project-directory", str(REPO), "-f", str(REPO / "docker-compose.yml"), *args],
                          cwd=REPO, env={**base, **(REQUIRED_ENV if env is None else env)},
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def resolved() -> dict:
    proc = compose("config")
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def env_of(service: dict) -> dict[str, str | None]:
    env = service.get("environment", {})
    return env if isinstance(env, dict) else dict(e.partition("=")[::2] for e in env)


def port(hostport: str) -> int:
    return int(hostport.rpartition(":")[2])


def rtp_range(service: dict) -> range:
    low, high = env_of(service)["DUPLEXLINE_RTP_PORTS"].split("-")
    return range(int(low), int(high) + 1)


def test_docker_compose_config_validates():
    proc = compose("config", "-q")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("missing", sorted(REQUIRED_ENV))
def test_compose_refuses_to_start_without_its_required_variables(missing):
    env = {k: v for k, v in REQUIRED_ENV.items() if k != missing}
    proc = compose("config", "-q", env=env)
    assert proc.returncode != 0 and missing in proc.stderr, proc.stderr


def test_the_services_and_their_roles(resolved):
    services = resolved["services"]
    assert set(services) == {"redis", "worker", "worker-cpu", "bridge", "prometheus", "grafana"}
    for name, service in services.items():
        assert service.get("network_mode") == "host", f"{name}: host networking (see the compose file's comment)"
    worker, cpu, bridge = services["worker"], services["worker-cpu"], services["bridge"]
    # The GPU worker reserves an NVIDIA GPU; the CPU fallback is the same worker without one.
    assert worker["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"] and "profiles" not in bridge
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] == 1
    assert "deploy" not in cpu and "deploy" not in bridge
    assert worker["command"][-2:] == ["--device", "cuda"] and cpu["command"][-2:] == ["--device", "cpu"]
    assert {"--agent", "omniflatten"} <= set(worker["command"]) and {"--agent", "echo"} <= set(bridge["command"])
    # Images built from this Dockerfile, the variant matching the tag.
    for name in DUPLEXLINE_SERVICES:
        service = services[name]
        assert service["build"]["context"] == str(REPO)
        assert service["image"] == f"duplexline:{service['build']['args']['VARIANT']}"
    assert worker["image"] == "duplexline:cuda" and cpu["image"] == bridge["image"] == "duplexline:cpu"


def test_processes_that_run_together_use_different_ports(resolved):
    services = resolved["services"]
    for worker_name in ("worker", "worker-cpu"):
        a, b = env_of(services[worker_name]), env_of(services["bridge"])
        for var in ("DUPLEXLINE_SIP_LISTEN", "DUPLEXLINE_HTTP_LISTEN"):
            assert port(a[var]) != port(b[var]), (worker_name, var)
        assert not set(rtp_range(services[worker_name])) & set(rtp_range(services["bridge"])), worker_name
        taken = {port(a["DUPLEXLINE_SIP_LISTEN"]), port(a["DUPLEXLINE_HTTP_LISTEN"]),
                 port(b["DUPLEXLINE_SIP_LISTEN"]), port(b["DUPLEXLINE_HTTP_LISTEN"])}
        others = {9090, 3000, port(a["DUPLEXLINE_REDIS"].rsplit("/", 1)[0])}
        assert not taken & others


def test_redis_is_where_the_bridges_look_for_it(resolved):
    services = resolved["services"]
    command = services["redis"]["command"]
    redis_port = int(command[command.index("--port") + 1])
    assert command[command.index("--bind") + 1] == "127.0.0.1"
    for name in DUPLEXLINE_SERVICES:
        assert env_of(services[name])["DUPLEXLINE_REDIS"] == f"redis://127.0.0.1:{redis_port}/0", name
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_stop_grace_period_outlasts_the_drain(resolved):
    for name in DUPLEXLINE_SERVICES:
        service = resolved["services"][name]
        drain = float(env_of(service)["DUPLEXLINE_DRAIN_TIMEOUT"])
        grace = service["stop_grace_period"]
        seconds = int(grace[:-1]) * {"s": 1, "m": 60}[grace[-1]]
        assert seconds >= drain + 10, f"{name}: stop_grace_period {grace} vs drain timeout {drain} s"


def test_prometheus_scrapes_the_services_compose_runs(resolved):
    services = resolved["services"]
    config = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    targets = {job["job_name"]: {t for sc in job["static_configs"] for t in sc["targets"]}
               for job in config["scrape_configs"]}
    for job, service in (("duplexline-worker", "worker"), ("duplexline-worker", "worker-cpu"),
                         ("duplexline-bridge", "bridge")):
        http = port(env_of(services[service])["DUPLEXLINE_HTTP_LISTEN"])
        assert targets[job] == {f"127.0.0.1:{http}"}, (job, service)
    prom = services["prometheus"]
    assert f"{REPO}/deploy/prometheus:/etc/prometheus:ro" in prom["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    listen = next(a for a in prom["command"] if a.startswith("--web.listen-address="))
    datasources = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    [ds] = datasources["datasources"]
    assert ds["url"] == "http://" + listen.partition("=")[2]


def test_grafana_gets_the_provisioned_dashboard(resolved):
    grafana = resolved["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"] if v.startswith("/")}
    assert mounts["/etc/grafana/provisioning"] == f"{REPO}/deploy/grafana/provisioning"
    provider = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/duplexline.yml").read_text())
    [prov] = provider["providers"]
    assert mounts[prov["options"]["path"]] == f"{REPO}/deploy/grafana/dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    folder, _, file = home.rpartition("/")
    assert Path(mounts[folder], file).is_file(), home


def _run_healthcheck(code: str, http_port: int) -> int:
    env = {**os.environ, "DUPLEXLINE_HTTP_LISTEN": f"0.0.0.0:{http_port}"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=30).returncode


def test_the_healthchecks_the_containers_run_work(resolved, tmp_path):
    """The compose healthcheck (/readyz) and the Dockerfile's HEALTHCHECK (/healthz), run as
    the container would run them, against a real serve: healthy while it serves, unhealthy
    once it stopped."""
    test = resolved["services"]["bridge"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    compose_code = test[3]
    dockerfile = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK .*? CMD (.*)$", dockerfile, re.M)
    assert match, "Dockerfile has no HEALTHCHECK ... CMD"
    argv = shlex.split(match.group(1))
    assert argv[:2] == ["python", "-c"]
    docker_code = argv[2]
    with ServeProcess("--agent", "echo", log_path=tmp_path / "serve.log") as server:
        assert _run_healthcheck(compose_code, server.http_port) == 0, server.log()
        assert _run_healthcheck(docker_code, server.http_port) == 0, server.log()
        assert http_json("POST", server.url + "/admin/drain")[0] == 202
        assert server.proc.wait(timeout=30) == 0
    assert _run_healthcheck(compose_code, server.http_port) != 0
    assert _run_healthcheck(docker_code, server.http_port) != 0


def _build_context() -> set[str]:
    """The files `docker build .` sends, by docker-py's own .dockerignore rules (the Python
    docker-compose runs on has it)."""
    binary = require_binary("docker-compose", "docker-compose")
    python = Path(binary).read_text(errors="replace").splitlines()[0].removeprefix("#!").split()[0]
    code = ("import json, sys; from docker.utils.build import exclude_paths; "
            "pats = [l for l in open('.dockerignore').read().splitlines() if l.strip() and not l.startswith('#')]; "
            "print(json.dumps(sorted(exclude_paths('.', pats))))")
    proc = subprocess.run([python, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"docker-py (python3-docker, with docker-compose) failed: {proc.stderr}"
    return set(json.loads(proc.stdout))


def test_the_build_context_holds_the_package_and_nothing_else():
    context = _build_context()
    dockerfile = (REPO / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (.+)$", dockerfile, re.M):
        *sources, _dest = line.split()
        for source in sources:
            assert source.rstrip("/") in context, f"COPY {source}: not in the build context"
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "bridge", "agent", "model"],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for path in tracked:
        if "__pycache__" not in path:
            assert path in context, f"{path} would be missing from the image"
    assert {"pyproject.toml", "README.md", "bridge/static/index.html"} <= context
    for outside in (".venv", ".git", "tests", "deploy", "bench", "docs", "scripts"):
        assert not any(p == outside or p.startswith(outside + "/") for p in context), outside
    assert not any("__pycache__" in p or p.endswith(".pyc") for p in context)


def test_the_dockerfile_builds_both_variants_from_one_argument():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    case = re.search(r'case "\$VARIANT" in(.*?)esac', text, re.S)
    assert case, "the torch install picks its wheel index by VARIANT"
    arms = case.group(1)
    assert re.search(r"^\s*cpu\)", arms, re.M) and re.search(r"^\s*cuda\)", arms, re.M) and "exit 1" in arms
    assert 'ENTRYPOINT ["duplexline"]' in text and 'CMD ["serve"]' in text
    assert re.search(r"^USER duplexline$", text, re.M), "runs unprivileged"
    assert "duplexline serve --help" in text, "the build proves the installed command starts"


def test_the_readme_documents_every_variable_the_compose_file_reads():
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", (REPO / "docker-compose.yml").read_text()))
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Deployment"):]
    table = {m for m in re.findall(r"^\| `([A-Z_][A-Z0-9_]*)` \|", section, re.M)}
    assert used, "the compose file reads no variables: the pattern is wrong"
    assert used - table == set(), f"README's deployment table lacks {sorted(used - table)}"
