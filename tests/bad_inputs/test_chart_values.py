"""Bad values of the ttrv chart, rendered by the real `helm template`: helm exits non-zero, names the value and
what it must be, and renders nothing. Types, ranges and unknown keys come from values.schema.json (generated from
ttrv.spec); cross-field checks from the chart's `ttrv.validate` template."""

from __future__ import annotations

import pytest
from k8s_util import helm

from bad_inputs.catalogue import CREDENTIAL, Case, cases, check

GOOD = ("-f", "examples/values-one-gpu.yaml")

VALUES = cases("chart values", [
    ("datasets-missing", ("--set", "storage.uri=s3://b"), ("(root): datasets",), "is required"),
    ("no-datasets", GOOD + ("--set-json", "datasets=[]"), ("datasets",), "Array must have at least 1 items"),
    ("wrong-type", GOOD + ("--set", "rollout.votes=many"), ("rollout.votes",), "Expected: integer, given: string"),
    ("unknown-key", GOOD + ("--set", "rollout.vote=3"), ("rollout", "vote"), "Additional property vote is not allowed"),
    ("bad-enum", GOOD + ("--set", "rollout.backend=grpc"), ("rollout.backend",),
     'must be one of the following: "inprocess", "service"'),
    ("dataset-name-not-dns", GOOD + ("--set", "datasets[0].name=Shapes"), ("datasets.0.name",),
     "Does not match pattern"),
    ("cpu-not-a-quantity", GOOD + ("--set", "resources.cpu=lots"), ("resources.cpu",), "Does not match pattern"),
    ("lr-out-of-range", GOOD + ("--set", "grpo.lr=2"), ("grpo.lr",), "Must be less than 1"),
    ("credential-in-values", GOOD + ("--set", f"s3Secret.secretAccessKey={CREDENTIAL}"), ("s3Secret",),
     "Additional property secretAccessKey is not allowed"),
    ("credential-in-uri", GOOD + ("--set", f"storage.uri=s3://key:{CREDENTIAL}@bucket/x"), ("storage.uri",),
     "remove them: the pods read them from the Secret"),
    ("group-larger-than-votes", GOOD + ("--set", "rollout.groupSize=17"),
     ("rollout.groupSize (17) > rollout.votes (16)",), "set groupSize <= votes"),
    ("local-store-in-a-cluster", GOOD + ("--set", "storage.uri=file:///data/runs"), ('storage.uri: "file:///data/runs"',),
     "set storage.uri to s3://bucket/prefix"),
    ("unknown-scheme", GOOD + ("--set", "storage.uri=gs://bucket/runs"), ("storage.uri",),
     "set storage.uri to s3://bucket/prefix"),
    ("s3-without-bucket", GOOD + ("--set", "storage.uri=s3:///runs"), ("storage.uri",), "write s3://bucket/prefix"),
    ("parent-step-in-prefix", GOOD + ("--set", "storage.uri=s3://ttrv/team-a/../team-b"), ("storage.uri",),
     "without parent-directory steps"),
    ("duplicate-dataset-names", GOOD + ("--set", "datasets[1].name=shapes", "--set", "datasets[1].path=x"),
     ('datasets: the name "shapes" appears twice',), "dataset names must be unique"),
    ("path-map-without-equals", GOOD + ("--set", "datasets[0].pathMap[0]=/authors/imgs"), ("datasets.0.pathMap",),
     "is not OLD=NEW"),
    ("release-name-not-dns", GOOD + ("--set", "nameOverride=One_GPU"), ("nameOverride",), "Does not match pattern"),
])


@pytest.mark.parametrize("case", VALUES)
def test_helm_rejects_the_values_and_renders_nothing(case: Case):
    result = helm("template", "rel", "charts/ttrv", *case.input, check=False)
    check(case, result.returncode, result.stderr, [f"rendered {len(result.stdout)} characters"] if result.stdout else [])
