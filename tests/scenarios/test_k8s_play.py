"""deploy/k8s run, not only validated: ``podman kube play`` of the shipped model claim (models-pvc.yaml) and
Deployment (deployment.yaml) with the serving image, as close to a cluster as this machine gets (no cluster and
no registry are reachable here; tests/deploy/test_k8s_manifests.py validates every object against Kubernetes'
schemas).

What podman runs from the manifests as written: both replicas (one pod each), the container's args, its
environment (the pod name through ``fieldRef``, the CPU limit through ``resourceFieldRef``, the optional Secret
references absent), its security context (uid 10001, read-only root file system, no capabilities) and volumes
(the claim as a named volume read-only at /models, emptyDir /data and /tmp). The test then calls each pod on its
own address (gRPC health and a streamed reply, the HTTP API, /metrics), writes a new model version into the
claim the way the training Job does and sees both pods hot-swap to it, and stops a pod within its
termination grace period (SIGTERM, drained, exit 0).

Changed before playing, and nothing else: the object names get a random suffix (no clash with anything on the
machine), and the container's ``ports`` are dropped, because podman 4.3 publishes every containerPort on the
host's every address (Kubernetes publishes none), which would bind the host's 50051/8080/9100 and make the second
replica fail. Not run by podman: the gRPC probes, preStop and the rolling-update strategy (a kubelet's and a
controller's work); their settings are checked against each other in test_k8s_manifests.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid

import pytest
import yaml
from tests.container_helpers import ENGINE, podman, skip
from tests.deploy_helpers import REPO, http_get, say, train_tiny_bundles, wait_for

from chatforge.client import ChatbotClient

pytestmark = pytest.mark.slow

K8S = REPO / "deploy" / "k8s"
START_TIMEOUT_S = 180
SWAP_TIMEOUT_S = 60


def _kube(*args: str, env: dict[str, str], timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([*ENGINE, "kube", *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"podman kube {' '.join(args[:2])} failed ({r.returncode}):\n{r.stdout[-2000:]}\n"
                             f"{r.stderr[-3000:]}")
    return r


class Played:
    def __init__(self, deployment: dict, claim: str, env: dict[str, str]):
        self.deployment, self.claim, self.env = deployment, claim, env
        self.name = deployment["metadata"]["name"]
        self.replicas = deployment["spec"]["replicas"]
        self.pods: list[str] = []  # found after play: podman 4.3 makes one pod per replica, NAME-pod-I
        self.container_name = deployment["spec"]["template"]["spec"]["containers"][0]["name"]

    def container(self, pod: str) -> str:
        return f"{pod}-{self.container_name}"

    def address(self, pod: str) -> str:
        infra = podman("pod", "inspect", pod, "--format", "{{.InfraContainerID}}").stdout.strip()
        nets = json.loads(podman("inspect", infra, "--format", "{{json .NetworkSettings.Networks}}").stdout)
        (ip,) = {n["IPAddress"] for n in nets.values() if n.get("IPAddress")}
        return ip

    def logs(self, pod: str) -> str:
        r = podman("logs", self.container(pod), check=False)
        return r.stdout + r.stderr


@pytest.fixture(scope="module")
def played(serving_image, tmp_path_factory, pytestconfig):
    if shutil.which("catatonit") is None and not os.path.exists("/usr/libexec/podman/catatonit"):
        skip("podman kube play needs catatonit for its pause image (tools/ci_install_containers.sh installs it)")
    work = tmp_path_factory.mktemp("k8s")
    suffix = uuid.uuid4().hex[:6]
    claim = yaml.safe_load((K8S / "models-pvc.yaml").read_text())
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    claim["metadata"]["name"] = f"{claim['metadata']['name']}-ci-{suffix}"
    deployment["metadata"]["name"] = f"{deployment['metadata']['name']}-ci-{suffix}"
    spec = deployment["spec"]["template"]["spec"]
    (models,) = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
    models["persistentVolumeClaim"]["claimName"] = claim["metadata"]["name"]
    for c in spec["containers"]:
        c.pop("ports", None)
    podman("tag", serving_image, spec["containers"][0]["image"])  # the image the manifest names
    (work / "claim.yaml").write_text(yaml.safe_dump(claim))
    (work / "deployment.yaml").write_text(yaml.safe_dump(deployment))
    # runc and ulimits the machine accepts (podman's defaults are refused here); not part of the manifests.
    conf = work / "containers.conf"
    conf.write_text('[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]\n'
                    '[engine]\nruntime = "runc"\n')
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    run = Played(deployment, claim["metadata"]["name"], env)
    chat, _ = train_tiny_bundles(work)
    try:
        _kube("play", str(work / "claim.yaml"), env=env)  # the claim becomes a named volume
        root = podman("volume", "inspect", run.claim, "--format", "{{.Mountpoint}}").stdout.strip()
        shutil.copytree(chat, os.path.join(root, "chat", "1"))  # what the training Job writes: /models/<name>/<v>/
        start = time.monotonic()
        _kube("play", str(work / "deployment.yaml"), env=env)
        run.pods = sorted(podman("pod", "ps", "--filter", f"name=^{run.name}-pod", "--format", "{{.Name}}")
                          .stdout.split())
        assert len(run.pods) == run.replicas, (run.pods, run.replicas)  # one pod per replica
        for pod in run.pods:
            wait_for(lambda p=pod: http_get(f"http://{run.address(p)}:9100/readyz")[0] == 200, START_TIMEOUT_S,
                     f"{pod}'s /readyz")
        say(pytestconfig, f"\nkube play: {run.replicas} pods ready in {time.monotonic() - start:.0f} s")
        run.root = root
        yield run
    finally:
        for pod in run.pods:
            print(f"--- {pod}\n{run.logs(pod)[-2000:]}")
        _kube("down", str(work / "deployment.yaml"), env=env, check=False)
        podman("volume", "rm", "-f", run.claim, check=False)


def test_each_pod_serves_as_the_deployment_configures_it(played):
    for pod in played.pods:
        ip, ctr = played.address(pod), played.container(pod)
        with ChatbotClient(f"{ip}:50051", timeout=30) as client:
            assert client.health("chatforge.v1.Chatbot") == "SERVING"  # what the readiness probe asks
            assert client.health("") == "SERVING"  # ... and the liveness probe
            assert [(m.name, m.version) for m in client.list_models()] == [("chat", "1")]  # from the claim
            chunks = list(client.reply_stream("안녕하세요", model="chat", max_new_tokens=6))
            assert chunks[-1].is_final and chunks[-1].completion_tokens == len(chunks) - 1 >= 1
        status, body = http_get(f"http://{ip}:8080/v1/models")
        assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == ["chat"]
        status, metrics = http_get(f"http://{ip}:9100/metrics")
        assert status == 200 and 'chatforge_requests_total{' in metrics and 'rpc="Reply"' in metrics
        # The container's security context and environment, as the manifest sets them.
        assert podman("exec", ctr, "id", "-u").stdout.strip() == "10001"
        assert podman("exec", ctr, "touch", "/opt/x", check=False).returncode != 0  # read-only root
        assert podman("exec", ctr, "touch", "/models/x", check=False).returncode != 0  # the claim read-only
        podman("exec", ctr, "touch", "/data/x", "/tmp/x")  # the emptyDirs writable
        env = dict(line.split("=", 1) for line in podman("exec", ctr, "env").stdout.splitlines() if "=" in line)
        assert env["CHATFORGE_SERVER_NAME"] == pod  # fieldRef metadata.name: alerts name the pod
        # No OMP_NUM_THREADS: the server sizes torch's pool from the pod's CPUs less one (runtime.serving_threads),
        # as its own log says; the manifest used to pin it to the CPU limit, every CPU.
        assert "OMP_NUM_THREADS" not in env
        want = podman("exec", ctr, "python3", "-c",
                      "from chatforge.runtime import serving_threads; print(serving_threads())").stdout.strip()
        logged = [ln for ln in podman("logs", ctr).stderr.splitlines() if '"torch threads: ' in ln]
        assert len(logged) == 1 and f'"torch threads: {want} (' in logged[0], (want, logged)
        # The optional Secrets are absent, so the image's own store (SQLite on the /data emptyDir) holds the turns
        # and no alerts are sent.
        assert env["CHATFORGE_STORE_URL"] == "sqlite:////data/conversations.db"
        assert env.get("CHATFORGE_ALERT_WEBHOOK_URL", "") == ""
        wait_for(lambda c=ctr: podman("exec", c, "test", "-s", "/data/conversations.db", check=False).returncode == 0,
                 30, f"{pod}'s conversation store on /data")


def test_a_new_version_in_the_claim_is_hot_swapped_by_every_pod(played, pytestconfig):
    shutil.copytree(os.path.join(played.root, "chat", "1"), os.path.join(played.root, "chat", ".2.tmp"))
    os.rename(os.path.join(played.root, "chat", ".2.tmp"), os.path.join(played.root, "chat", "2"))  # atomic
    start = time.monotonic()
    for pod in played.pods:
        with ChatbotClient(f"{played.address(pod)}:50051", timeout=30) as client:
            wait_for(lambda c=client: [m.version for m in c.list_models()] == ["2"], SWAP_TIMEOUT_S,
                     f"{pod} serving version 2", interval=0.5)
            chunks = list(client.reply_stream("안녕", model="chat", max_new_tokens=4))
            assert chunks[-1].is_final and chunks[-1].model_version == "2"
    say(pytestconfig, f"\nversion 2 written to the claim: both pods serve it after {time.monotonic() - start:.1f} s")


def test_a_pod_stopped_within_its_grace_period_drains_and_exits_zero(played, pytestconfig):
    pod = played.pods[-1]
    grace = played.deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    start = time.monotonic()
    podman("pod", "stop", "-t", str(grace), pod, timeout=grace + 30)
    took = time.monotonic() - start
    state = json.loads(podman("inspect", played.container(pod), "--format", "{{json .State}}").stdout)
    say(pytestconfig, f"\n{pod} stopped in {took:.1f} s (grace {grace} s); exit code {state['ExitCode']}")
    assert state["ExitCode"] == 0, played.logs(pod)[-3000:]
    assert '"event": "stopped"' in played.logs(pod)  # the server's own orderly shutdown, not SIGKILL
    assert took < grace
