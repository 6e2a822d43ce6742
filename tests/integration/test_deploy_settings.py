"""No invented settings: every `duplexline` flag and DUPLEXLINE_* variable that the
Dockerfile, docker-compose.yml, deploy/k8s/, docs/deploy.md and the README's deployment
section use exists in the help of the command that reads it (`duplexline serve --help` for
bridges, `duplexline worker --help` for workers), and every process they start would accept
its settings (the project's own settings builder parses each one's command and
environment). `duplexline` refuses unknown DUPLEXLINE_* variables at start, so a typo here
is a container that never starts, found in production; this finds it first. A variable the
other command reads is not refused, only ignored: a bridge setting given to a worker (or the
reverse) is caught here too.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from bridge.cli import build_parser
from bridge.errors import ConfigError
from bridge.settings import settings_from
from tests.integration.serve_process import REPO
from tests.integration.test_deploy_compose import DUPLEXLINE_SERVICES, compose, env_of

K8S = REPO / "deploy/k8s"
# What Kubernetes fills in at run time, for the settings check (documentation addresses).
K8S_FIELDS = {"status.hostIP": "192.0.2.20", "status.podIP": "198.51.100.7",
              "metadata.name": "duplexline-worker-7c9f6d8b4-x2x9q"}
K8S_SECRETS = {"redis-url": "redis://redis.duplexline.svc:6379/0", "admin-token": "test-admin-token"}
COMMANDS = ("serve", "worker")


def command_help(command: str) -> tuple[set[str], set[str]]:
    """The flags and DUPLEXLINE_* variables `duplexline COMMAND --help` names."""
    proc = subprocess.run([sys.executable, "-m", "bridge.cli", command, "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", proc.stdout))
    envs = set(re.findall(r"DUPLEXLINE_[A-Z0-9_]+", proc.stdout))
    return flags, envs


@pytest.fixture(scope="module")
def helps() -> dict[str, tuple[set[str], set[str]]]:
    out = {command: command_help(command) for command in COMMANDS}
    flags, envs = out["serve"]
    assert {"--sip-listen", "--agent", "--device", "--engine"} <= flags and "DUPLEXLINE_REDIS" in envs
    flags, envs = out["worker"]
    assert {"--listen", "--advertise", "--worker-id", "--redis"} <= flags
    assert {"DUPLEXLINE_WORKER_ADVERTISE", "DUPLEXLINE_REDIS"} <= envs and "DUPLEXLINE_SIP_LISTEN" not in envs
    return out


def k8s_containers() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Deployment":
                for c in doc["spec"]["template"]["spec"]["containers"]:
                    if not c["image"].startswith("duplexline:"):
                        continue  # not a duplexline process (the Kamailio edge)
                    out.append((f"{path.name} {doc['metadata']['name']}/{c['name']}", c))
    return out


def k8s_env(container: dict) -> dict[str, str]:
    """The container's environment as the kubelet makes it: downward API fields and Secrets
    filled in, and `$(NAME)` replaced by a variable defined earlier in the list (Kubernetes'
    own rule: a later or unknown one stays as written, which the settings would refuse)."""
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                                    lambda m: env.get(m.group(1), m.group(0)), e["value"])
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


def _check_names(where: str, argv: list[str], env_names, helps) -> list[str]:
    """Flags and variables of a process, against the help of the command it runs."""
    command = argv[0] if argv and argv[0] in COMMANDS else "serve"
    flags, envs = helps[command]
    problems = [f"{where}: flag {a.split('=')[0]} is not in `duplexline {command} --help`"
                for a in argv if a.startswith("--") and a.split("=")[0] not in flags]
    for n in env_names:
        if not n.startswith("DUPLEXLINE_") or n in envs:
            continue
        others = [c for c in COMMANDS if c != command and n in helps[c][1]]
        problems.append(f"{where}: variable {n} is not read by `duplexline {command}`"
                        + (f" (only by `duplexline {others[0]}`: set it there)" if others else ""))
    return problems


def _accepts(where: str, argv: list[str], env: dict[str, str]) -> None:
    """The settings builder takes this command and environment as they are."""
    assert argv[:1] in (["serve"], ["worker"]), f"{where}: runs {argv}, not `duplexline serve` or `duplexline worker`"
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        raise AssertionError(f"{where}: `duplexline {' '.join(argv)}` is not a valid command line") from None
    settings = settings_from(args, env)
    if argv[0] == "serve" and settings.sip_listen.host in ("0.0.0.0", "::"):
        assert settings.sip.public_address, f"{where}: a wildcard SIP address needs DUPLEXLINE_SIP_PUBLIC_ADDRESS"


def test_compose_uses_only_real_settings(helps):
    proc = compose("config")
    assert proc.returncode == 0, proc.stderr
    services = yaml.safe_load(proc.stdout)["services"]
    problems = []
    for name in DUPLEXLINE_SERVICES:
        env = env_of(services[name])
        problems += _check_names(f"docker-compose.yml {name}", services[name]["command"], env, helps)
        if not problems:  # pass-through variables unset in the shell are unset in the container
            _accepts(f"docker-compose.yml {name}", services[name]["command"],
                     {k: v for k, v in env.items() if v is not None})
    # Variables compose itself reads must not look like duplexline's: the process would
    # refuse them if someone exported them (e.g. DUPLEXLINE_IMAGE).
    known = set().union(*(envs for _, envs in helps.values()))
    raw = (REPO / "docker-compose.yml").read_text()
    for var in re.findall(r"\$\{(DUPLEXLINE_[A-Z0-9_]+)", raw):
        if var not in known:
            problems.append(f"docker-compose.yml interpolates ${{{var}}}, which `duplexline` would refuse")
    assert not problems, "\n".join(problems)


def test_kubernetes_uses_only_real_settings(helps):
    containers = k8s_containers()
    assert {w.split()[1] for w, _ in containers} == {"duplexline-worker/duplexline", "duplexline-bridge/duplexline"}
    problems = []
    for where, c in containers:
        env = k8s_env(c)
        problems += _check_names(where, c["args"], env, helps)
        if not problems:
            _accepts(where, c["args"], env)
    assert not problems, "\n".join(problems)


def test_the_settings_check_catches_a_setting_given_to_the_wrong_command(helps):
    """The check above, shown to bite: a bridge variable on a worker, a worker variable on a
    bridge, an advertised address Kubernetes never filled in."""
    assert _check_names("w", ["worker"], {"DUPLEXLINE_SIP_LISTEN": "0.0.0.0:5060"}, helps)
    assert _check_names("b", ["serve"], {"DUPLEXLINE_WORKER_LISTEN": "0.0.0.0:7070"}, helps)
    assert _check_names("w", ["worker", "--engine", "redis"], {}, helps)
    with pytest.raises(ConfigError, match="WORKER_ADVERTISE"):
        _accepts("w", ["worker"], {"DUPLEXLINE_WORKER_LISTEN": "0.0.0.0:7070",
                                   "DUPLEXLINE_WORKER_ADVERTISE": "$(POD_IP):7070"})
    with pytest.raises(ConfigError, match="advertise"):  # a wildcard listen, nothing to publish
        _accepts("w", ["worker"], {"DUPLEXLINE_WORKER_LISTEN": "0.0.0.0:7070"})


def test_the_image_defaults_are_real_settings(helps):
    env = dockerfile_env()
    assert set(env) == {"DUPLEXLINE_SIP_LISTEN", "DUPLEXLINE_HTTP_LISTEN"}
    problems = _check_names("Dockerfile", [], env, helps)
    assert not problems, problems
    settings = settings_from(build_parser().parse_args(["serve"]), {**env, "DUPLEXLINE_SIP_PUBLIC_ADDRESS": "192.0.2.1"})
    assert settings.http_listen.host == "0.0.0.0"
    # The same image runs workers: its serve defaults are known variables, so a worker
    # starts with them (and ignores them).
    settings_from(build_parser().parse_args(["worker"]), env)


def _readme_deployment() -> str:
    readme = (REPO / "README.md").read_text()
    start = readme.index("## Deployment")
    end = readme.find("\n## ", start + 1)
    return readme[start:end if end != -1 else None]


def test_the_deployment_docs_name_only_real_settings(helps):
    known = set().union(*(envs for _, envs in helps.values()))
    problems = []
    texts = [(str(p.relative_to(REPO)), p.read_text()) for p in [REPO / "docs/deploy.md", *sorted((REPO / "deploy").rglob("*.md"))]]
    texts.append(("README.md ## Deployment", _readme_deployment()))
    for where, text in texts:
        problems += [f"{where}: {v} is not a duplexline variable"
                     for v in sorted(set(re.findall(r"DUPLEXLINE_[A-Z0-9_]+", text))) if v not in known]
        for line in text.splitlines():
            for command in COMMANDS:
                marker = f"duplexline {command}"
                if marker in line:
                    flags = helps[command][0]
                    after = line.split(marker, 1)[1].split("`", 1)[0]  # up to the end of the code span
                    problems += [f"{where}: flag {f} is not in `duplexline {command} --help`"
                                 for f in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", after) if f not in flags]
    assert not problems, "\n".join(problems)
