"""deploy/k8s/ is valid and consistent, without a cluster.

Two checks of validity: a structural check here (what `kubectl apply` and the scheduler
need: kinds, names, selectors that match their pods, probes on ports that exist, the GPU
request on the worker and none on the bridge, the bridge's remote engine, the worker's
advertised pod address, a drain before SIGKILL, a PodDisruptionBudget per Deployment,
Prometheus finding the pods), and, when the `kubernetes-validate` package is installed, a
strict check against Kubernetes' own OpenAPI schemas (it ships them; nothing is downloaded).
The bridge's preStop drain command is run for real against a real `duplexline serve`, and a
real `duplexline worker` runs with the worker's environment.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
import yaml

from bridge.cli import build_parser
from bridge.settings import Settings, settings_from
from tests.integration.serve_process import REPO, ServeProcess, http_json
from tests.integration.test_deploy_compose import WorkerProcess
from tests.integration.test_deploy_settings import K8S_FIELDS, k8s_env

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


def settings(component: str) -> Settings:
    """The container's settings, as its process builds them from its args and environment."""
    c = container(component)
    return settings_from(build_parser().parse_args(c["args"]), k8s_env(c))


def metrics_port(component: str) -> int:
    """Where the process serves /metrics and its probes: a bridge's HTTP port, a worker's one port."""
    c = container(component)
    return listen_port(c, "DUPLEXLINE_WORKER_LISTEN" if component == "worker" else "DUPLEXLINE_HTTP_LISTEN")


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
    probed = {c[probe]["httpGet"]["port"] for probe in ("livenessProbe", "readinessProbe", "startupProbe")}
    assert len(probed) == 1 and ports[probed.pop()]["containerPort"] == metrics_port(component)
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        get = c[probe]["httpGet"]
        assert get["path"] == path and get["port"] in ports, (component, probe, get)
    drain = float(k8s_env(c)["DUPLEXLINE_DRAIN_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] >= drain + 10, "SIGKILL would cut calls still draining"
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_the_bridge_takes_the_calls_on_the_node_network():
    c, pod = container("bridge"), deployment("bridge")["spec"]["template"]["spec"]
    ports = {p["name"]: p for p in c["ports"]}
    assert ports["http"]["containerPort"] == listen_port(c, "DUPLEXLINE_HTTP_LISTEN")
    sip = listen_port(c, "DUPLEXLINE_SIP_LISTEN")
    assert {(ports[n]["containerPort"], ports[n]["protocol"]) for n in ("sip-udp", "sip-tcp")} == {(sip, "UDP"), (sip, "TCP")}
    # RTP port ranges and SIP addresses the node owns: the node's network (see bridge.yaml).
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    s = settings("bridge")
    assert s.sip.public_address == K8S_FIELDS["status.hostIP"], "SIP advertises (and binds) the node's address"
    # Admin routes on a public port: the token is required, from the Secret.
    assert s.admin_token and "/admin/drain" in " ".join(c["lifecycle"]["preStop"]["exec"]["command"])
    [token] = [e for e in c["env"] if e["name"] == "DUPLEXLINE_ADMIN_TOKEN"]
    assert "secretKeyRef" in token["valueFrom"]


def test_the_worker_asks_for_a_gpu_and_the_bridge_does_not():
    worker, bridge = container("worker"), container("bridge")
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == 1 == worker["resources"]["limits"]["nvidia.com/gpu"]
    assert worker["args"] == ["worker", "--device", "cuda"] and settings("worker").device == "cuda"
    assert "nvidia.com/gpu" not in str(bridge["resources"])
    assert "tolerations" not in deployment("bridge")["spec"]["template"]["spec"]
    # The bridge takes every call and runs no model: each call's session goes to a worker of
    # the registry, the same Redis the workers publish themselves in.
    b = settings("bridge")
    assert bridge["args"][0] == "serve" and (b.agent, b.engine) == ("omniflatten", "redis")
    assert b.redis and b.redis == settings("worker").redis
    assert b.resolved_model_id == settings("worker").resolved_model_id, "bridges place only on workers of their model"


def test_the_worker_publishes_its_pod_address_and_name():
    """Bridges connect to the address a worker publishes: its pod IP (the downward API) on
    the port it listens on, and its pod name as its id (unique per pod)."""
    c, pod = container("worker"), deployment("worker")["spec"]["template"]["spec"]
    env = {e["name"]: e for e in c["env"]}
    names = [e["name"] for e in c["env"]]
    assert not pod.get("hostNetwork"), "the worker has no RTP or SIP: it stays off the node's ports"
    w = settings("worker").worker
    assert w.listen.host == "0.0.0.0" and w.listen.port == c["ports"][0]["containerPort"] == metrics_port("worker")
    assert w.address == f"{K8S_FIELDS['status.podIP']}:{w.listen.port}"
    assert w.worker_id == K8S_FIELDS["metadata.name"]
    advertise = env["DUPLEXLINE_WORKER_ADVERTISE"]["value"]
    ref = advertise.partition("$(")[2].partition(")")[0]
    assert env[ref]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert names.index(ref) < names.index("DUPLEXLINE_WORKER_ADVERTISE"), "$(VAR) needs VAR defined before it"
    assert env["DUPLEXLINE_WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # The kubelet's SIGTERM drains a worker (it has no admin routes): no preStop hook.
    assert "lifecycle" not in c


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
        assert sd["port"] == metrics_port(component) == svc["spec"]["ports"][0]["port"]


def test_the_edge_finds_the_ready_bridges_and_runs_the_shipped_config(tmp_path):
    """The Kamailio edge (kamailio.yaml): on the node's network at the node's address, on a
    port the bridge does not take (both may share a node); its sidecar resolves a headless
    Service of the ready bridge pods and writes the list Kamailio reads, on the bridges' SIP
    port, reloading through the socket Kamailio opens. The sidecar's script, run for real
    (`localhost` resolves from /etc/hosts: no DNS query leaves the machine), writes a list in
    the dispatcher's format."""
    from tests.integration.test_deploy_compose import kamailio_check, kamailio_defines

    namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    pod = deployment("kamailio")["spec"]["template"]["spec"]
    [edge] = pod["containers"]
    [side] = pod["initContainers"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert side["restartPolicy"] == "Always", "a native sidecar: it runs beside Kamailio"
    assert edge["image"] == side["image"] and edge["image"].startswith("duplexline-kamailio:")
    defines = kamailio_defines(edge["args"])
    env = {e["name"]: e for e in edge["env"]}
    assert defines["LISTEN_ADDR"] == "$(NODE_IP)"
    assert env["NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    sip = int(defines["SIP_PORT"])
    ports = {(p["containerPort"], p["protocol"]) for p in edge["ports"]}
    assert ports == {(sip, "UDP"), (sip, "TCP")}
    bridge = container("bridge")
    bridge_sip = listen_port(bridge, "DUPLEXLINE_SIP_LISTEN")
    low, high = map(int, k8s_env(bridge)["DUPLEXLINE_RTP_PORTS"].split("-"))
    bridge_ports = {(p["containerPort"], p["protocol"]) for p in bridge["ports"]} | {(p, "UDP") for p in range(low, high + 1)}
    assert not ports & bridge_ports, "the edge and a bridge on one node want the same port"
    # The sidecar: the headless Service of ready bridges, their SIP port, the edge's files.
    side_env = {e["name"]: e["value"] for e in side["env"]}
    services = {s["metadata"]["name"]: s for s in of_kind("Service")}
    name, _, rest = side_env["BRIDGE_SERVICE"].partition(".")
    assert rest == f"{namespace}.svc.cluster.local"
    svc = services[name]["spec"]
    assert svc["clusterIP"] == "None" and svc["publishNotReadyAddresses"] is False
    assert selects(svc["selector"], deployment("bridge")["spec"]["template"]["metadata"]["labels"])
    assert int(side_env["BRIDGE_PORT"]) == bridge_sip
    assert defines["DISPATCHER_LIST"] == f'"{side_env["DISPATCHER_LIST"]}"'
    assert defines["CTL_SOCKET"] == f'"{side_env["CTL_SOCKET"]}"'
    assert side_env["CTL_SOCKET"] in edge["livenessProbe"]["exec"]["command"]
    mounts = [{m["mountPath"]: m["name"] for m in c["volumeMounts"]} for c in (edge, side)]
    shared = os.path.dirname(side_env["DISPATCHER_LIST"])
    assert mounts[0][shared] == mounts[1][shared] and os.path.dirname(side_env["CTL_SOCKET"][5:]) == shared
    assert side["command"] == ["/usr/local/bin/dispatcher-dns"]
    assert "COPY dispatcher-dns.sh /usr/local/bin/dispatcher-dns" in (REPO / "deploy/kamailio/Dockerfile").read_text()
    assert side["startupProbe"]["exec"]["command"] == ["test", "-s", side_env["DISPATCHER_LIST"]]
    # The script, for real.
    listed = tmp_path / "dispatcher.list"
    run = subprocess.run(["sh", str(REPO / "deploy/kamailio/dispatcher-dns.sh"), "--once"], capture_output=True,
                         text=True, timeout=30, env={**os.environ, "BRIDGE_SERVICE": "localhost", "BRIDGE_PORT": str(bridge_sip),
                                                     "DISPATCHER_LIST": str(listed), "CTL_SOCKET": f"unix:{tmp_path}/none"})
    assert run.returncode == 0, run.stderr
    assert listed.read_text().splitlines() == [f"1 sip:127.0.0.1:{bridge_sip} 0 0 duid=127.0.0.1"]
    checked = kamailio_check({**defines, "LISTEN_ADDR": K8S_FIELDS["status.hostIP"]})
    assert checked is None or checked.returncode == 0, checked.stderr[-3000:]


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
    """The bridge's hook command, run as the kubelet would (the container's environment, its
    python), makes a real serve drain and exit cleanly."""
    command = container("bridge")["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["python", "-c"]
    token = "prestop-token"
    with ServeProcess("--agent", "echo", "--admin-token", token, log_path=tmp_path / "serve.log") as server:
        env = {**os.environ, "DUPLEXLINE_HTTP_LISTEN": f"0.0.0.0:{server.http_port}",
               "DUPLEXLINE_ADMIN_TOKEN": token}
        hook = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, text=True, timeout=30)
        assert hook.returncode == 0, hook.stderr
        assert server.proc.wait(timeout=30) == 0, server.log()
        assert "draining" in server.log()


def test_a_real_worker_runs_with_the_manifest_environment(tmp_path, redis_server):
    """`duplexline worker` with the worker container's environment (the kubelet's values
    filled in; a free port on 127.0.0.1 for its 7070, the test's Redis, the CPU): its probes
    answer on the port, and it publishes the advertised address and its pod name in the
    registry; SIGTERM drains and stops it, and it leaves the registry."""
    from model.worker_registry import WorkerRegistry

    c = container("worker")
    worker = WorkerProcess(log_path=tmp_path / "worker.log")
    port = worker.http_port
    env = {**k8s_env(c), "DUPLEXLINE_REDIS": redis_server.url, "DUPLEXLINE_SLOTS": "2",
           "DUPLEXLINE_WORKER_LISTEN": f"0.0.0.0:{port}", "DUPLEXLINE_WORKER_ADVERTISE": f"127.0.0.1:{port}"}
    worker.env.update(env)
    assert c["args"][-2:] == ["--device", "cuda"]
    worker.args = [*c["args"][:-1], "cpu"]  # the manifest's command on the CPU; its port from the environment
    with worker:
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            status, body = http_json("GET", f"http://127.0.0.1:{port}{c[probe]['httpGet']['path']}")
            assert status == 200, (probe, body)
        status, body = http_json("GET", f"http://127.0.0.1:{port}/readyz")
        assert body["worker_id"] == K8S_FIELDS["metadata.name"]

        async def published():
            reg = WorkerRegistry(redis_server.url)
            await reg.connect()
            try:
                return await reg.workers(include_draining=True)
            finally:
                await reg.close()

        [info] = asyncio.run(published())
        assert (info.worker_id, info.address) == (K8S_FIELDS["metadata.name"], f"127.0.0.1:{port}")
        assert info.model_id == settings("bridge").resolved_model_id
        assert worker.terminate() == 0, worker.log()
    assert asyncio.run(published()) == []
