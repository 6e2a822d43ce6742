"""deploy/k8s/ is valid and consistent, without a cluster.

Two checks of validity: a structural check here (what `kubectl apply` and the scheduler
need: kinds, names, selectors that match their pods, probes on ports that exist, a GPU
request, a drain before SIGKILL, a PodDisruptionBudget per Deployment, Prometheus finding
the pods), and, when the `kubernetes-validate` package is installed, a strict check against
Kubernetes' own OpenAPI schemas (it ships them; nothing is downloaded). The preStop drain
command is run for real against a real `duplexline serve`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from tests.integration.serve_process import REPO, ServeProcess
from tests.integration.test_deploy_settings import k8s_env

pytestmark = pytest.mark.timeout(120)

K8S = REPO / "deploy/k8s"
KUBERNETES_VERSION = "1.30.0"  # the oldest release the manifests promise to apply on
KINDS = {"Namespace": "v1", "Deployment": "apps/v1", "Service": "v1", "PodDisruptionBudget": "policy/v1"}


def manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def of_kind(kind: str) -> list[dict]:
    return [d for _, d in manifests() if d["kind"] == kind]


def deployment(component: str) -> dict:
    [d] = [d for d in of_kind("Deployment") if d["metadata"]["name"] == f"duplexline-{component}"]
    return d


def container(component: str) -> dict:
    [c] = deployment(component)["spec"]["template"]["spec"]["containers"]
    return c


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def listen_port(c: dict, var: str) -> int:
    return int(next(e["value"] for e in c["env"] if e["name"] == var).rpartition(":")[2])


def test_every_manifest_has_the_fields_kubectl_needs():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files, "kustomization.yaml and the manifests disagree"
    seen = set()
    for name, doc in manifests():
        kind = doc.get("kind")
        assert kind in KINDS, f"{name}: unexpected kind {kind!r}"
        assert doc.get("apiVersion") == KINDS[kind], f"{name}: {kind} is {KINDS[kind]}, not {doc.get('apiVersion')}"
        meta = doc.get("metadata", {})
        assert meta.get("name"), f"{name}: {kind} without metadata.name"
        assert (kind, meta["name"]) not in seen, f"{name}: {kind}/{meta['name']} twice"
        seen.add((kind, meta["name"]))
        assert meta.get("labels", {}).get("app.kubernetes.io/name") == "duplexline", f"{name}: {kind} label"


@pytest.mark.parametrize("component", ["bridge", "worker"])
def test_deployment_selects_its_pods_and_probes_the_right_routes(component):
    d = deployment(component)
    spec, pod = d["spec"], d["spec"]["template"]["spec"]
    assert selects(spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"])
    c = container(component)
    assert c["image"].startswith("duplexline:")
    ports = {p["name"]: p for p in c["ports"]}
    assert ports["http"]["containerPort"] == listen_port(c, "DUPLEXLINE_HTTP_LISTEN")
    sip = listen_port(c, "DUPLEXLINE_SIP_LISTEN")
    assert {(ports[n]["containerPort"], ports[n]["protocol"]) for n in ("sip-udp", "sip-tcp")} == {(sip, "UDP"), (sip, "TCP")}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        get = c[probe]["httpGet"]
        assert get["path"] == path and get["port"] in ports, (component, probe, get)
    assert "/admin/drain" in " ".join(c["lifecycle"]["preStop"]["exec"]["command"])
    drain = float(k8s_env(c)["DUPLEXLINE_DRAIN_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] >= drain + 10, "SIGKILL would cut calls still draining"
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_the_worker_asks_for_a_gpu_and_the_bridge_does_not():
    worker, bridge = container("worker"), container("bridge")
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == 1 == worker["resources"]["limits"]["nvidia.com/gpu"]
    assert worker["args"][-2:] == ["--device", "cuda"]
    assert "nvidia.com/gpu" not in str(bridge["resources"])
    assert {"--agent", "echo"} <= set(bridge["args"])


def test_bridge_and_worker_can_share_a_node():
    """hostNetwork: the two must not want the same ports on one node."""
    worker, bridge = container("worker"), container("bridge")
    assert not ({(p["containerPort"], p["protocol"]) for p in worker["ports"]}
                & {(p["containerPort"], p["protocol"]) for p in bridge["ports"]})
    ranges = []
    for c in (worker, bridge):
        low, high = k8s_env(c)["DUPLEXLINE_RTP_PORTS"].split("-")
        ranges.append(set(range(int(low), int(high) + 1)))
    assert not ranges[0] & ranges[1]


def test_services_and_budgets_select_existing_pods():
    deployments = of_kind("Deployment")
    for svc in of_kind("Service"):
        [d] = [d for d in deployments if selects(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
        [c] = d["spec"]["template"]["spec"]["containers"]
        named = {p["name"]: p for p in c["ports"]}
        for p in svc["spec"]["ports"]:
            target = named.get(p["targetPort"])
            assert target, f"Service {svc['metadata']['name']}: targetPort {p['targetPort']} is no container port"
            assert target["protocol"] == p["protocol"], svc["metadata"]["name"]
    pdbs = of_kind("PodDisruptionBudget")
    for d in deployments:
        labels = d["spec"]["template"]["metadata"]["labels"]
        [pdb] = [p for p in pdbs if selects(p["spec"]["selector"]["matchLabels"], labels)]
        replicas = d["spec"]["replicas"]
        spec = pdb["spec"]
        allowed = spec["maxUnavailable"] if "maxUnavailable" in spec else replicas - spec["minAvailable"]
        assert 1 <= allowed < replicas, f"{pdb['metadata']['name']}: a node drain must be possible and gradual"


def test_prometheus_finds_the_pods_through_the_headless_services():
    namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    services = {s["metadata"]["name"]: s for s in of_kind("Service")}
    config = yaml.safe_load((REPO / "deploy/prometheus/prometheus-kubernetes.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {"duplexline-bridge", "duplexline-worker"}  # the names alerts.yml and the dashboard use
    for component in ("bridge", "worker"):
        [sd] = jobs[f"duplexline-{component}"]["dns_sd_configs"]
        [name] = sd["names"]
        svc = services[f"duplexline-{component}-metrics"]
        assert name == f"{svc['metadata']['name']}.{namespace}.svc.cluster.local"
        assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
        assert sd["port"] == listen_port(container(component), "DUPLEXLINE_HTTP_LISTEN") == svc["spec"]["ports"][0]["port"]


def test_the_manifests_match_the_kubernetes_schema():
    """Kubernetes' own OpenAPI schemas (kubernetes-validate, a test dependency), strict: an
    unknown field is an error, as `kubectl apply --validate=strict` makes it."""
    import kubernetes_validate
    from kubernetes_validate.utils import all_versions, major_minor

    # The oldest release the manifests promise, or the oldest the package still ships past it.
    shipped = sorted({major_minor(v) for v in all_versions()}, key=lambda v: tuple(map(int, v.split("."))))
    wanted = major_minor(KUBERNETES_VERSION)
    version = next(v for v in shipped if tuple(map(int, v.split("."))) >= tuple(map(int, wanted.split("."))))
    for name, doc in manifests():
        try:
            kubernetes_validate.validate(doc, version + ".0", strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{name} {doc['kind']}/{doc['metadata']['name']}: {exc}") from None


def test_the_prestop_hook_drains_a_real_server(tmp_path):
    """The hook's command, run as the kubelet would (the container's environment, its
    python), makes a real serve drain and exit cleanly. (Bridge and worker share one
    command; each distinct one is run.)"""
    commands = {tuple(container(c)["lifecycle"]["preStop"]["exec"]["command"]) for c in ("bridge", "worker")}
    for i, command in enumerate(sorted(commands)):
        assert command[:2] == ("python", "-c")
        token = "prestop-token"
        with ServeProcess("--agent", "echo", "--admin-token", token, log_path=tmp_path / f"serve{i}.log") as server:
            env = {**os.environ, "DUPLEXLINE_HTTP_LISTEN": f"0.0.0.0:{server.http_port}",
                   "DUPLEXLINE_ADMIN_TOKEN": token}
            hook = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, text=True, timeout=30)
            assert hook.returncode == 0, hook.stderr
            assert server.proc.wait(timeout=30) == 0, server.log()
            assert "draining" in server.log()
