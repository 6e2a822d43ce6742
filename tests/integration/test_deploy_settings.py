"""No invented settings: every `duplexline` flag and DUPLEXLINE_* variable that the
Dockerfile, docker-compose.yml, deploy/k8s/ and docs/deploy.md use exists in
`duplexline serve --help`, and every process they start would accept its settings (the
project's own settings builder parses each one's command and environment). `duplexline`
refuses unknown DUPLEXLINE_* variables at start, so a typo here is a container that never
starts, found in production; this finds it first.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from bridge.cli import build_parser
from bridge.settings import settings_from
from tests.integration.serve_process import REPO
from tests.integration.test_deploy_compose import DUPLEXLINE_SERVICES, compose, env_of

K8S = REPO / "deploy/k8s"
# What Kubernetes fills in at run time, for the settings check (documentation addresses).
K8S_FIELDS = {"status.hostIP": "192.0.2.20", "status.podIP": "192.0.2.20"}
K8S_SECRETS = {"redis-url": "redis://redis.duplexline.svc:6379/0", "admin-token": "test-admin-token"}


@pytest.fixture(scope="module")
def serve_help() -> tuple[set[str], set[str]]:
    proc = subprocess.run([sys.executable, "-m", "bridge.cli", "serve", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", proc.stdout))
    envs = set(re.findall(r"DUPLEXLINE_[A-Z0-9_]+", proc.stdout))
    assert {"--sip-listen", "--agent", "--device"} <= flags and "DUPLEXLINE_REDIS" in envs
    return flags, envs


def k8s_containers() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Deployment":
                for c in doc["spec"]["template"]["spec"]["containers"]:
                    out.append((f"{path.name} {doc['metadata']['name']}/{c['name']}", c))
    return out


def k8s_env(container: dict) -> dict[str, str]:
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = K8S_FIELDS[e["valueFrom"]["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in e.get("valueFrom", {}):
            env[e["name"]] = K8S_SECRETS[e["valueFrom"]["secretKeyRef"]["key"]]
        else:
            raise AssertionError(f"env {e['name']}: no value this test knows how to fill in")
    return env


def dockerfile_env() -> dict[str, str]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    env = {}
    for line in re.findall(r"^ENV (.+)$", text, re.M):
        env.update(dict(re.findall(r"(DUPLEXLINE_[A-Z0-9_]+)=(\S+)", line)))
    return env


def _check_names(where: str, argv: list[str], env_names, flags: set[str], envs: set[str]) -> list[str]:
    problems = [f"{where}: flag {a.split('=')[0]} is not in `duplexline serve --help`"
                for a in argv if a.startswith("--") and a.split("=")[0] not in flags]
    problems += [f"{where}: variable {n} is not in `duplexline serve --help`"
                 for n in env_names if n.startswith("DUPLEXLINE_") and n not in envs]
    return problems


def _accepts(where: str, argv: list[str], env: dict[str, str]) -> None:
    """The settings builder takes this command and environment as they are."""
    assert argv[:1] == ["serve"], f"{where}: runs {argv}, not `duplexline serve`"
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        raise AssertionError(f"{where}: `duplexline {' '.join(argv)}` is not a valid command line") from None
    settings = settings_from(args, env)
    if settings.sip_listen.host in ("0.0.0.0", "::"):
        assert settings.sip.public_address, f"{where}: a wildcard SIP address needs DUPLEXLINE_SIP_PUBLIC_ADDRESS"


def test_compose_uses_only_real_settings(serve_help):
    flags, envs = serve_help
    proc = compose("config")
    assert proc.returncode == 0, proc.stderr
    services = yaml.safe_load(proc.stdout)["services"]
    problems = []
    for name in DUPLEXLINE_SERVICES:
        env = env_of(services[name])
        problems += _check_names(f"docker-compose.yml {name}", services[name]["command"], env, flags, envs)
        if not problems:  # pass-through variables unset in the shell are unset in the container
            _accepts(f"docker-compose.yml {name}", services[name]["command"],
                     {k: v for k, v in env.items() if v is not None})
    # Variables compose itself reads must not look like duplexline's: the process would
    # refuse them if someone exported them (e.g. DUPLEXLINE_IMAGE).
    raw = (REPO / "docker-compose.yml").read_text()
    for var in re.findall(r"\$\{(DUPLEXLINE_[A-Z0-9_]+)", raw):
        if var not in envs:
            problems.append(f"docker-compose.yml interpolates ${{{var}}}, which `duplexline` would refuse")
    assert not problems, "\n".join(problems)


def test_kubernetes_uses_only_real_settings(serve_help):
    flags, envs = serve_help
    containers = k8s_containers()
    assert {w.split()[1] for w, _ in containers} == {"duplexline-worker/duplexline", "duplexline-bridge/duplexline"}
    problems = []
    for where, c in containers:
        env = k8s_env(c)
        problems += _check_names(where, c["args"], env, flags, envs)
        if not problems:
            _accepts(where, c["args"], env)
    assert not problems, "\n".join(problems)


def test_the_image_defaults_are_real_settings(serve_help):
    flags, envs = serve_help
    env = dockerfile_env()
    assert set(env) == {"DUPLEXLINE_SIP_LISTEN", "DUPLEXLINE_HTTP_LISTEN"}
    problems = _check_names("Dockerfile", [], env, flags, envs)
    assert not problems, problems
    settings = settings_from(build_parser().parse_args(["serve"]), {**env, "DUPLEXLINE_SIP_PUBLIC_ADDRESS": "192.0.2.1"})
    assert settings.http_listen.host == "0.0.0.0"


def test_the_deployment_docs_name_only_real_settings(serve_help):
    flags, envs = serve_help
    problems = []
    for path in [REPO / "docs/deploy.md", *sorted((REPO / "deploy").rglob("*.md"))]:
        text = path.read_text()
        problems += [f"{path.relative_to(REPO)}: {v} is not a duplexline variable"
                     for v in sorted(set(re.findall(r"DUPLEXLINE_[A-Z0-9_]+", text))) if v not in envs]
        for line in text.splitlines():
            if "duplexline serve" in line:
                problems += [f"{path.relative_to(REPO)}: flag {f} is not in `duplexline serve --help`"
                             for f in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", line.split("duplexline serve", 1)[1])
                             if f not in flags]
    assert not problems, "\n".join(problems)
