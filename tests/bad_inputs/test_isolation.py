"""Isolation and secrets.

- Store prefixes: a run's prefix is `<storage.uri>/<namespace>/<experiment>/<dataset>` (run_store_uri), every part
  a DNS label, so no two runs' prefixes nest and no run can read or overwrite another's objects; shown on the
  real stores (a directory and the S3 server).
- Credentials come only from Secrets: in every object `ttrv render` and both charts make, and never in what a
  real adaptation on the S3 server leaves (stdout, stderr, events, report, run.yaml, every object in its prefix),
  nor in the status and events the operator makes of it; the log redaction masks them wherever they sit.
- The rollout service admits exactly its own run's trainer pods.
(Restricted pods: test_manifests, test_charts; least-privilege RBAC: test_charts.)
"""

from __future__ import annotations

import io
import json
import secrets
import subprocess
import sys
from itertools import combinations

import pytest
import structlog
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st
from k8s_util import ROOT, credential_problems, helm_template, is_pod_selected, pod_templates
from operator_fixtures import NOW, job, succeeded

from bad_inputs.catalogue import Case, cases, check, s3_client
from operators.progress import parse_progress, read_progress
from operators.runs import Observed, decide_run, desired_children
from ttrv import log
from ttrv.manifests import adaptation_run, experiment_objects, run_children, run_store_uri
from ttrv.spec import NAME_PATTERN, ExperimentSpec, SpecError, load_experiment
from ttrv.store import StoreConfigError, open_store

# --- store prefixes ------------------------------------------------------------------------------------------------

DNS = "must be a DNS label"
NAMES = cases("store prefix", [
    ("namespace-parent-step", ("..", "exp", "d"), ("metadata.namespace", "'..'"), DNS),
    ("namespace-with-slash", ("team-a/exp", "d", "x"), ("metadata.namespace",), DNS),
    ("experiment-climbing", ("team-a", "../team-b", "d"), ("metadata.name", "'../team-b'"), DNS),
    ("dataset-climbing", ("team-a", "exp", "d/../../../team-b/exp/d"), ("datasets[].name",), DNS),
    ("dataset-nested", ("team-a", "exp", "d/sub"), ("datasets[].name",), DNS),
    ("dataset-dot", ("team-a", "exp", "."), ("datasets[].name",), DNS),
    ("dataset-empty", ("team-a", "exp", ""), ("datasets[].name",), DNS),
    ("experiment-with-newline", ("team-a", "exp\n", "d"), ("metadata.name",), DNS),
    ("namespace-uppercase", ("Team-A", "exp", "d"), ("metadata.namespace",), DNS),
])


@pytest.mark.parametrize("case", NAMES)
def test_crafted_names_cannot_shape_a_store_prefix(case: Case):
    try:
        code, message = 0, run_store_uri("s3://bucket/runs", *case.input)
    except SpecError as error:
        code, message = 1, str(error)
    check(case, code, message)


LABEL = st.from_regex(NAME_PATTERN, fullmatch=True)


@given(st.lists(st.tuples(LABEL, LABEL, LABEL), min_size=2, max_size=6, unique=True))
def test_prefixes_of_distinct_runs_never_nest(runs):
    prefixes = [run_store_uri("s3://bucket/runs/", *run) + "/" for run in runs]
    for one, other in combinations(prefixes, 2):
        assert not one.startswith(other) and not other.startswith(one), (one, other)


# Neighbours that a loose prefix scheme would mix up: the same dataset in another namespace, and two runs whose
# experiment and dataset names join to the same run name (exp-d1-x).
RUNS = [("team-a", "exp", "d1"), ("team-a", "exp", "d2"), ("team-b", "exp", "d1"), ("team-a", "exp-d1", "x"),
        ("team-a", "exp", "d1-x")]


@pytest.fixture(params=["file", "s3"])
def base_uri(request, tmp_path):
    if request.param == "file":
        return f"file://{tmp_path / 'shared'}"
    request.getfixturevalue("s3_env")
    return f"s3://ttrv-test/isolation-{secrets.token_hex(4)}"


def test_runs_sharing_a_store_never_see_each_others_objects(base_uri):
    stores = [open_store(run_store_uri(base_uri, *run), retry_seconds=30) for run in RUNS]
    try:
        for index, store in enumerate(stores):
            store.put_json("progress.json", {"run": index})
            store.publish_weights(1, {"w": torch.full((4,), float(index))}, kind="full", base_model="m",
                                  dtype="float32")
            store.publish_set("checkpoints/step-000001", {"state.json": json.dumps({"run": index}).encode()})
        for index, store in enumerate(stores):
            assert store.get_json("progress.json") == {"run": index}
            assert store.weight_versions() == [1]
            assert torch.equal(store.load_weights(1)["w"], torch.full((4,), float(index)))
            assert store.list_sets("checkpoints") == ["step-000001"]
        # A run that cleans up its own prefix leaves the others whole.
        stores[0].delete_set("weights/v000001")
        stores[0].delete_set("checkpoints/step-000001")
        for store in stores[1:]:
            assert store.weight_versions() == [1] and store.list_sets("checkpoints") == ["step-000001"]
        # The only way out of a prefix is a key that climbs (every operation refuses it: test_store_keys.py).
        for key in ("../d2/progress.json", "../../team-b/exp/d1/progress.json", "/team-a/exp/d2/progress.json"):
            with pytest.raises(StoreConfigError, match="key"):
                stores[0].get_json(key)
            with pytest.raises(StoreConfigError, match="key"):
                stores[0].put_json(key, {"run": "intruder"})
        assert stores[1].get_json("progress.json") == {"run": 1}
    finally:
        for store in stores:
            store.close()


# --- credentials ---------------------------------------------------------------------------------------------------

def rendered_objects() -> dict[str, list[dict]]:
    """Every object `ttrv render` (the builders) and both charts make, by where it came from."""
    objects = {}
    for path in sorted((ROOT / "examples").glob("experiment-*.yaml")):
        metadata, spec = load_experiment(path)
        objects[f"ttrv render {path.name}"] = experiment_objects(metadata, spec)
    for path in sorted((ROOT / "examples").glob("values-*.yaml")):
        (experiment,) = helm_template("ttrv", "rel", "-f", str(path))
        spec = ExperimentSpec.model_validate(experiment["spec"])
        objects[f"chart ttrv {path.name}"] = [experiment, *experiment_objects(experiment["metadata"], spec)]
    objects["chart ttrv-operator"] = helm_template(
        "ttrv-operator", "ttrv-operator", "--set", "minio.enabled=true", "--set", "kueue.enabled=true",
        "--set", "metrics.serviceMonitor.enabled=true", namespace="ttrv-system")
    return objects


def test_every_rendered_object_takes_credentials_from_secrets_only():
    objects = rendered_objects()
    problems = [f"{source}: {problem}" for source, objs in objects.items() for obj in objs
                for problem in credential_problems(obj)]
    assert problems == []
    referenced = [item for objs in objects.values() for obj in objs for _, template in pod_templates(obj)
                  for container in template["spec"]["containers"] for item in container.get("env", [])
                  if "secretKeyRef" in item.get("valueFrom", {})]
    assert len(referenced) > 10, "the scan saw no credential at all"
    # Only the operator chart's bundled MinIO holds a Secret; an experiment never carries one.
    secrets_made = {source: [obj["metadata"]["name"] for obj in objs if obj["kind"] == "Secret"]
                    for source, objs in objects.items()}
    assert {source: names for source, names in secrets_made.items() if names} == {
        "chart ttrv-operator": ["ttrv-operator-minio"]}


def store_objects(server, uri: str) -> dict[str, bytes]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    client = s3_client(server)
    return {obj.object_name.removeprefix(f"{prefix}/"): client.get_object(bucket, obj.object_name).read()
            for obj in client.list_objects(bucket, prefix=prefix + "/", recursive=True)}


def test_a_real_adaptation_leaves_no_credential_anywhere(s3_env, tmp_path):
    """`ttrv run` on the bundled benchmark with its store on the S3 server (credentials in the environment, as a
    pod gets them from its Secret), then the operator's view of it: the status and events it would write."""
    experiment = ExperimentSpec.model_validate({
        "storage": {"uri": f"s3://ttrv-test/secrets-{secrets.token_hex(4)}", "checkpointEvery": 1},
        "datasets": [{"name": "shapes", "path": "ttrv://tiny-shapes/test", "subsetSize": 6}],
        "rollout": {"votes": 4, "groupSize": 2, "maxNewTokens": 3},
        "grpo": {"lr": 1e-3, "epochs": 1, "promptsPerStep": 3},
        "eval": {"limit": 4, "majVotes": 2, "maxNewTokens": 3},
        "resources": {"gpusPerNode": 0},
    })
    run = adaptation_run({"name": "secrets", "namespace": "team-a"}, experiment, "shapes")
    spec = run["spec"]["run"]
    assert spec["storage"]["uri"] == run_store_uri(experiment.storage.uri, "team-a", "secrets", "shapes")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
           **s3_env.env()}
    result = subprocess.run([sys.executable, "-m", "ttrv.cli", "run", str(tmp_path / "spec.yaml"), "--out",
                             str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    progress = read_progress(spec["storage"]["uri"])
    children = {child["kind"]: child for child in desired_children(run, False) if child["kind"] != "PyTorchJob"}
    plan = decide_run(Observed(run, NOW, children | {"PyTorchJob": job(run, succeeded())},
                               progress=parse_progress(progress)))
    assert plan.status["phase"] == "Succeeded" and plan.status["storeUri"] == spec["storage"]["uri"]

    outputs = {"stdout": result.stdout.encode(), "stderr": result.stderr.encode()}
    outputs |= {f"out/{path.name}": path.read_bytes() for path in (tmp_path / "out").iterdir() if path.is_file()}
    outputs |= {f"store/{key}": data for key, data in store_objects(s3_env, spec["storage"]["uri"]).items()}
    outputs |= {"status": json.dumps(plan.status).encode(), "events": repr(plan.events).encode(),
                "actions": repr(plan.actions).encode()}
    assert {"out/events.jsonl", "out/report.json", "out/run.yaml", "store/progress.json", "store/report.json"} \
        <= set(outputs)
    assert any(name.startswith("store/checkpoints/") for name in outputs)
    assert any(name.startswith("store/weights/") for name in outputs)
    for credential in (s3_env.access_key, s3_env.secret_key):
        assert [name for name, data in outputs.items() if credential.encode() in data] == []


def test_log_redaction_masks_credentials_wherever_they_sit(monkeypatch):
    secret = "S3CR3T-" + secrets.token_hex(8)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    stream = io.StringIO()
    saved = structlog.get_config()
    log.configure(stream=stream)
    try:
        logger = log.get_logger("test")
        logger.info("top", secret_key="plain", password="pw", note=f"url http://u:{secret}@host", step=3)
        logger.info("nested", detail={"endpoint": f"http://{secret}@h", "aws_access_key_id": "AKID",
                                      "items": [f"x{secret}x", 1]})
        logger.info("object", error=RuntimeError(f"refused {secret}"))
        try:
            raise ValueError(f"bad {secret}")
        except ValueError:
            logger.exception("failed")
    finally:
        structlog.configure(**saved)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    text = stream.getvalue()
    assert secret not in text and "plain" not in text and '"pw"' not in text and "AKID" not in text
    assert lines[0]["note"] == "url http://u:***@host" and lines[0]["step"] == 3
    assert lines[1]["detail"] == {"endpoint": "http://***@h", "aws_access_key_id": "***", "items": ["x***x", 1]}
    assert lines[2]["error"] == "RuntimeError('refused ***')"
    assert "bad ***" in lines[3]["exception"]


# --- the rollout service's network policy ----------------------------------------------------------------------

# (namespace, experiment, dataset): runs beside each other, two of them sharing a run name (a-b + c, a + b-c)
POLICY_RUNS = [("team-a", "exp", "d1"), ("team-a", "exp", "d2"), ("team-a", "other", "d1"), ("team-b", "exp", "d1"),
               ("team-a", "a-b", "c"), ("team-a", "a", "b-c")]


def test_rollout_admits_exactly_its_own_runs_trainers():
    pods, policies = [], []  # pods: (run identity, component, pod template)
    for namespace, name, dataset in POLICY_RUNS:
        spec = ExperimentSpec.model_validate({
            "storage": {"uri": "s3://b/p"}, "rollout": {"backend": "service"},
            "resources": {"nodes": 2}, "datasets": [{"name": dataset, "path": "x"}]})
        objects = run_children(adaptation_run({"name": name, "namespace": namespace}, spec, dataset))
        identity = (namespace, name, dataset)
        pods += [(identity, template["metadata"]["labels"]["app.kubernetes.io/component"], template)
                 for obj in objects for _, template in pod_templates(obj)]
        (policy,) = [obj for obj in objects if obj["kind"] == "NetworkPolicy"]
        policies.append((identity, policy))
    run_names = {(owner[0], template["metadata"]["labels"]["ttrv.io/run"]) for owner, _, template in pods}
    assert len(run_names) == len(POLICY_RUNS) - 1, "the list no longer holds two runs of one name in a namespace"
    for identity, policy in policies:
        (rule,) = policy["spec"]["ingress"]
        (peer,) = rule["from"]
        assert set(peer) == {"podSelector"}  # no namespaceSelector: the peers are pods of the policy's namespace
        # indices into `pods`, for the pods of the policy's namespace each selector matches
        local = [(index, template) for index, (owner, _, template) in enumerate(pods) if owner[0] == identity[0]]
        selected = {index for index, template in local
                    if is_pod_selected(policy["spec"]["podSelector"]["matchLabels"], template)}
        admitted = {index for index, template in local if is_pod_selected(peer["podSelector"]["matchLabels"], template)}
        own = {component: {index for index, (owner, kind, _) in enumerate(pods) if owner == identity and kind == component}
               for component in ("rollout", "trainer")}
        assert selected == own["rollout"] and len(selected) == 1, identity
        assert admitted == own["trainer"] and len(admitted) == 2, identity  # the master and the worker
