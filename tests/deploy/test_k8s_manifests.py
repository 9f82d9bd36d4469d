"""deploy/k8s: rendered like `kubectl apply -k` would (kubectl kustomize where kubectl exists, else the
kustomization's plain files), every object validated with kubernetes-validate --strict against a current
Kubernetes release, every object the manifests reference defined, and the settings that make drains,
probes, metrics and multi-pod training work checked against each other."""

from __future__ import annotations

import copy
import shutil
import subprocess

import pytest
import yaml
from tests.deploy_helpers import REPO

from chatforge.serving.service import SERVICE_NAME

K8S = REPO / "deploy" / "k8s"
K8S_VERSION = "1.33.0"  # a current release; kubernetes-validate ships its schemas offline
kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the dev extra")


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    if shutil.which("kubectl"):
        out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60,
                             check=True).stdout
        print("\nrendered with kubectl kustomize")
        return [d for d in yaml.safe_load_all(out) if d]
    print("\nkubectl not found: validating the kustomization's files as they are")
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [d for f in kust["resources"] for d in yaml.safe_load_all((K8S / f).read_text()) if d]


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, f"{kind} {name or ''}: {len(hits)} found"
    return hits[0]


def _pod_specs(docs: list[dict]) -> list[tuple[str, dict, dict]]:
    return [(d["kind"], d["spec"]["template"]["metadata"], d["spec"]["template"]["spec"])
            for d in docs if d["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet")]


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kust["resources"]) == files


def test_every_object_validates_strictly(rendered):
    assert len(rendered) >= 8
    for doc in rendered:
        kv.validate(doc, K8S_VERSION, strict=True)  # raises ValidationError naming the field


def test_the_validator_rejects_what_kubernetes_would():
    """Guards the test above: a misspelt field or a wrong type does not pass."""
    dep = yaml.safe_load((K8S / "deployment.yaml").read_text())
    typo = copy.deepcopy(dep)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(typo, K8S_VERSION, strict=True)
    wrong = copy.deepcopy(dep)
    wrong["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(wrong, K8S_VERSION, strict=True)


def test_every_referenced_object_is_defined(rendered):
    defined = {(d["kind"], d["metadata"]["name"]) for d in rendered}
    for _kind, meta, pod in _pod_specs(rendered):
        for vol in pod.get("volumes", []):
            if "persistentVolumeClaim" in vol:
                assert ("PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"]) in defined, vol
            for ref_kind, key in (("ConfigMap", "configMap"), ("Secret", "secret")):
                if key in vol:
                    assert (ref_kind, vol[key].get("name", vol[key].get("secretName"))) in defined, vol
        if "subdomain" in pod:
            svc = _one(rendered, "Service", pod["subdomain"])
            assert svc["spec"]["clusterIP"] == "None"  # pod DNS names need a headless Service
            assert svc["spec"]["selector"].items() <= meta["labels"].items()
        for c in pod["containers"]:
            for env in c.get("env", []):
                ref = env.get("valueFrom", {})
                for ref_kind, key in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                    if key in ref:  # an optional reference may point at nothing (the feature stays off)
                        assert ref[key].get("optional") or (ref_kind, ref[key]["name"]) in defined, env
    hpa = _one(rendered, "HorizontalPodAutoscaler")
    assert (hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"]) in defined


def test_images_are_pinned(rendered):
    for _, _, pod in _pod_specs(rendered):
        for c in pod["containers"] + pod.get("initContainers", []):
            name, _, tag = c["image"].rpartition(":")
            assert name and tag and tag != "latest", c["image"]


def test_serving_pod_probes_drain_and_metrics(rendered):
    dep = _one(rendered, "Deployment", "chatforge")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    args = c["args"]
    assert ports["grpc"] == int(_flag(args, "--port"))
    assert ports["http"] == int(_flag(args, "--http-port"))  # the OpenAI-compatible API and chat page
    assert "0.0.0.0" in args  # reachable from the kubelet and the Service, not only localhost
    # Native gRPC probes: readiness on the Chatbot service (NOT_SERVING while loading and draining),
    # liveness on the whole server ("": SERVING while draining, so a drain is never killed).
    assert c["readinessProbe"]["grpc"] == {"port": ports["grpc"], "service": SERVICE_NAME}
    assert c["startupProbe"]["grpc"] == {"port": ports["grpc"], "service": SERVICE_NAME}
    assert c["livenessProbe"]["grpc"] == {"port": ports["grpc"], "service": ""}
    assert c["readinessProbe"]["periodSeconds"] <= 2 and c["readinessProbe"]["failureThreshold"] == 1
    start = c["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= 60  # a slow model load is not killed
    # preStop pauses for the drain delay; SIGKILL never cuts pause + delay + grace.
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    delay, grace = float(_flag(args, "--drain-delay")), float(_flag(args, "--grace"))
    assert pre_stop == delay
    assert pod["terminationGracePeriodSeconds"] > pre_stop + delay + grace
    # The metrics port is opened (the env var serve reads), declared, annotated and in the Service.
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert int(env["CHATFORGE_METRICS_PORT"]) == ports["metrics"]
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == ports["metrics"]
    svc = _one(rendered, "Service", "chatforge")
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == {"grpc", "http", "metrics"}
    # Clients reach the HTTP API on the same port number as the pod serves it (deploy/ uses 8080 throughout).
    assert {p["port"] for p in svc["spec"]["ports"] if p["targetPort"] == "http"} == {ports["http"]}
    # Locked down like tests/scenarios/test_image.py runs the image.
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and sc["capabilities"]["drop"] == ["ALL"]
    assert not sc["allowPrivilegeEscalation"] and pod["securityContext"]["runAsNonRoot"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/models"]["readOnly"] and "/tmp" in mounts and "/data" in mounts
    assert _flag(args, "--model-dir") == "/models"


def test_selectors_hpa_and_pdb_line_up(rendered):
    dep = _one(rendered, "Deployment", "chatforge")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    train_labels = _one(rendered, "Job")["spec"]["template"]["metadata"]["labels"]
    for svc in (d for d in rendered if d["kind"] == "Service" and d["metadata"]["name"] != "chatforge-train"):
        assert svc["spec"]["selector"].items() <= labels.items(), svc["metadata"]["name"]
        assert not svc["spec"]["selector"].items() <= train_labels.items()  # training pods get no traffic
    hpa = _one(rendered, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    pdb = _one(rendered, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]  # a node drain can still make progress


def test_training_job_runs_torchrun_across_its_pods(rendered):
    job = _one(rendered, "Job", "chatforge-train")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] >= 2
    (c,) = pod["containers"]
    script = " ".join(c["args"])
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert "torchrun" in script and int(env["NNODES"]) == spec["completions"]
    assert '--node-rank "$JOB_COMPLETION_INDEX"' in script
    # Rank 0's pod, by its stable DNS name under the headless Service.
    assert f"--master-addr {job['metadata']['name']}-0.{pod['subdomain']}" in script
    assert c["image"].split(":")[0] == "chatforge-train"
    # It writes to the claim the serving pods read, under a hidden name first (atomic publish).
    dep_claims = {v["persistentVolumeClaim"]["claimName"] for v in
                  _one(rendered, "Deployment")["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v}
    job_claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert job_claims == dep_claims
    assert ".incoming-" in script and "mv " in script
