"""The charts' `helm test` hooks and the ttrv chart's opt-in Prometheus monitors, rendered by the real helm binary.

- each chart has a test hook: valid objects carrying helm.sh/hook: test, restricted pods, least privilege;
- the operator chart's hook runs here against a real metrics endpoint served the way the operator serves it (the
  operator's own prometheus_client registry), and fails with its message against one that is not the operator's;
- the ttrv chart's hook script (bash + kubectl) runs here against a stand-in kubectl that answers as the API server
  would for an accepted, a rejected and a failed Experiment (kubectl itself is not installed on this machine);
- the PodMonitor, ServiceMonitor and NetworkPolicy select exactly the pods, Service and port the operator creates.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import prometheus_client
import pytest
from k8s_util import (
    ROOT,
    helm_template,
    is_pod_selected,
    pod_templates,
    security_problems,
    validate_object,
)

import operators.metrics  # noqa: F401 - registers the operator's metric families in prometheus_client's REGISTRY
from ttrv.labels import REPLICA_TYPE_LABEL
from ttrv.manifests import ROLLOUT_PORT, TRAINER_APIS, experiment_objects
from ttrv.spec import ExperimentSpec

VALUES = sorted(p.name for p in (ROOT / "examples").glob("values-*.yaml"))
HOOK = "helm.sh/hook"


def hooks(chart: str, *args: str, namespace: str) -> list[dict]:
    return [obj for obj in helm_template(chart, "rel", *args, namespace=namespace, tests=True)
            if HOOK in (obj["metadata"].get("annotations") or {})]


def check_hook_objects(objects: list[dict]) -> dict:
    """Every hook object valid and a test hook deleted once it passed; the one Pod, restricted and never restarted."""
    for obj in objects:
        validate_object(obj)
        annotations = obj["metadata"]["annotations"]
        assert annotations[HOOK] == "test", obj["metadata"]["name"]
        assert set(annotations["helm.sh/hook-delete-policy"].split(",")) == {"before-hook-creation",
                                                                             "hook-succeeded"}
    (pod,) = [obj for obj in objects if obj["kind"] == "Pod"]
    assert pod["spec"]["restartPolicy"] == "Never"
    assert security_problems("test pod", {"metadata": pod["metadata"], "spec": pod["spec"]}) == []
    return pod


# --- the ttrv chart -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values", VALUES)
def test_the_ttrv_charts_test_reads_only_its_experiment(values):
    objects = hooks("ttrv", "-f", f"examples/{values}", namespace="team-a")
    pod = check_hook_objects(objects)
    (experiment,) = helm_template("ttrv", "rel", "-f", f"examples/{values}")
    name = experiment["metadata"]["name"]
    kinds = {obj["kind"]: obj for obj in objects}
    assert set(kinds) == {"ServiceAccount", "Role", "RoleBinding", "Pod"}
    # RBAC first (a lower hook weight), so the pod's first call is authorised.
    weight = {kind: int(obj["metadata"]["annotations"].get("helm.sh/hook-weight", "0")) for kind, obj in kinds.items()}
    assert max(weight["ServiceAccount"], weight["Role"], weight["RoleBinding"]) < weight["Pod"]
    assert kinds["Role"]["rules"] == [{"apiGroups": ["ttrv.io"], "resources": ["experiments"], "resourceNames": [name],
                                       "verbs": ["get", "list", "watch"]}]
    binding = kinds["RoleBinding"]
    assert binding["roleRef"]["name"] == kinds["Role"]["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": kinds["ServiceAccount"]["metadata"]["name"],
                                    "namespace": "team-a"}]
    assert pod["spec"]["serviceAccountName"] == kinds["ServiceAccount"]["metadata"]["name"]
    script = pod["spec"]["containers"][0]["args"][0]
    assert f"experiment.ttrv.io/{name}" in script and "--namespace=team-a" in script
    # The chart-only values stay out of the Experiment's spec.
    assert not {"helmTest", "monitoring"} & set(experiment["spec"])


KUBECTL = """#!/bin/sh
# kubectl as the API server would answer the test pod: $KUBECTL_CONDITION is the Experiment's SpecChangeRejected
# status, $KUBECTL_PHASE its phase.
echo "$@" >> "$KUBECTL_LOG"
case "$1" in
  wait) [ "$KUBECTL_CONDITION" = False ] && echo "$5 condition met" && exit 0
        echo "error: timed out waiting for the condition on $5" >&2; exit 1 ;;
  get) case "$*" in
         *"{.status.phase}"*) printf %s "$KUBECTL_PHASE" ;;
         *) printf %s "$KUBECTL_MESSAGE" ;;
       esac ;;
esac
"""


def run_ttrv_test(tmp_path, condition: str, phase: str, message: str = "") -> subprocess.CompletedProcess:
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    pod = check_hook_objects(hooks("ttrv", "-f", "examples/values-tiny-shapes.yaml", namespace="team-a"))
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(KUBECTL)
    kubectl.chmod(kubectl.stat().st_mode | stat.S_IXUSR)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "KUBECTL_LOG": str(tmp_path / "calls"),
           "KUBECTL_CONDITION": condition, "KUBECTL_PHASE": phase, "KUBECTL_MESSAGE": message}
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["/bin/bash", "-c"]
    return subprocess.run(["bash", "-c", container["args"][0]], env=env, capture_output=True, text=True,
                          timeout=30)


def test_the_ttrv_charts_test_passes_once_the_operator_accepted_the_experiment(tmp_path):
    result = run_ttrv_test(tmp_path, condition="False", phase="Running")
    assert result.returncode == 0, result.stderr
    assert "experiment.ttrv.io/tiny-shapes: accepted by the operator, phase Running" in result.stdout
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == ("wait --namespace=team-a --for=condition=SpecChangeRejected=False --timeout=300s "
                        "experiment.ttrv.io/tiny-shapes")


def test_the_ttrv_charts_test_fails_with_the_operators_reason(tmp_path):
    rejected = run_ttrv_test(tmp_path, condition="True", phase="Running",
                             message="grpo.lr cannot change while the experiment exists")
    assert rejected.returncode == 1
    assert "has not accepted experiment.ttrv.io/tiny-shapes within 300s" in rejected.stderr
    assert "grpo.lr cannot change" in rejected.stderr
    failed = run_ttrv_test(tmp_path, condition="False", phase="Failed", message="every dataset failed")
    assert failed.returncode == 1
    assert "experiment.ttrv.io/tiny-shapes failed: every dataset failed" in failed.stderr


# --- the operator chart ---------------------------------------------------------------------------------------

def test_the_operator_charts_test_targets_the_operators_metrics_service():
    objects = helm_template("ttrv-operator", "ttrv-operator", namespace="ttrv-system", tests=True)
    pod = check_hook_objects([obj for obj in objects if HOOK in (obj["metadata"].get("annotations") or {})])
    (service,) = [obj for obj in objects if obj["kind"] == "Service" and obj["metadata"]["name"].endswith("-metrics")]
    (deployment,) = [obj for obj in objects if obj["kind"] == "Deployment" and
                     obj["metadata"]["labels"].get("app.kubernetes.io/component") == "operator"]
    env = {item["name"]: item["value"] for item in pod["spec"]["containers"][0]["env"]}
    (port,) = service["spec"]["ports"]
    assert env["TTRV_METRICS_URL"] == \
        f"http://{service['metadata']['name']}.ttrv-system.svc:{port['port']}/metrics"
    assert is_pod_selected(service["spec"]["selector"], deployment["spec"]["template"])
    assert pod["spec"]["containers"][0]["image"] == deployment["spec"]["template"]["spec"]["containers"][0]["image"]


class _Metrics(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", prometheus_client.CONTENT_TYPE_LATEST)
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def run_operator_test(body: bytes, seconds: str) -> subprocess.CompletedProcess:
    pod = [obj for obj in helm_template("ttrv-operator", "ttrv-operator", "--show-only",
                                        "templates/tests/operator-metrics.yaml", namespace="ttrv-system", tests=True)]
    container = check_hook_objects(pod)["spec"]["containers"][0]
    assert container["command"] == ["python", "-c"]
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Metrics,), {"body": body}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {item["name"]: item["value"] for item in container["env"]}
        env |= {"TTRV_METRICS_URL": f"http://127.0.0.1:{server.server_port}/metrics", "TTRV_TEST_SECONDS": seconds}
        return subprocess.run([sys.executable, "-c", container["args"][0]], env=env, capture_output=True, text=True,
                              timeout=60)
    finally:
        server.shutdown()


def test_the_operator_charts_test_passes_against_the_operators_metrics():
    result = run_operator_test(prometheus_client.generate_latest(prometheus_client.REGISTRY), "10")
    assert result.returncode == 0, result.stderr
    assert "the ttrv operator serves its metrics at http://127.0.0.1:" in result.stdout


def test_the_operator_charts_test_fails_against_another_server():
    result = run_operator_test(b"# TYPE up gauge\nup 1\n", "1")
    assert result.returncode == 1
    assert "without ttrv_operator_reconciles_total: not the ttrv operator" in result.stderr
    assert "kubectl -n ttrv-system logs deployment/ttrv-operator" in result.stderr


# --- monitoring -------------------------------------------------------------------------------------------------

def test_no_monitor_unless_asked():
    assert [obj["kind"] for obj in helm_template("ttrv", "rel", "-f", "examples/values-tiny-shapes.yaml")] == \
        ["Experiment"]


def relabel_keeps(relabeling: dict, pod_labels: dict) -> bool:
    """Prometheus' `keep` relabeling of a pod target: its source labels' values (a pod label `a.b/c` is
    __meta_kubernetes_pod_label_a_b_c, empty when absent) joined by the separator, matched whole by the regex."""
    values = []
    for source in relabeling["sourceLabels"]:
        label = source.removeprefix("__meta_kubernetes_pod_label_")
        values.append(next((v for k, v in pod_labels.items() if re.sub(r"[^a-zA-Z0-9_]", "_", k) == label), ""))
    assert relabeling["action"] == "keep"
    return re.fullmatch(relabeling["regex"], relabeling["separator"].join(values)) is not None


@pytest.mark.parametrize("api", TRAINER_APIS)
@pytest.mark.parametrize("values", VALUES)
def test_the_monitors_select_the_operators_objects(values, api):
    objects = helm_template("ttrv", "rel", "-f", f"examples/{values}", "--set", "monitoring.enabled=true",
                            "--set", "monitoring.labels.release=kube-prometheus-stack")
    for obj in objects:
        validate_object(obj)
    kinds = {obj["kind"]: obj for obj in objects}
    assert set(kinds) == {"Experiment", "PodMonitor", "ServiceMonitor", "NetworkPolicy"}
    experiment = kinds["Experiment"]
    children = experiment_objects(experiment["metadata"], ExperimentSpec.model_validate(experiment["spec"]), api)
    for monitor in (kinds["PodMonitor"], kinds["ServiceMonitor"]):
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"

    # The PodMonitor: the trainer pods, on their metrics port, rank 0 only.
    pod_monitor = kinds["PodMonitor"]
    (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    (keep,) = endpoint["relabelings"]
    trainers = [(where, template) for obj in children for where, template in pod_templates(obj)
                if obj["kind"] in ("PyTorchJob", "TrainJob", "JobSet") or "trainer" in where.lower()]
    assert trainers
    for where, template in trainers:
        assert is_pod_selected(pod_monitor["spec"]["selector"]["matchLabels"], template), where
        ports = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        assert endpoint["port"] in ports, where
    # The labels the trainer's controllers put on its pods: the training operator its replica type, a TrainJob's
    # indexed Job (JobSet) the completion index. Rank 0 serves metrics (ttrv/train.py): the master, or index 0.
    if api == "pytorchjob":
        assert relabel_keeps(keep, {REPLICA_TYPE_LABEL: "master"})
        assert not relabel_keeps(keep, {REPLICA_TYPE_LABEL: "worker"})
    else:
        assert relabel_keeps(keep, {"batch.kubernetes.io/job-completion-index": "0"})
        assert not relabel_keeps(keep, {"batch.kubernetes.io/job-completion-index": "1"})

    # The ServiceMonitor and the NetworkPolicy: the rollout Service's port, and the pods behind it.
    rollout_services = [obj for obj in children if obj["kind"] == "Service"]
    rollout_pods = [template for obj in children if obj["kind"] == "Deployment"
                    for _, template in pod_templates(obj)]
    monitor = kinds["ServiceMonitor"]
    for service in rollout_services:
        assert is_pod_selected(monitor["spec"]["selector"]["matchLabels"], service)  # selects by metadata.labels
        assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    policy = kinds["NetworkPolicy"]
    for template in rollout_pods:
        assert is_pod_selected(policy["spec"]["podSelector"]["matchLabels"], template)
    assert policy["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": ROLLOUT_PORT}]
