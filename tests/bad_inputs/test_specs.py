"""Bad run specs through `ttrv run` and bad Experiments through `ttrv render`, as a user types them (the CLI's
`main` in this process): exit 1, a message naming the file and the field and the fix, and nothing written (no
output folder, nothing rendered)."""

from __future__ import annotations

import pytest
import yaml

from bad_inputs.catalogue import CREDENTIAL, Case, cases, check, files_under

GOOD_RUN = {"name": "bad", "data": {"path": "ttrv://tiny-shapes/test"}}
DNS_FIX = "a DNS label: at most 63 lowercase letters"

RUN_SPECS = cases("run spec", [
    ("unknown-key", GOOD_RUN | {"bogus": 1}, ("bogus",), "unknown key; remove it or check its spelling"),
    ("unknown-nested-key", GOOD_RUN | {"rollout": {"tempurature": 1.0}}, ("rollout.tempurature",),
     "unknown key; remove it"),
    ("wrong-type-int", GOOD_RUN | {"rollout": {"votes": "many"}}, ("rollout.votes",),
     "should be a valid integer"),
    ("wrong-type-section", GOOD_RUN | {"grpo": "fast"}, ("grpo",), "should be a valid dictionary"),
    ("group-larger-than-votes", GOOD_RUN | {"rollout": {"votes": 4, "groupSize": 8}}, ("rollout", "groupSize (8)"),
     "set groupSize <= votes"),
    ("one-vote", GOOD_RUN | {"rollout": {"votes": 1, "groupSize": 1}}, ("rollout.votes",),
     "greater than or equal to 2"),
    ("negative-lr", GOOD_RUN | {"grpo": {"lr": -1e-6}}, ("grpo.lr",), "greater than 0"),
    ("nan-invalid-reward", GOOD_RUN | {"reward": {"invalidReward": float("nan")}}, ("reward.invalidReward",),
     "write a number (NaN and infinity are refused)"),
    ("infinite-entropy-weight", GOOD_RUN | {"reward": {"entropyWeight": float("inf")}}, ("reward.entropyWeight",),
     "not a finite number"),
    ("negative-infinite-kl", GOOD_RUN | {"grpo": {"klCoef": float("-inf")}}, ("grpo.klCoef",), "not a finite number"),
    ("zero-temperature", GOOD_RUN | {"rollout": {"temperature": 0}}, ("rollout.temperature",), "greater than 0"),
    ("empty-subset", GOOD_RUN | {"data": {"path": "x.json", "subsetSize": 0}}, ("data.subsetSize",),
     "greater than 0"),
    ("bad-enum-backend", GOOD_RUN | {"rollout": {"backend": "grpc"}}, ("rollout.backend",),
     "should be 'inprocess' or 'service'"),
    ("bad-enum-dtype", GOOD_RUN | {"model": {"dtype": "fp8"}}, ("model.dtype",), "'bfloat16'"),
    ("cpu-not-a-quantity", GOOD_RUN | {"resources": {"cpu": "lots"}}, ("resources.cpu",),
     "a Kubernetes quantity, e.g. '8', '500m'"),
    ("rollout-memory-negative", GOOD_RUN | {"resources": {"rolloutMemory": "-8Gi"}}, ("resources.rolloutMemory",),
     "a Kubernetes quantity"),
    ("bad-zero-stage", GOOD_RUN | {"resources": {"zeroStage": 4}}, ("resources.zeroStage",), "should be 0, 1, 2 or 3"),
    ("name-not-dns", GOOD_RUN | {"name": "My_Run"}, ("name",), DNS_FIX),
    ("name-too-long", GOOD_RUN | {"name": "r" * 64}, ("name",), DNS_FIX),
    ("path-map-without-equals", GOOD_RUN | {"data": {"path": "x.json", "pathMap": ["/authors/imgs"]}},
     ("data.pathMap",), "OLD=NEW"),
    ("data-missing", {"name": "bad"}, ("data",), "required field is missing; add it"),
    ("data-path-missing", {"data": {"subsetSize": 4}}, ("data.path",), "required field is missing; add it"),
    ("s3-without-bucket", GOOD_RUN | {"storage": {"uri": "s3://"}}, ("storage.uri",), "write s3://bucket/prefix"),
    ("unknown-scheme", GOOD_RUN | {"storage": {"uri": "gs://bucket/x"}}, ("storage.uri",),
     "use file:///abs/path, file://rel/path or s3://bucket/prefix"),
    ("parent-step-in-prefix", GOOD_RUN | {"storage": {"uri": "s3://bucket/team-a/../team-b"}}, ("storage.uri",),
     "without parent-directory steps"),
    ("parent-step-in-file-uri", GOOD_RUN | {"storage": {"uri": "file://runs/../../etc"}}, ("storage.uri",),
     "without parent-directory steps"),
    ("credential-in-uri", GOOD_RUN | {"storage": {"uri": f"s3://AKIDEXAMPLE:{CREDENTIAL}@bucket/x"}},
     ("storage.uri",), "remove them: the store reads them from AWS_ACCESS_KEY_ID"),
    ("credential-in-endpoint", GOOD_RUN | {"storage": {"uri": "s3://b/x", "endpoint": f"http://k:{CREDENTIAL}@h:9000"}},
     ("storage.endpoint",), "remove them"),
    # Endpoints and URIs are read as the store reads them: a port of 1-65535, host characters, no control character.
    ("endpoint-port-out-of-range", GOOD_RUN | {"storage": {"uri": "s3://b/x", "endpoint": "http://minio:99999"}},
     ("storage.endpoint", "port '99999'"), "is not a number from 1 to 65535"),
    ("endpoint-port-not-a-number", GOOD_RUN | {"storage": {"uri": "s3://b/x", "endpoint": "minio:nine"}},
     ("storage.endpoint", "port 'nine'"), "write http(s)://host[:port] or host:port"),
    ("endpoint-odd-character", GOOD_RUN | {"storage": {"uri": "s3://b/x", "endpoint": "http://min io:9000"}},
     ("storage.endpoint", "host 'min io'"), "write http(s)://host[:port] or host:port"),
    ("endpoint-with-newline", GOOD_RUN | {"storage": {"uri": "s3://b/x", "endpoint": "http://minio:9000\nx"}},
     ("storage.endpoint", "control character"), "write http(s)://host[:port] or host:port"),
    ("nul-in-store-uri", GOOD_RUN | {"storage": {"uri": "file:///tmp/store\x00x"}}, ("storage.uri", "'\\x00'"),
     "write the URI without it"),
    ("nul-in-model-path", GOOD_RUN | {"model": {"path": "/models/qwen\x00"}}, ("model.path", "'\\x00'"),
     "write the path without it"),
    ("nul-in-data-path", GOOD_RUN | {"data": {"path": "test\x00.json"}}, ("data.path", "'\\x00'"),
     "write the path without it"),
    ("credential-as-a-field", GOOD_RUN | {"storage": {"uri": "s3://b/x", "secretAccessKey": CREDENTIAL}},
     ("storage.secretAccessKey",), "unknown key; remove it"),
    # Counts that size what is held in memory have finite bounds (ttrv/spec/run.py says why for each).
    ("votes-exhaust-memory", GOOD_RUN | {"rollout": {"votes": 100_000_000, "groupSize": 2}}, ("rollout.votes",),
     "less than or equal to 1024"),
    ("max-tokens-exhaust-memory", GOOD_RUN | {"rollout": {"maxNewTokens": 10**9}}, ("rollout.maxNewTokens",),
     "less than or equal to 131072"),
    ("epochs-exhaust-memory", GOOD_RUN | {"grpo": {"epochs": 10**9}}, ("grpo.epochs",), "less than or equal to 1000"),
    ("repeats-exhaust-memory", GOOD_RUN | {"data": {"path": "x.json", "singleExample": True,
                                                    "singleExampleRepeats": 10**9}},
     ("data.singleExampleRepeats",), "less than or equal to 10000"),
    ("eval-votes-exhaust-memory", GOOD_RUN | {"eval": {"majVotes": 10**6}}, ("eval.majVotes",),
     "less than or equal to 1024"),
    ("seed-out-of-range", GOOD_RUN | {"seed": 2**64}, ("seed",), "less than or equal to 4294967295"),
    ("integer-of-thousands-of-digits", "name: bad\nseed: " + "9" * 5000 + "\ndata: {path: x}\n", (),
     "write a number of a sensible size"),
    ("not-a-mapping", "- name: bad\n- data: x\n", (), "expected a mapping of fields at the top level"),
    ("invalid-yaml", "name: bad\ndata: {path: x\n", ("line 3",), "not valid YAML; fix it where shown"),
    ("missing-file", None, (), "cannot read spec (No such file or directory); check the path"),
])


def write_input(path, value) -> None:
    if value is not None:
        path.write_text(value if isinstance(value, str) else yaml.safe_dump(value))


@pytest.mark.parametrize("case", RUN_SPECS)
def test_ttrv_run_rejects_the_spec_and_writes_nothing(case: Case, tmp_path, cli):
    spec, out = tmp_path / "spec.yaml", tmp_path / "out"
    write_input(spec, case.input)
    code, stdout, stderr = cli("run", str(spec), "--out", str(out))
    assert stderr.startswith(f"error: {spec}: "), stderr
    check(case, code, stderr, files_under(out) + ([stdout] if stdout else []))


def experiment(spec: dict | None = None, **top) -> dict:
    document = {
        "apiVersion": "ttrv.io/v1alpha1", "kind": "Experiment", "metadata": {"name": "exp", "namespace": "team-a"},
        "spec": {"storage": {"uri": "s3://bucket/runs"}, "datasets": [{"name": "d", "path": "x.json"}]},
    }
    return document | {"spec": document["spec"] | (spec or {})} | top


TWO = [{"name": "sketch", "path": "a.json"}, {"name": "sketch", "path": "b.json"}]
EXPERIMENTS = cases("experiment", [
    ("wrong-kind", (experiment(kind="Deployment"), []), ("kind",), "kind: Experiment"),
    ("name-not-dns", (experiment(metadata={"name": "My_Exp"}), []), ("metadata.name",), "must be a DNS label"),
    ("name-with-newline", (experiment(metadata={"name": "exp\n"}), []), ("metadata.name",), "must be a DNS label"),
    ("name-not-a-string", (experiment(metadata={"name": 123}), []), ("metadata.name", "123"), DNS_FIX),
    ("namespace-with-slash", (experiment(), ["-n", "team-a/exp"]), ("metadata.namespace", "'team-a/exp'"),
     "must be a DNS label"),
    ("namespace-parent-step", (experiment(), ["-n", ".."]), ("metadata.namespace",), "must be a DNS label"),
    ("duplicate-dataset-names", (experiment({"datasets": TWO}), []), ("datasets",), "rename sketch"),
    ("no-datasets", (experiment({"datasets": []}), []), ("spec: datasets",), "at least 1 item"),
    ("datasets-missing", (experiment() | {"spec": {"storage": {"uri": "s3://b"}}}, []), ("spec: datasets",),
     "required field is missing; add it"),
    ("dataset-name-not-dns", (experiment({"datasets": [{"name": "Sketch", "path": "x"}]}), []),
     ("datasets.0.name",), DNS_FIX),
    ("local-store-in-a-cluster", (experiment({"storage": {"uri": "file:///data/runs"}}), []), ("storage.uri",),
     "set storage.uri to s3://bucket/prefix"),
    ("group-larger-than-votes", (experiment({"rollout": {"votes": 4, "groupSize": 8}}), []), ("spec: rollout",),
     "set groupSize <= votes"),
    ("spec-not-a-mapping", (experiment() | {"spec": ["datasets"]}, []), ("spec",), "expected a mapping of fields"),
    ("credential-in-secret-ref", (experiment({"s3Secret": {"name": "s3", "secretAccessKey": CREDENTIAL}}), []),
     ("s3Secret.secretAccessKey",), "unknown key; remove it"),
    ("volume-relative-mount", (experiment({"volumes": [{"claimName": "data", "mountPath": "data"}]}), []),
     ("volumes.0.mountPath",), "must be an absolute path below / without '..', e.g. /data"),
    ("volume-over-tmp", (experiment({"volumes": [{"claimName": "data", "mountPath": "/tmp/data"}]}), []),
     ("volumes.0.mountPath",), "overlaps /tmp, which the pods use themselves; mount it elsewhere"),
    ("volume-over-root", (experiment({"volumes": [{"claimName": "data", "mountPath": "/"}]}), []),
     ("volumes.0.mountPath",), "must be an absolute path below /"),
    ("volume-parent-step", (experiment({"volumes": [{"claimName": "data", "mountPath": "/data/../etc/ttrv"}]}), []),
     ("volumes.0.mountPath",), "without '..'"),
    ("volume-nested-mounts", (experiment({"volumes": [{"claimName": "a", "mountPath": "/data"},
                                                      {"claimName": "b", "mountPath": "/data/images"}]}), []),
     ("volumes", "mountPath /data"), "give each volume its own folder"),
    ("volume-claim-not-dns", (experiment({"volumes": [{"claimName": "My_Data", "mountPath": "/data"}]}), []),
     ("volumes.0.claimName",), "a Kubernetes object name: lowercase letters"),
    # Names derived for each kind (ttrv.spec.names): a Service name is a DNS-1035 label, which starts with a letter.
    ("name-starts-with-a-digit", (experiment({"rollout": {"backend": "service"}},
                                             metadata={"name": "1exp", "namespace": "team-a"}), []),
     ("metadata.name", "'1exp'", "DNS-1035", "1exp-d-rollout"), "rename the experiment to start with a letter"),
    ("node-selector-key-not-a-label-key", (experiment({"scheduling": {"nodeSelector": {"gpu type": "a100"}}}), []),
     ("scheduling.nodeSelector", "'gpu type'"), "write a label key such as 'nvidia.com/gpu.product'"),
    ("node-selector-key-bad-prefix", (experiment({"scheduling": {"nodeSelector": {"Nvidia_com/gpu": "a100"}}}), []),
     ("scheduling.nodeSelector", "prefix 'Nvidia_com'"), "must be a DNS subdomain"),
    ("node-selector-value-not-a-label-value", (experiment({"scheduling": {"nodeSelector": {"pool": "a100 80gb"}}}),
                                               []),
     ("scheduling.nodeSelector.pool", "'a100 80gb'"), "is not a label value"),
    ("node-selector-value-too-long", (experiment({"scheduling": {"nodeSelector": {"pool": "a" * 64}}}), []),
     ("scheduling.nodeSelector.pool",), "at most 63 letters"),
    ("queue-name-not-a-label-value", (experiment({"scheduling": {"queueName": "team a/queue"}}), []),
     ("scheduling.queueName", "'team a/queue'"), "a Kubernetes object name"),
    ("queue-name-too-long-for-a-label", (experiment({"scheduling": {"queueName": "q" * 64}}), []),
     ("scheduling.queueName",), "is not a label value: at most 63"),
    ("priority-class-not-a-name", (experiment({"scheduling": {"priorityClassName": "High_Priority"}}), []),
     ("scheduling.priorityClassName",), "a Kubernetes object name"),
    ("toleration-key-not-a-label-key", (experiment({"scheduling": {"tolerations": [{"key": "no good"}]}}), []),
     ("scheduling.tolerations.0.key",), "write a label key"),
    ("volume-over-proc", (experiment({"volumes": [{"claimName": "data", "mountPath": "/proc"}]}), []),
     ("volumes.0.mountPath", "/proc", "the kernel's process interface"), "mount it elsewhere, e.g. /data"),
    ("volume-below-usr", (experiment({"volumes": [{"claimName": "data", "mountPath": "/usr/lib/data"}]}), []),
     ("volumes.0.mountPath", "overlaps /usr"), "mount it elsewhere, e.g. /data"),
    ("volume-over-etc", (experiment({"volumes": [{"claimName": "data", "mountPath": "/etc"}]}), []),
     ("volumes.0.mountPath", "overlaps /etc"), "mount it elsewhere"),
    ("volume-above-the-python-env", (experiment({"volumes": [{"claimName": "data", "mountPath": "/opt"}]}), []),
     ("volumes.0.mountPath", "overlaps /opt/ttrv"), "mount it elsewhere"),
    ("volume-dot-step", (experiment({"volumes": [{"claimName": "data", "mountPath": "/data/./x"}]}), []),
     ("volumes.0.mountPath",), "without '..', '.', '//' or NUL"),
    ("image-not-a-reference", (experiment({"image": {"trainer": "my image:latest"}}), []),
     ("image.trainer", "'my image:latest'"), "write e.g. ghcr.io/ttrv/ttrv-trainer:0.1.0"),
    ("image-uppercase-path", (experiment({"image": {"rollout": "Team/ttrv:1"}}), []),
     ("image.rollout",), "the repository path is lowercase"),
    ("image-bad-digest", (experiment({"image": {"trainer": "ghcr.io/ttrv/t@sha256:xyz"}}), []),
     ("image.trainer",), "is not a container image reference"),
])


@pytest.mark.parametrize("case", EXPERIMENTS)
def test_ttrv_render_rejects_the_experiment_and_renders_nothing(case: Case, tmp_path, cli):
    document, args = case.input
    path = tmp_path / "experiment.yaml"
    write_input(path, document)
    code, stdout, stderr = cli("render", str(path), *args)
    assert stderr.startswith(f"error: {path}: "), stderr
    check(case, code, stderr, [f"rendered {len(stdout)} characters"] if stdout else [])


LOCAL_EXPERIMENTS = cases("local experiment", [
    ("volumes-have-no-local-stand-in",
     experiment({"volumes": [{"claimName": "imagenet", "mountPath": "/data"}]}), ("volumes", "imagenet"),
     "drop volumes and point those paths at local files"),
    ("suspended", experiment({"suspend": True}), ("suspend",), "set suspend: false to run the experiment locally"),
    ("gpu-nodes-sharing-this-machine", experiment({"resources": {"nodes": 2, "gpusPerNode": 1}}),
     ("resources: nodes 2",), "set resources.nodes: 1 to run locally"),
])


@pytest.mark.parametrize("case", LOCAL_EXPERIMENTS)
def test_ttrv_experiment_run_local_rejects_what_this_machine_cannot_stand_in_for(case: Case, tmp_path, cli):
    path, out = tmp_path / "experiment.yaml", tmp_path / "out"
    write_input(path, case.input)
    code, stdout, stderr = cli("experiment", "run", str(path), "--local", "--out", str(out))
    assert stderr.startswith(f"error: {path}: "), stderr
    check(case, code, stderr, files_under(out) + ([stdout] if stdout else []))
