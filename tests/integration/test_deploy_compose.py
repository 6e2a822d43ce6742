"""docker-compose.yml, the Dockerfile and .dockerignore, checked the way Docker reads them.

No Docker engine runs here, so nothing is built or started: `docker-compose config`
(Debian's docker-compose) validates and resolves the compose file, and the tests read the
resolved services; .dockerignore is evaluated with docker-py's own implementation (it comes
with docker-compose). The healthcheck commands the containers run are run for real against
a real `duplexline serve` (the bridges) and a real `duplexline worker` (the workers).

The layout under test: `bridge` takes every call (`serve --agent omniflatten --engine
redis`, no GPU), `worker`/`worker-cpu` keep only the engine (`worker`, the GPU on the first),
`line-test` is an opt-in echo bridge.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from bridge.cli import build_parser
from bridge.settings import Settings, settings_from
from tests.integration.prometheus_process import require_binary
from tests.integration.serve_process import REPO, ServeProcess, free_port, http_json

pytestmark = pytest.mark.timeout(120)

REQUIRED_ENV = {"DUPLEXLINE_ADMIN_TOKEN": "test-admin-token", "DUPLEXLINE_SIP_PUBLIC_ADDRESS": "192.0.2.10"}
WORKERS = ("worker", "worker-cpu")  # one or the other (profiles gpu, cpu)
BRIDGES = ("bridge", "line-test")
DUPLEXLINE_SERVICES = WORKERS + BRIDGES
INTERNAL_PORTS = {9090, 3000}  # prometheus, grafana (redis: its --port)


class WorkerProcess(ServeProcess):
    """`duplexline worker ARGS` listening on a free port of 127.0.0.1 (the caller's
    DUPLEXLINE_* variables left out, as ServeProcess does); `http_port` is its one port."""

    def __init__(self, *args: str, env: dict | None = None, log_path: Path | None = None) -> None:
        super().__init__(env=env, log_path=log_path)
        self.args = ["worker", "--listen", f"127.0.0.1:{self.http_port}", *args]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.http_port}"


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


def settings_of(service: dict, extra_env: dict[str, str] | None = None) -> Settings:
    """What the container's process would run with: its command through the real parser,
    its environment (pass-through variables unset in the shell are unset) through the real
    settings builder."""
    env = {k: v for k, v in env_of(service).items() if v is not None}
    return settings_from(build_parser().parse_args(service["command"]), {**env, **(extra_env or {})})


def host_ports(service: dict) -> set[tuple[int, str]]:
    """(port, protocol) the service's process listens on, on the host's network."""
    command, env = service["command"][0], env_of(service)
    if command == "worker":
        return {(port(env["DUPLEXLINE_WORKER_LISTEN"]), "tcp")}
    sip = port(env["DUPLEXLINE_SIP_LISTEN"])
    return ({(sip, "udp"), (sip, "tcp"), (port(env["DUPLEXLINE_HTTP_LISTEN"]), "tcp")}
            | {(p, "udp") for p in rtp_range(service)})


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
    assert set(services) == {"redis", "worker", "worker-cpu", "bridge", "line-test", "kamailio", "prometheus", "grafana"}
    for name, service in services.items():
        assert service.get("network_mode") == "host", f"{name}: host networking (see the compose file's comment)"
    worker, cpu, bridge, line = (services[n] for n in ("worker", "worker-cpu", "bridge", "line-test"))
    # The GPU worker reserves an NVIDIA GPU; the CPU fallback is the same worker without one;
    # the bridge runs whatever the profile (no profile), the line test only when asked for.
    assert worker["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"] and "profiles" not in bridge
    assert line["profiles"] == ["linetest"]
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] == 1
    for name in ("worker-cpu",) + BRIDGES:
        assert "deploy" not in services[name], f"{name} must not reserve a GPU"
    # The workers run `duplexline worker` (the engine only), on their device.
    assert worker["command"] == ["worker", "--device", "cuda"] and cpu["command"] == ["worker", "--device", "cpu"]
    for name in WORKERS:
        s = settings_of(services[name])
        assert s.device == services[name]["command"][-1]
        assert s.redis and s.worker.worker_id, name
    # The bridge takes every call with the model on the workers of the registry.
    assert bridge["command"][0] == "serve"
    s = settings_of(bridge)
    assert (s.agent, s.engine) == ("omniflatten", "redis") and s.redis
    assert s.worker_urls == []
    # The line test is an echo bridge: no engine, no worker needed.
    s = settings_of(line)
    assert line["command"][0] == "serve" and (s.agent, s.engine) == ("echo", "local")
    # Images built from this Dockerfile, the variant matching the tag.
    for name in DUPLEXLINE_SERVICES:
        service = services[name]
        assert service["build"]["context"] == str(REPO)
        assert service["image"] == f"duplexline:{service['build']['args']['VARIANT']}"
    assert worker["image"] == "duplexline:cuda"
    assert cpu["image"] == bridge["image"] == line["image"] == "duplexline:cpu"


def test_the_worker_port_stays_on_this_host(resolved):
    """The worker's WebSocket has no authentication: it listens on loopback, which the
    bridges on this host (host networking) reach, and publishes that address."""
    for name in WORKERS:
        w = settings_of(resolved["services"][name]).worker
        assert w.listen.host == "127.0.0.1", f"{name} listens on {w.listen}: the port has no authentication"
        assert w.address == str(w.listen), name


def test_the_bridges_keep_the_safeguards(resolved):
    """Public HTTP port: admin routes need the token; SIP binds the advertised address."""
    for name in BRIDGES:
        s = settings_of(resolved["services"][name])
        assert s.admin_token == REQUIRED_ENV["DUPLEXLINE_ADMIN_TOKEN"], name
        assert s.sip.public_address == REQUIRED_ENV["DUPLEXLINE_SIP_PUBLIC_ADDRESS"], name


def test_processes_that_run_together_use_different_ports(resolved):
    services = resolved["services"]
    redis = services["redis"]["command"]
    internal = {(p, "tcp") for p in INTERNAL_PORTS | {int(redis[redis.index("--port") + 1])}}
    for worker_name in WORKERS:  # with either worker: both bridges (line test on) and Prometheus etc.
        together = (worker_name,) + BRIDGES
        taken: dict[tuple[int, str], str] = {}
        for name in together:
            for p in host_ports(services[name]):
                assert p not in taken, f"{name} and {taken[p]} both want {p}"
                assert p not in internal, f"{name} wants {p}, which an internal service has"
                taken[p] = name
    # The two workers share port and id: the profiles run one or the other, never both.
    assert host_ports(services["worker"]) == host_ports(services["worker-cpu"])


def kamailio_defines(argv: list[str]) -> dict[str, str]:
    """The `-A NAME=VALUE` defines of a kamailio command line (quotes of string values kept)."""
    assert argv[0::2] == ["-A"] * (len(argv) // 2) and len(argv) % 2 == 0, argv
    return dict(a.partition("=")[::2] for a in argv[1::2])


def kamailio_check(defines: dict[str, str]) -> subprocess.CompletedProcess | None:
    """`kamailio -c` (syntax and modules, no sockets opened) on the shipped config with these
    defines; None when Debian's kamailio is not installed (test_kamailio_edge.py says so)."""
    binary = shutil.which("kamailio") or ("/usr/sbin/kamailio" if Path("/usr/sbin/kamailio").exists() else None)
    if binary is None:
        return None
    args = [a for k, v in defines.items() for a in ("-A", f"{k}={v}")]
    return subprocess.run([binary, "-c", "-f", str(REPO / "deploy/kamailio/kamailio.cfg"), *args],
                          capture_output=True, text=True, timeout=30)


def test_the_sip_edge_fronts_this_hosts_bridge_and_collides_with_nothing(resolved):
    """The opt-in Kamailio edge (profile edge): on the host's network at the advertised
    address, on a port no other service takes, its configuration and dispatcher list mounted
    from deploy/kamailio/, whose list sends calls to this host's bridge; the health check's
    kamcmd finds the control socket the configuration opens."""
    services = resolved["services"]
    edge = services["kamailio"]
    assert edge["profiles"] == ["edge"] and edge["network_mode"] == "host"
    assert edge["build"]["context"] == str(REPO / "deploy/kamailio")
    defines = kamailio_defines(edge["command"])
    assert defines["LISTEN_ADDR"] == REQUIRED_ENV["DUPLEXLINE_SIP_PUBLIC_ADDRESS"]
    sip = int(defines["SIP_PORT"])
    redis = services["redis"]["command"]
    taken = set().union(*(host_ports(services[n]) for n in DUPLEXLINE_SERVICES))
    taken |= {(p, "tcp") for p in INTERNAL_PORTS | {int(redis[redis.index("--port") + 1])}}
    assert not {(sip, "udp"), (sip, "tcp")} & taken, f"the edge's port {sip} is taken"
    assert f"{REPO}/deploy/kamailio:/etc/kamailio:ro" in edge["volumes"]
    cfg = (REPO / "deploy/kamailio/kamailio.cfg").read_text()
    assert '#!define DISPATCHER_LIST "/etc/kamailio/dispatcher.list"' in cfg
    destinations = [line.split() for line in (REPO / "deploy/kamailio/dispatcher.list").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    bridge_sip = port(env_of(services["bridge"])["DUPLEXLINE_SIP_LISTEN"])
    assert [d[:2] for d in destinations] == [["1", f"sip:127.0.0.1:{bridge_sip}"]]
    assert edge["healthcheck"]["test"] == ["CMD", "kamcmd", "core.uptime"]
    assert '#!define CTL_SOCKET "unix:/run/kamailio/kamailio_ctl"' in cfg, "kamcmd's default socket"
    dockerfile = (REPO / "deploy/kamailio/Dockerfile").read_text()
    assert 'ENTRYPOINT ["kamailio", "-DD", "-E", "-f", "/etc/kamailio/kamailio.cfg"]' in dockerfile
    checked = kamailio_check(defines)
    assert checked is None or checked.returncode == 0, checked.stderr[-3000:]


def test_redis_is_where_the_bridges_look_for_it(resolved):
    services = resolved["services"]
    command = services["redis"]["command"]
    redis_port = int(command[command.index("--port") + 1])
    assert command[command.index("--bind") + 1] == "127.0.0.1"
    for name in DUPLEXLINE_SERVICES:
        assert env_of(services[name])["DUPLEXLINE_REDIS"] == f"redis://127.0.0.1:{redis_port}/0", name
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_bridge_and_worker_agree_on_the_model(tmp_path):
    """A bridge places calls only on workers serving its model id: with the model (or its
    id) set in the shell, the bridge and each worker resolve the same id, and the bridge
    sees the model folder where the worker does."""
    model = tmp_path / "omni-test"
    model.mkdir()
    for extra, wanted in (({}, "tiny-random"), ({"DUPLEXLINE_MODEL": str(model)}, "omni-test"),
                          ({"DUPLEXLINE_MODEL": str(model), "DUPLEXLINE_MODEL_ID": "omni-v2"}, "omni-v2")):
        proc = compose("config", env={**REQUIRED_ENV, **extra})
        assert proc.returncode == 0, proc.stderr
        services = yaml.safe_load(proc.stdout)["services"]
        ids = {name: settings_of(services[name]).resolved_model_id for name in ("bridge",) + WORKERS}
        assert set(ids.values()) == {wanted}, (extra, ids)
    proc = compose("config")
    services = yaml.safe_load(proc.stdout)["services"]
    mounts = {name: {v.split(":")[1]: v for v in services[name]["volumes"]} for name in ("bridge",) + WORKERS}
    assert mounts["bridge"]["/models"] == mounts["worker"]["/models"] == mounts["worker-cpu"]["/models"]
    assert all(m["/models"].endswith(":ro") for m in mounts.values())


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
    # The worker's /metrics is on its one port; the bridge's on its HTTP port.
    for name in WORKERS:
        listen = env_of(services[name])["DUPLEXLINE_WORKER_LISTEN"]
        assert targets["duplexline-worker"] == {f"127.0.0.1:{port(listen)}"}, name
    http = port(env_of(services["bridge"])["DUPLEXLINE_HTTP_LISTEN"])
    assert targets["duplexline-bridge"] == {f"127.0.0.1:{http}"}
    # The opt-in line test is not scraped: switched off, it would page someone.
    line_http = port(env_of(services["line-test"])["DUPLEXLINE_HTTP_LISTEN"])
    assert not any(t.endswith(f":{line_http}") for ts in targets.values() for t in ts)
    prom = services["prometheus"]
    assert f"{REPO}/deploy/prometheus:/etc/prometheus:ro" in prom["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    listen = next(a for a in prom["command"] if a.startswith("--web.listen-address="))
    datasources = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    [ds] = datasources["datasources"]
    assert ds["url"] == "http://" + listen.partition("=")[2]


def _documented_worker_snippet(text: str) -> str:
    """The "Adding a worker" service from the compose file's comment, as YAML."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.fullmatch(r"#\s+worker-2:", line))
    block = []
    for line in lines[start:]:
        if not line.startswith("#     "):
            break
        block.append(line[1:])
    return textwrap.dedent("\n".join(block))


def test_the_documented_way_to_add_a_worker_works(tmp_path):
    """The compose file's "Adding a worker" snippet, pasted under `services:` of a copy: it
    resolves, runs a second worker on its own port, id and GPU with the first one's Redis and
    model, and collides with nothing."""
    text = (REPO / "docker-compose.yml").read_text()
    snippet = _documented_worker_snippet(text)
    name = snippet.partition(":")[0]
    copy = tmp_path / "docker-compose.yml"
    copy.write_text(text.replace("\nservices:\n", "\nservices:\n" + textwrap.indent(snippet, "  ") + "\n", 1))
    binary = require_binary("docker-compose", "docker-compose")
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    proc = subprocess.run([binary, "--project-directory", str(REPO), "-f", str(copy), "config"], cwd=REPO,
                          env={**base, **REQUIRED_ENV}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    services = yaml.safe_load(proc.stdout)["services"]
    first, second = services["worker"], services[name]
    a, b = settings_of(first), settings_of(second)
    assert second["command"][0] == "worker" and second.get("profiles") == first["profiles"]
    assert b.worker.worker_id != a.worker.worker_id and b.worker.listen.host == "127.0.0.1"
    assert (b.redis, b.resolved_model_id, b.drain_timeout) == (a.redis, a.resolved_model_id, a.drain_timeout)
    [gpu_a] = first["deploy"]["resources"]["reservations"]["devices"]
    [gpu_b] = second["deploy"]["resources"]["reservations"]["devices"]
    assert gpu_b["driver"] == "nvidia" and gpu_b.get("device_ids") and gpu_b.get("device_ids") != gpu_a.get("device_ids")
    taken = set().union(*(host_ports(services[n]) for n in ("worker",) + BRIDGES))
    assert not host_ports(second) & taken, "the second worker's port is taken"
    assert second["healthcheck"] == first["healthcheck"] and second["stop_grace_period"] == first["stop_grace_period"]
    # docs/deploy.md shows the same snippet.
    docs = re.findall(r"```yaml\n(.*?)```", (REPO / "docs/deploy.md").read_text(), re.S)

    def code(text: str) -> list[str]:
        return [line.split("#")[0].rstrip() for line in textwrap.dedent(text).splitlines() if line.strip()]

    assert any(code(block) == code(snippet) for block in docs), "docs/deploy.md's worker snippet differs"


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


def _run_healthcheck(code: str, env: dict[str, str]) -> int:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                          timeout=30).returncode


def _compose_healthcheck(service: dict) -> str:
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    return test[3]


def test_every_duplexline_service_has_its_own_healthcheck(resolved):
    """Every service sets its own health check, on the port its process listens on (the
    image's finds whichever of the two is open)."""
    for name in DUPLEXLINE_SERVICES:
        service = resolved["services"][name]
        code = _compose_healthcheck(service)
        var = "DUPLEXLINE_WORKER_LISTEN" if name in WORKERS else "DUPLEXLINE_HTTP_LISTEN"
        assert var in code and "/readyz" in code, name
        assert service["stop_grace_period"] and service["healthcheck"]["start_period"], name


def test_the_healthchecks_the_containers_run_work(resolved, tmp_path):
    """The compose healthchecks (/readyz) and the Dockerfile's HEALTHCHECK (/healthz), run as
    the containers would run them, against a real serve and a real worker: healthy while
    they serve, unhealthy once they stopped."""
    compose_code = _compose_healthcheck(resolved["services"]["bridge"])
    dockerfile = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK .*? CMD (.*)$", dockerfile, re.M)
    assert match, "Dockerfile has no HEALTHCHECK ... CMD"
    argv = shlex.split(match.group(1))
    assert argv[0] == "python"
    docker_check = [sys.executable, *argv[1:]]  # one image, both roles: it finds either port

    def run_docker_check(env: dict[str, str]) -> int:
        return subprocess.run(docker_check, env={**os.environ, **env}, cwd=REPO, capture_output=True,
                              timeout=30).returncode

    with ServeProcess("--agent", "echo", log_path=tmp_path / "serve.log") as server:
        env = {"DUPLEXLINE_HTTP_LISTEN": f"0.0.0.0:{server.http_port}", "DUPLEXLINE_WORKER_LISTEN": "127.0.0.1:1"}
        assert _run_healthcheck(compose_code, env) == 0, server.log()
        assert run_docker_check(env) == 0, server.log()
        assert http_json("POST", server.url + "/admin/drain")[0] == 202
        assert server.proc.wait(timeout=30) == 0
    assert _run_healthcheck(compose_code, env) != 0
    assert run_docker_check(env) != 0

    worker_code = _compose_healthcheck(resolved["services"]["worker"])
    assert worker_code == _compose_healthcheck(resolved["services"]["worker-cpu"])
    with WorkerProcess("--slots", "2", "--device", "cpu", log_path=tmp_path / "worker.log") as worker:
        env = {"DUPLEXLINE_WORKER_LISTEN": worker.address, "DUPLEXLINE_HTTP_LISTEN": "127.0.0.1:1"}
        assert _run_healthcheck(worker_code, env) == 0, worker.log()
        assert run_docker_check(env) == 0, worker.log()
        assert worker.terminate() == 0, worker.log()  # SIGTERM drains it (no sessions: at once)
    assert _run_healthcheck(worker_code, env) != 0
    assert run_docker_check(env) != 0


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
