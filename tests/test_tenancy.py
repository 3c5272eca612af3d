"""Tenancy (issue 14, item 3): what one team can make the operator do, and what the operator chart grants.

- A spec's `storage.endpoint` is the tenant's: the real operator module, under kopf against the API stand-in,
  runs an experiment whose endpoint is a real listening socket of the test's, through to Succeeded, and the
  socket sees no connection at all (the operator reads progress from the run's status, operators/progress.py).
- The trainer's progress report (ttrv/status_report.py) is a merge patch of `status.trainerProgress` alone, with
  its run's own ServiceAccount, whose Role reaches that one object (ttrv/manifests/access.py).
- A namespaced install (`watchNamespaces`) renders Roles and RoleBindings in those namespaces and nothing
  cluster-wide; kopf serves exactly those namespaces, without its cluster-wide scanning.
- Two replicas peer through kopf's peering objects (rendered objects and RBAC here; kopf's own behaviour is cited
  in operators/ttrv_operator.py configure_peering).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import pytest
from k8s_util import helm_template, pod_templates, validate_object
from kopf_util import EXPERIMENTS, RUNS, cluster, operator
from operator_fixtures import NS

from operators.progress import STATUS_FIELD, parse_progress, progress_from_status
from ttrv.manifests import TRAINER_APIS, adaptation_run, experiment_objects
from ttrv.manifests.access import STATUS_TOKEN_DIR
from ttrv.spec import ExperimentSpec
from ttrv.status_report import StatusReporter

APIS = pytest.mark.parametrize("trainer_api", TRAINER_APIS)
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection", "bind", "escalate", "impersonate", "*"}


class Listener:
    """A real TCP listener standing for a tenant's server: it records every connection and what it was sent."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(1)
            try:
                self.received.append(conn.recv(65536))
            except OSError:
                self.received.append(b"")
            conn.close()

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


# --- the operator contacts nothing a spec names ---------------------------------------------------------------

@APIS
@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_operator_sends_nothing_to_an_endpoint_a_spec_names(monkeypatch, tmp_path, trainer_api):
    listener = Listener()
    # Credentials in the operator's environment, as an operator given a store Secret would have: still unused.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAOPERATOR")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "operator-secret")
    endpoint = f"http://127.0.0.1:{listener.port}"
    try:
        async with cluster(monkeypatch, tmp_path, trainer_api=trainer_api) as c, operator(c):
            await c.create_experiment(storage={"uri": "s3://ttrv/experiments", "endpoint": endpoint},
                                      datasets=[{"name": "mmmu", "path": "/data/mmmu.json"}])
            await c.wait(lambda: c.get(c.jobs, "exp-mmmu-trainer"), "the trainer job")
            await c.trainer_running("exp-mmmu-trainer")
            await c.report_progress("exp-mmmu", {"progressPercentage": 50.0, "step": 5, "totalSteps": 10,
                                                 "accuracy": 0.5})
            await c.wait(lambda: c.status(RUNS, "exp-mmmu").get("step") == 5, "the reported progress in status")
            await c.report_progress("exp-mmmu", {"progressPercentage": 100.0, "step": 10, "accuracy": 0.6})
            await c.trainer_succeeded("exp-mmmu-trainer")
            await c.wait_phase("exp", "Succeeded", EXPERIMENTS)
            assert c.status(RUNS, "exp-mmmu")["accuracy"] == 0.6  # the trainer's last report, read at the end
            assert c.get(RUNS, "exp-mmmu")["spec"]["run"]["storage"]["endpoint"] == endpoint
            await asyncio.sleep(1.0)  # a few more polls of the finished objects
    finally:
        listener.close()
    assert listener.received == []


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_namespaced_operator_serves_only_its_namespaces(monkeypatch, tmp_path):
    """`kopf run --namespace=team-a` as the chart runs it with watchNamespaces: the operator runs team-a's
    experiment and never touches team-b's, with kopf's cluster-wide scanning off (configure)."""
    monkeypatch.setenv("TTRV_WATCH_NAMESPACES", NS)
    async with cluster(monkeypatch, tmp_path) as c:
        other = {"apiVersion": "ttrv.io/v1alpha1", "kind": "Experiment",
                 "metadata": {"name": "exp", "namespace": "team-b"},
                 "spec": {"storage": {"uri": "s3://ttrv/experiments"},
                          "datasets": [{"name": "mmmu", "path": "/data/mmmu.json"}]}}
        await c.api.put_object(EXPERIMENTS, other)
        async with operator(c, namespaces=(NS,)):
            await c.create_experiment(datasets=[{"name": "mmmu", "path": "/data/mmmu.json"}])
            await c.wait(lambda: c.get(c.jobs, "exp-mmmu-trainer"), "the trainer job in team-a")
            await c.trainer_running("exp-mmmu-trainer")
            await c.trainer_succeeded("exp-mmmu-trainer")
            await c.wait_phase("exp", "Succeeded", EXPERIMENTS)
            untouched = c.api.get(EXPERIMENTS, "team-b", "exp")
            assert "status" not in untouched and not untouched["metadata"].get("finalizers")
            assert c.api.items(RUNS, "team-b") == []


@pytest.mark.asyncio
@pytest.mark.timeout(90)
async def test_two_peering_operators_one_acts(monkeypatch, tmp_path):
    """Two replicas of the real operator module under kopf with `--peering` (kopf's own peering, against the
    stand-in serving the chart's kopf.dev CRDs and a ClusterKopfPeering): each draws its priority at start
    (configure_peering), both keep alive in the peering object, and only one of them reconciles anything."""
    import yaml
    from k8s_util import ROOT

    import operators.ttrv_operator as module

    handled: list[int] = []
    real = module._handle
    monkeypatch.setattr(module, "_handle", lambda reconcile, memo, namespace, name: (
        handled.append(id(memo.context)), real(reconcile, memo, namespace, name))[-1])
    async with cluster(monkeypatch, tmp_path) as c:
        for crd in yaml.safe_load_all((ROOT / "charts/ttrv-operator/crds/kopf.dev_peerings.yaml").read_text()):
            c.api.declare_crd(crd)
        await c.api.put_object("kopf.dev/v1/clusterkopfpeerings", {
            "apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "ttrv"}})
        async with operator(c, peering="ttrv") as first, operator(c, peering="ttrv") as second:
            contexts = {id(first.context), id(second.context)}
            assert len(contexts) == 2
            peers = await c.wait(lambda: (status := (c.api.get("kopf.dev/v1/clusterkopfpeerings", None, "ttrv")
                                                     or {}).get("status") or {}) and len(status) == 2 and status,
                                 "both replicas' keep-alives in the peering object")
            priorities = [peer["priority"] for peer in peers.values()]
            assert len(set(priorities)) == 2 and all(p > 0 for p in priorities)
            await asyncio.sleep(1.0)  # the lower one sees the higher one and pauses
            handled.clear()
            await c.create_experiment(datasets=[{"name": "mmmu", "path": "/data/mmmu.json"}])
            await c.wait(lambda: c.get(c.jobs, "exp-mmmu-trainer"), "the trainer job")
            await c.trainer_running("exp-mmmu-trainer")
            await c.trainer_succeeded("exp-mmmu-trainer")
            await c.wait_phase("exp", "Succeeded", EXPERIMENTS)
            assert len(set(handled)) == 1 and set(handled) <= contexts, "both replicas reconciled"


# --- the trainer's identity ------------------------------------------------------------------------------------

def _objects(trainer_api: str, **spec) -> dict[str, dict]:
    document = {"storage": {"uri": "s3://b"}, "datasets": [{"name": "d", "path": "x"}]} | spec
    objects = experiment_objects({"name": "e", "namespace": "team-a"}, ExperimentSpec.model_validate(document),
                                 trainer_api)
    return {obj["kind"]: obj for obj in objects}


@APIS
def test_trainer_may_patch_only_its_own_runs_status(trainer_api):
    objects = _objects(trainer_api, rollout={"backend": "service"})
    run = objects["AdaptationRun"]["metadata"]["name"]
    account, role, binding = objects["ServiceAccount"], objects["Role"], objects["RoleBinding"]
    for obj in (account, role, binding):
        validate_object(obj)
        assert obj["metadata"]["namespace"] == "team-a"
        assert obj["metadata"]["labels"]["ttrv.io/run"] == run  # and owned by the run once it has a uid
    assert role["rules"] == [{"apiGroups": ["ttrv.io"], "resources": ["adaptationruns/status"],
                              "resourceNames": [run], "verbs": ["patch"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": "team-a"}]
    assert account["automountServiceAccountToken"] is False

    trainer = objects["TrainJob" if trainer_api == "trainjob" else "PyTorchJob"]
    if trainer_api == "trainjob":
        patch = trainer["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
        pods = [patch["template"]["spec"]["template"]["spec"]]
        env = trainer["spec"]["trainer"]["env"]
    else:
        pods = [template["spec"] for _, template in pod_templates(trainer)]
        env = pods[0]["containers"][0]["env"]
    for pod in pods:
        assert pod["serviceAccountName"] == account["metadata"]["name"]
        (volume,) = [v for v in pod["volumes"] if "projected" in v]
        assert volume["projected"]["sources"][0]["serviceAccountToken"]["expirationSeconds"] <= 3600
        (container,) = pod["containers"]
        assert {"name": volume["name"], "mountPath": STATUS_TOKEN_DIR, "readOnly": True} in container["volumeMounts"]
    assert {"name": "TTRV_RUN_NAME", "value": run} in env
    # The rollout service calls no API: no account of its own, no token. (With a TrainJob it is the run's
    # runtime's `rollout` job, ttrv/manifests/trainjob.py run_training_runtime.)
    (_, rollout), = [(where, template) for where, template in
                     pod_templates(objects["TrainingRuntime" if trainer_api == "trainjob" else "Deployment"])
                     if template["metadata"]["labels"]["app.kubernetes.io/component"] == "rollout"]
    assert "serviceAccountName" not in rollout["spec"] and rollout["spec"]["automountServiceAccountToken"] is False
    assert not any("projected" in v for v in rollout["spec"]["volumes"])


@APIS
def test_a_teams_own_service_account_gets_the_status_right_instead(trainer_api):
    """pod.serviceAccountName (workload identity, image pulls) runs the trainer as the team's account: ttrv binds its
    run-status Role to that account and creates no account of its own."""
    objects = _objects(trainer_api, pod={"serviceAccountName": "vision-runs"})
    assert "ServiceAccount" not in objects
    assert objects["RoleBinding"]["subjects"] == [{"kind": "ServiceAccount", "name": "vision-runs",
                                                   "namespace": "team-a"}]
    trainer = objects["TrainJob" if trainer_api == "trainjob" else "PyTorchJob"]
    if trainer_api == "trainjob":
        patch = trainer["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
        pods = [patch["template"]["spec"]["template"]["spec"]]
    else:
        pods = [template["spec"] for _, template in pod_templates(trainer)]
    assert {pod["serviceAccountName"] for pod in pods} == {"vision-runs"}


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_status_reporter_patches_only_the_trainer_progress(monkeypatch, tmp_path):
    """The reporter's real HTTP request, against the API stand-in: the run's other status fields stay as the
    operator wrote them, and the operator reads back what the trainer sent (its metrics left out)."""
    (tmp_path / "token").write_text("trainer-token\n")
    async with cluster(monkeypatch, tmp_path) as c:
        experiment = await c.create_experiment()
        await c.api.put_object(RUNS, adaptation_run(experiment["metadata"],
                                                    ExperimentSpec.model_validate(experiment["spec"]), "mmmu"))
        await c.api.patch_object(RUNS, NS, "exp-mmmu", {"status": {"phase": "Running", "step": 3}},
                                 subresource="status")
        server = c.api_url
        reporter = StatusReporter(server, NS, "exp-mmmu", tmp_path / "token")
        document = {"stage": "adapting", "step": 4, "progressPercentage": 40.0, "metrics": {"loss": 1.0}}
        assert await asyncio.to_thread(reporter.report, document)
        run = c.get(RUNS, "exp-mmmu")
        assert (run["status"]["phase"], run["status"]["step"]) == ("Running", 3)
        assert json.loads(run["status"][STATUS_FIELD]) == {"stage": "adapting", "step": 4, "progressPercentage": 40.0}
        progress = parse_progress(progress_from_status(run))
        assert (progress.step, progress.percentage, progress.problems) == (4, 40.0, ())
        # A run the stand-in does not have: the report fails, logged, and training goes on.
        assert not await asyncio.to_thread(StatusReporter(server, NS, "other", tmp_path / "token").report, document)


def test_status_reporter_is_off_outside_a_cluster_pod(tmp_path):
    (tmp_path / "token").write_text("t")
    pod = {"TTRV_STATUS_DIR": str(tmp_path), "KUBERNETES_SERVICE_HOST": "10.0.0.1", "TTRV_RUN_NAMESPACE": "team-a",
           "TTRV_RUN_NAME": "r"}
    reporter = StatusReporter.from_environment(pod)
    assert reporter.url == "https://10.0.0.1:443/apis/ttrv.io/v1alpha1/namespaces/team-a/adaptationruns/r/status"
    for missing in pod:  # a laptop, `ttrv experiment run --local`: no service host, no token
        assert StatusReporter.from_environment({k: v for k, v in pod.items() if k != missing}) is None
    assert StatusReporter.from_environment(pod | {"TTRV_STATUS_DIR": str(tmp_path / "none")}) is None


def test_a_report_that_is_not_a_json_object_breaks_the_contract_by_name():
    run = {"status": {STATUS_FIELD: "not json"}}
    assert parse_progress(progress_from_status(run)).problems == ("progress.json is a str, not an object",)
    assert progress_from_status({"status": {}}) is None


# --- the operator chart: a namespaced install, peering ---------------------------------------------------------

NAMESPACED = ("--set", "watchNamespaces={team-a,team-b}")


def _rules(role: dict) -> dict[tuple[str, str], set[str]]:
    grants: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                grants.setdefault((group, resource), set()).update(rule["verbs"])
    return grants


@pytest.mark.parametrize("extra", [(), ("--set", "kueue.enabled=true", "--set", "replicas=2")])
def test_namespaced_install_grants_nothing_cluster_wide(extra):
    objects = helm_template("ttrv-operator", "ops", *NAMESPACED, *extra, "--set", "trainer.runtime.create=true",
                            namespace="ttrv-system")
    kinds = {obj["kind"] for obj in objects}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "ClusterTrainingRuntime", "ClusterKopfPeering"}
    cluster_wide = [obj for obj in objects if obj["kind"] == "ClusterRole"
                    and any(set(rule["verbs"]) & WRITE_VERBS for rule in obj["rules"])]
    assert cluster_wide == []
    roles = {obj["metadata"]["namespace"]: obj for obj in objects if obj["kind"] == "Role"}
    bindings = {obj["metadata"]["namespace"]: obj for obj in objects if obj["kind"] == "RoleBinding"}
    assert sorted(roles) == sorted(bindings) == ["team-a", "team-b"]
    for binding in bindings.values():
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "ops"}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ops", "namespace": "ttrv-system"}]
    # The same rights as the cluster-wide install, in each namespace, less kopf's CRD watch (scanning is off).
    clusterwide = helm_template("ttrv-operator", "ops", *extra, namespace="ttrv-system")
    (cluster_role,) = [obj for obj in clusterwide if obj["kind"] == "ClusterRole"]
    expected = _rules(cluster_role)
    expected.pop(("apiextensions.k8s.io", "customresourcedefinitions"))
    if ("kopf.dev", "clusterkopfpeerings") in expected:
        expected[("kopf.dev", "kopfpeerings")] = expected.pop(("kopf.dev", "clusterkopfpeerings"))
    assert all(_rules(role) == expected for role in roles.values())

    (deployment,) = [obj for obj in objects if obj["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "--all-namespaces" not in container["command"]
    assert [arg for arg in container["command"] if arg.startswith("--namespace")] == \
        ["--namespace=team-a", "--namespace=team-b"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["TTRV_WATCH_NAMESPACES"] == "team-a,team-b"
    assert env["TTRV_TRAINING_RUNTIME_KIND"] == "TrainingRuntime"
    runtimes = [(obj["kind"], obj["metadata"]["namespace"]) for obj in objects if "TrainingRuntime" in obj["kind"]]
    assert runtimes == [("TrainingRuntime", "team-a"), ("TrainingRuntime", "team-b")]


@pytest.mark.parametrize("namespaced", [False, True])
def test_two_replicas_peer(namespaced):
    args = ("--set", "replicas=2", *(NAMESPACED if namespaced else ()))
    objects = helm_template("ttrv-operator", "ops", *args, namespace="ttrv-system")
    (deployment,) = [obj for obj in objects if obj["kind"] == "Deployment"]
    assert deployment["spec"]["replicas"] == 2
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--peering=ops" in command and "--standalone" not in command
    peerings = [(obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]) for obj in objects
                if obj["apiVersion"] == "kopf.dev/v1"]
    if namespaced:
        assert peerings == [("KopfPeering", "team-a", "ops"), ("KopfPeering", "team-b", "ops")]
        grants = [_rules(obj) for obj in objects if obj["kind"] == "Role"]
        assert all(g[("kopf.dev", "kopfpeerings")] == {"get", "list", "watch", "patch"} for g in grants)
    else:
        assert peerings == [("ClusterKopfPeering", None, "ops")]
        (role,) = [obj for obj in objects if obj["kind"] == "ClusterRole"]
        assert _rules(role)[("kopf.dev", "clusterkopfpeerings")] == {"get", "list", "watch", "patch"}
    # One replica: standalone, no peering objects, no peering rights.
    single = helm_template("ttrv-operator", "ops", *(NAMESPACED if namespaced else ()), namespace="ttrv-system")
    assert not [obj for obj in single if obj["apiVersion"] == "kopf.dev/v1"]
    assert "--standalone" in next(obj for obj in single if obj["kind"] == "Deployment")[
        "spec"]["template"]["spec"]["containers"][0]["command"]


# --- the bundled MinIO: a user and a policy per team -----------------------------------------------------------

def _allowed(policy: dict, action: str, resource: str, prefix: str | None = None) -> bool:
    """AWS's evaluation for Allow-only policies as MinIO applies it: an action is allowed when a statement names
    it and a resource pattern matching the ARN (`*` spans `/`), and its StringLike s3:prefix condition, if any,
    matches the request's prefix (absent: no match). Enough for these policies, which use nothing else."""
    from fnmatch import fnmatchcase

    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow" and set(statement) <= {"Sid", "Effect", "Action", "Resource",
                                                                    "Condition"}
        if action not in statement["Action"] or not any(fnmatchcase(resource, r) for r in statement["Resource"]):
            continue
        condition = statement.get("Condition")
        if condition is None:
            return True
        assert list(condition) == ["StringLike"] and list(condition["StringLike"]) == ["s3:prefix"]
        if prefix is not None and any(fnmatchcase(prefix, p) for p in condition["StringLike"]["s3:prefix"]):
            return True
    return False


def test_minio_teams_get_policies_scoped_to_their_prefix():
    objects = helm_template("ttrv-operator", "rel", "--set", "minio.enabled=true",
                            "--set", "minio.teams={team-a,team-b}", namespace="ttrv-system")
    (teams,) = [obj for obj in objects if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] == "rel-minio-teams"]
    policies = {key.removesuffix(".json"): json.loads(value) for key, value in teams["data"].items()
                if key.endswith(".json")}
    assert sorted(policies) == ["team-a", "team-b"]
    a = policies["team-a"]
    run = "experiments/team-a/exp/mmmu"  # <storage.uri s3://ttrv/experiments>/<namespace>/<experiment>/<dataset>
    for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
        assert _allowed(a, action, f"arn:aws:s3:::ttrv/{run}/progress.json")
        assert not _allowed(a, action, "arn:aws:s3:::ttrv/experiments/team-b/exp/mmmu/progress.json")
        assert not _allowed(a, action, "arn:aws:s3:::ttrv/experiments/team-ab/x")  # a name's prefix is not it
        assert not _allowed(a, action, "arn:aws:s3:::ttrv/experiments/team-b/team-a/x")  # team-b's "team-a"
        assert not _allowed(a, action, "arn:aws:s3:::ttrv/team-a/x")
        assert not _allowed(a, action, "arn:aws:s3:::other/experiments/team-a/x")
    assert _allowed(a, "s3:ListBucket", "arn:aws:s3:::ttrv", prefix=run)  # the store's probe (s3_backend.py)
    assert _allowed(a, "s3:ListBucket", "arn:aws:s3:::ttrv", prefix=f"{run}/")
    assert not _allowed(a, "s3:ListBucket", "arn:aws:s3:::ttrv", prefix="experiments/team-b/")
    assert not _allowed(a, "s3:ListBucket", "arn:aws:s3:::ttrv", prefix="experiments/")
    assert not _allowed(a, "s3:ListBucket", "arn:aws:s3:::ttrv")  # no listing of the whole bucket
    assert not _allowed(a, "s3:CreateBucket", "arn:aws:s3:::ttrv") and not _allowed(a, "s3:ListAllMyBuckets", "*")

    # Credentials: one Secret per team (never the root's), referenced by the Job that provisions them.
    secrets = {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == "Secret"}
    assert set(secrets) == {"rel-minio", "rel-minio-team-a", "rel-minio-team-b"}
    assert secrets["rel-minio-team-a"]["data"] != secrets["rel-minio-team-b"]["data"]
    (job,) = [obj for obj in objects if obj["kind"] == "Job"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    refs = {item["name"]: item["valueFrom"]["secretKeyRef"]["name"] for item in container["env"] if "valueFrom" in item}
    assert refs["TEAM_0_KEY"] == refs["TEAM_0_SECRET"] == "rel-minio-team-a"
    script = teams["data"]["provision.sh"]
    for team in ("team-a", "team-b"):
        assert f"mc admin policy create ttrv ttrv-{team} /teams/{team}.json" in script
        assert f"mc admin policy attach ttrv ttrv-{team}" in script
    # With no prefix, the team's prefix is at the bucket's root.
    bare = helm_template("ttrv-operator", "rel", "--set", "minio.enabled=true", "--set", "minio.teams={team-a}",
                         "--set", "minio.prefix=", namespace="ttrv-system")
    (teams,) = [obj for obj in bare if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] == "rel-minio-teams"]
    bare_policy = json.loads(teams["data"]["team-a.json"])
    assert _allowed(bare_policy, "s3:GetObject", "arn:aws:s3:::ttrv/team-a/exp/mmmu/x")
    assert not _allowed(bare_policy, "s3:GetObject", "arn:aws:s3:::ttrv/team-b/exp/mmmu/x")
    # Optionally the team's own copy, in its namespace, under the name its experiments reference.
    copies = helm_template("ttrv-operator", "rel", "--set", "minio.enabled=true", "--set", "minio.teams={team-a}",
                           "--set", "minio.teamSecretName=ttrv-s3", namespace="ttrv-system")
    (own, copy_) = [obj for obj in copies if obj["kind"] == "Secret" and "ttrv.io/team" in obj["metadata"]["labels"]]
    assert (copy_["metadata"]["name"], copy_["metadata"]["namespace"]) == ("ttrv-s3", "team-a")
    assert own["data"] == copy_["data"]


def test_a_team_that_is_no_namespace_name_fails_naming_the_value():
    from k8s_util import helm

    result = helm("template", "rel", "charts/ttrv-operator", "--set", "minio.enabled=true",
                  "--set", "minio.teams={Team_A}", check=False)
    # The chart's values.schema.json refuses it first, naming the value (minio.teams.0).
    assert result.returncode != 0 and "minio.teams" in result.stderr and "rel-minio" not in result.stdout
