"""The CRDs' CEL rules (x-kubernetes-validations, ttrv/crds.py), enforced by the API stand-in (kube_cel.py): the API
server refuses what the operator would refuse, with the operator's own message.

- every model validator of the spec has a rule (or a stated reason), and a case here: they cannot drift apart;
- each rule refuses exactly what pydantic refuses, with pydantic's message, at its boundary;
- the transition rules on an Experiment's spec agree with the operator's own verdict on a spec change
  (operators/experiments.py resolve_spec), defaults included;
- a `helm upgrade` with a frozen change is refused by the API with the rule's message, where without the rules it
  is stored and the operator answers SpecChangeRejected.
"""

from __future__ import annotations

import copy

import kmock
import pytest
from k8s_util import helm_template
from kube_standin import KubeStandIn
from pydantic import ValidationError

from operators.experiments import ACCEPTED_ANNOTATION, MUTABLE_FIELDS, canonical_json, resolve_spec
from ttrv.crds import (
    CROSS_FIELD_RULES,
    MUTABLE_SPEC_FIELDS,
    NOT_IN_CEL,
    _models,
    crds,
    experiment_crd,
    model_validators,
)
from ttrv.manifests import adaptation_run
from ttrv.spec import AdaptationRunSpec, ExperimentSpec

pytestmark = [pytest.mark.timeout(120)]
EXPERIMENTS = "ttrv.io/v1alpha1/experiments"
RUNS = "ttrv.io/v1alpha1/adaptationruns"
NS = "team-a"
BASE = {"storage": {"uri": "s3://ttrv/x"}, "datasets": [{"name": "a", "path": "/data/a.json"}]}

SPREAD = {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule"}

# Model validator -> (spec edits that break it, one per rule, and edits at its boundary that pass). Edits are
# merged into BASE; "datasets[0]" edits the first dataset.
CASES: dict[str, tuple[list[dict], list[dict]]] = {
    "DataSpec._one_adaptation_source": (
        [{"datasets[0]": {"adaptPath": "/data/train.json", "singleExample": True}}],
        [{"datasets[0]": {"adaptPath": "", "singleExample": True}},
         {"datasets[0]": {"adaptPath": "/data/train.json", "singleExample": False}}],
    ),
    "RolloutSpec._group_within_votes": (
        [{"rollout": {"votes": 8}},  # groupSize's default, 16, is over it
         {"rollout": {"maxModelLen": 1024}}],  # maxNewTokens' default
        [{"rollout": {"votes": 16}}, {"rollout": {"votes": 4, "groupSize": 4}},
         {"rollout": {"maxModelLen": 1025}}, {"rollout": {"maxModelLen": 9, "maxNewTokens": 8}}],
    ),
    "GRPOSpec._mini_batch_within_step": (
        [{"grpo": {"miniBatchPrompts": 5}}],
        [{"grpo": {"miniBatchPrompts": 4}}, {"grpo": {"miniBatchPrompts": 8, "promptsPerStep": 8}}],
    ),
    "SchedulingSpec._spread_needs_pytorchjob": (
        [{"scheduling": {"topologySpreadConstraints": [SPREAD]}}],  # trainerApi's default, auto
        [{"scheduling": {"topologySpreadConstraints": [SPREAD], "trainerApi": "pytorchjob"}},
         {"scheduling": {"topologySpreadConstraints": [], "trainerApi": "trainjob"}}],
    ),
    "AdaptationSettings._shared_rollout_needs_lora": (
        [{"rollout": {"shared": True, "backend": "service"}},
         {"rollout": {"shared": True}, "model": {"path": "/models/m", "lora": {"rank": 4}}}],
        [{"rollout": {"shared": True, "backend": "service"}, "model": {"path": "/models/m", "lora": {"rank": 4}}},
         {"rollout": {"shared": False}}],
    ),
    "EnvVarSource._one_source": (
        [{"pod": {"env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"},
                                                              "fieldRef": {"fieldPath": "metadata.name"}}}]}}],
        [{"pod": {"env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}]}}],
    ),
    "EnvVar._value_or_source": (
        [{"pod": {"env": [{"name": "HF_TOKEN", "value": "x",
                           "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}]}},
         {"pod": {"env": [{"name": "TTRV_STORE", "value": "x"}]}}],
        [{"pod": {"env": [{"name": "NCCL_DEBUG", "value": "INFO"}]}},
         {"pod": {"env": [{"name": "MY_TTRV_FLAG", "value": ""}]}}],
    ),
    "ResourcesSpec._offload_needs_zero": (
        [{"resources": {"offloadOptimizer": True, "zeroStage": 0}}],
        [{"resources": {"offloadOptimizer": True}}, {"resources": {"offloadOptimizer": False, "zeroStage": 0}}],
    ),
}


def spec_with(edit: dict) -> dict:
    spec = copy.deepcopy(BASE)
    for key, value in edit.items():
        if key == "datasets[0]":
            spec["datasets"][0].update(value)
        else:
            spec[key] = value
    return spec


def experiment(spec: dict, name: str = "exp") -> dict:
    return {"apiVersion": "ttrv.io/v1alpha1", "kind": "Experiment", "metadata": {"name": name, "namespace": NS},
            "spec": spec}


def pydantic_message(spec: dict) -> str | None:
    try:
        ExperimentSpec.model_validate(spec)
    except ValidationError as error:
        (problem,) = error.errors()
        return problem["msg"].removeprefix("Value error, ")
    return None


async def standin() -> KubeStandIn:
    api = KubeStandIn()
    api.declare_cluster()
    return api


async def verdict(api: KubeStandIn, resource: str, body: dict) -> str | None:
    """None when the stand-in stores `body`, else its refusal."""
    try:
        await api.put_object(resource, body)
    except kmock.KubernetesError as error:
        return error.message
    await api.delete_object(resource, NS, body["metadata"]["name"])
    return None


def test_every_model_validator_has_a_rule_and_a_case():
    validators = {name for root in (ExperimentSpec, AdaptationRunSpec) for model in _models(root).values()
                  for name in model_validators(model)}
    assert validators == set(CROSS_FIELD_RULES) | set(NOT_IN_CEL), "ttrv.crds.CROSS_FIELD_RULES is out of date"
    assert set(CASES) == set(CROSS_FIELD_RULES), "each CEL rule needs a case here"
    for name, (bad, _) in CASES.items():
        assert len(bad) == len(CROSS_FIELD_RULES[name]), f"{name}: one breaking edit per rule"


def test_the_rules_sit_on_the_models_nodes_of_both_crds():
    experiment_spec = experiment_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert len(experiment_spec["properties"]["rollout"]["x-kubernetes-validations"]) == 2
    assert experiment_spec["properties"]["datasets"]["items"]["x-kubernetes-validations"]
    run = crds()["ttrv.io_adaptationruns.yaml"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    run_spec = run["properties"]["spec"]["properties"]["run"]
    for node in ("rollout", "grpo", "resources", "data"):
        assert run_spec["properties"][node]["x-kubernetes-validations"], node


def test_the_operators_mutable_fields_are_the_crds():
    assert tuple(MUTABLE_FIELDS) == MUTABLE_SPEC_FIELDS


@pytest.mark.asyncio
@pytest.mark.parametrize("validator", sorted(CASES))
async def test_a_rule_refuses_what_pydantic_refuses_with_its_message(validator):
    bad, good = CASES[validator]
    api = await standin()
    for edit in bad:
        spec = spec_with(edit)
        message = pydantic_message(spec)
        assert message is not None, f"pydantic accepts {edit}"
        refusal = await verdict(api, EXPERIMENTS, experiment(spec))
        assert refusal is not None, f"the API accepts {edit}"
        assert message in refusal, f"{refusal!r} does not carry pydantic's message {message!r}"
    for edit in good:
        spec = spec_with(edit)
        assert pydantic_message(spec) is None, f"pydantic refuses {edit}"
        assert await verdict(api, EXPERIMENTS, experiment(spec)) is None, f"the API refuses {edit}"


@pytest.mark.asyncio
async def test_an_adaptation_run_carries_the_same_rules():
    api = await standin()
    run = adaptation_run({"name": "exp", "namespace": NS, "uid": "1"}, ExperimentSpec.model_validate(BASE), "a")
    assert await verdict(api, RUNS, run) is None
    run["spec"]["run"]["rollout"]["votes"] = run["spec"]["run"]["rollout"]["groupSize"] - 1
    assert "> votes" in await verdict(api, RUNS, run)


# Spec edits after creation; the operator's verdict (resolve_spec) is the reference for each.
EDITS = [
    {"maxParallelRuns": 3},
    {"suspend": True},
    {"seed": 0},  # the default, written out
    {"seed": 1},
    {"grpo": {"lr": 5e-7}},  # the default
    {"grpo": {"lr": 1e-6}},
    {"grpo": {"earlyStop": {"window": 4}}},  # a nested default
    {"grpo": {"earlyStop": {"window": 5}}},
    {"resources": {"cpu": 8}},  # "8", the default, as YAML's integer
    {"resources": {"cpu": "9"}},
    {"model": {"lora": {}}},  # absent -> LoRA on with its defaults
    {"model": {"maxPixels": 1003520}},
    {"rollout": {"maxModelLen": 4096}},
    {"storage": {"uri": "s3://ttrv/x", "endpoint": "http://minio:9000"}},
    {"storage": {"uri": "s3://ttrv/elsewhere"}},
    {"datasets": [{"name": "a", "path": "/data/b.json"}]},
    {"datasets": [{"name": "a", "path": "/data/a.json"}, {"name": "b", "path": "/data/b.json"}]},
    {"scheduling": {"queueName": "team-a"}},
    {"scheduling": {"nodeSelector": {}}},
    {"image": {"trainer": "example.com/t:1"}},
    {"volumes": []},
    {"budget": {"maxSteps": 10}},
]


def operator_refuses(old: dict, new: dict) -> bool:
    accepted = ExperimentSpec.model_validate(old)
    body = experiment(new)
    body["metadata"]["annotations"] = {ACCEPTED_ANNOTATION: canonical_json(accepted)}
    _, _, rejection, invalid = resolve_spec(body)
    assert invalid is None
    return rejection is not None


@pytest.mark.asyncio
@pytest.mark.parametrize("edit", EDITS, ids=[str(e) for e in EDITS])
async def test_the_api_refuses_a_spec_change_exactly_when_the_operator_would(edit):
    api = await standin()
    old = copy.deepcopy(BASE)
    await api.put_object(EXPERIMENTS, experiment(old))
    new = old | edit
    try:
        await api.patch_object(EXPERIMENTS, NS, "exp", {"spec": edit})
        refusal = None
    except kmock.KubernetesError as error:
        refusal = error.message
    assert (refusal is not None) == operator_refuses(old, new), refusal
    if refusal is not None:
        field = next(iter(edit))
        assert f"{field} cannot change while the experiment exists" in refusal
        assert api.get(EXPERIMENTS, NS, "exp")["spec"] == old, "a refused change was stored"


@pytest.mark.asyncio
async def test_a_helm_upgrade_with_a_frozen_change_is_refused_with_the_rules_message():
    """`helm upgrade` of a release with a changed learning rate: helm sends the difference of the two renderings as
    a JSON merge patch (custom resources take no strategic merge patch). The API refuses it with the rule's
    message; an API server without the rules stores it, and the operator then reports SpecChangeRejected."""
    values = ("-f", "examples/values-tiny-shapes.yaml")
    (installed,) = helm_template("ttrv", "tiny", *values, "--show-only", "templates/experiment.yaml")
    (upgraded,) = helm_template("ttrv", "tiny", *values, "--set-json", "grpo.lr=0.001",
                                "--show-only", "templates/experiment.yaml")
    assert upgraded["spec"]["grpo"]["lr"] != installed["spec"]["grpo"]["lr"]
    patch = {"spec": {"grpo": {"lr": upgraded["spec"]["grpo"]["lr"]}}}
    api = await standin()
    await api.put_object(EXPERIMENTS, installed)
    name = installed["metadata"]["name"]
    with pytest.raises(kmock.KubernetesError) as refused:
        await api.patch_object(EXPERIMENTS, NS, name, patch)
    assert refused.value.status == 422
    assert f'Experiment.ttrv.io "{name}" is invalid: spec: Invalid value: "object": grpo cannot change while ' \
           "the experiment exists (only maxParallelRuns and suspend can)" in refused.value.message
    assert api.get(EXPERIMENTS, NS, name)["spec"] == installed["spec"]

    # Without the rules (what the stand-in did before them): stored, and only the operator can object.
    api.cel = False
    await api.patch_object(EXPERIMENTS, NS, name, patch)
    stored = api.get(EXPERIMENTS, NS, name)
    stored["metadata"]["annotations"] = {ACCEPTED_ANNOTATION: canonical_json(
        ExperimentSpec.model_validate(installed["spec"]))}
    assert "grpo.lr cannot change while the experiment exists" in resolve_spec(stored)[2]
