"""The run and experiment specs: defaults are the reference's, bad values name their field and the fix."""

import pytest
import yaml

from ttrv.spec import ExperimentSpec, RunSpec, SpecError, load_experiment, load_run_spec, parse_spec

# Pure logic, no process or server: `make test-fast` runs these.
pytestmark = pytest.mark.pure


def run(**overrides):
    return parse_spec({"data": {"path": "test.json"}} | overrides, RunSpec, "spec.yaml")


def test_defaults_are_the_reference_settings():
    spec = run()
    assert (spec.rollout.votes, spec.rollout.group_size, spec.rollout.temperature) == (32, 16, 1.0)
    assert spec.rollout.max_new_tokens == 1024
    assert spec.reward.entropy_weight == 0.75
    g = spec.grpo
    assert (g.lr, g.schedule, g.warmup_ratio, g.weight_decay, g.grad_clip) == (5e-7, "cosine", 0.03, 0.01, 1.0)
    assert (g.kl_coef, g.kl_kind, g.clip_low, g.clip_high, g.dual_clip) == (0.001, "low_var_kl", 0.2, 0.2, 3.0)
    assert (g.epochs, g.ppo_epochs) == (2, 1)
    assert spec.data.subset_size == 20
    assert spec.model.lora is None and spec.model.trainable == "language"


def test_gradient_checkpointing_is_on_by_default():
    """A 7B policy's activations do not fit beside its states without it (issue 15); off is a choice."""
    assert run().resources.gradient_checkpointing is True
    assert run(resources={"gradientCheckpointing": False}).resources.gradient_checkpointing is False


def test_camel_case_and_snake_case_keys_are_both_read():
    assert run(rollout={"groupSize": 8}).rollout.group_size == 8
    assert run(rollout={"group_size": 8}).rollout.group_size == 8


@pytest.mark.parametrize(("given", "read"), [(8, "8"), ("8", "8"), ("500m", "500m"), ("64Gi", "64Gi"), (0, "0"),
                                             (".5", ".5"), ("1.5", "1.5")])
def test_cpu_and_memory_are_quantities_written_as_in_a_pod(given, read):
    """`cpu: 8` is a number in YAML and in `helm --set`; a pod's resources take it as they take "8"."""
    resources = run(resources={"cpu": given, "memory": given, "rolloutCpu": given}).resources
    assert (resources.cpu, resources.memory, resources.rollout_cpu) == (read, read, read)


@pytest.mark.parametrize("given", ["lots", "-1", -1, 1.5, True, "8 Gi", "1e3", ""])
def test_cpu_that_is_no_quantity_is_refused(given):
    with pytest.raises(SpecError, match="resources.cpu"):
        run(resources={"cpu": given})


def test_dump_uses_camel_case():
    dumped = run().model_dump(mode="json")
    assert "groupSize" in dumped["rollout"] and "klCoef" in dumped["grpo"]


@pytest.mark.parametrize(
    ("overrides", "field", "hint"),
    [
        ({"rollout": {"votes": 8, "groupSize": 16}}, "rollout", "set groupSize <= votes"),
        ({"rollout": {"votes": 1}}, "rollout.votes", "greater than or equal to 2"),
        ({"grpo": {"lr": -1e-6}}, "grpo.lr", "greater than 0"),
        ({"grpo": {"dualClip": 1.0}}, "grpo.dualClip", "greater than 1"),
        ({"grpo": {"klKind": "k9"}}, "grpo.klKind", "low_var_kl"),
        ({"rollout": {"tempurature": 1.0}}, "rollout.tempurature", "unknown key"),
        ({"bogus": 1}, "bogus", "unknown key"),
        ({"storage": {"uri": "s3://"}}, "storage.uri", "names no bucket"),
        ({"storage": {"uri": "gs://bucket/x"}}, "storage.uri", "no known scheme"),
        ({"storage": {"uri": "s3://bucket/../other"}}, "storage.uri", "'..'"),
        ({"data": {"path": "x", "pathMap": ["/old"]}}, "data.pathMap", "OLD=NEW"),
        ({"data": {}}, "data.path", "required field is missing"),
        ({"name": "Not_A_DNS_Label"}, "name", "should match pattern"),
        ({"reward": {"choices": "A"}}, "reward.choices", "should match pattern"),
        ({"resources": {"zeroStage": 0, "offloadOptimizer": True}}, "resources", "needs zeroStage 1, 2 or 3"),
    ],
)
def test_bad_values_name_the_field(overrides, field, hint):
    with pytest.raises(SpecError) as error:
        run(**overrides)
    message = str(error.value)
    assert f"spec.yaml: {field}:" in message
    assert hint in message


def test_every_problem_is_reported_at_once():
    with pytest.raises(SpecError) as error:
        run(grpo={"lr": -1, "epochs": 0}, bogus=True)
    assert len(str(error.value).splitlines()) == 3


def test_not_a_mapping():
    with pytest.raises(SpecError, match="expected a mapping"):
        parse_spec(["a"], RunSpec, "spec.yaml")


def test_load_run_spec_from_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: demo\ndata:\n  path: t.json\nrollout:\n  votes: 8\n  groupSize: 4\n")
    spec = load_run_spec(path)
    assert (spec.name, spec.rollout.votes, spec.rollout.group_size) == ("demo", 8, 4)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(SpecError, match="cannot read spec"):
        load_run_spec(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed")
    with pytest.raises(SpecError, match="broken.yaml: not valid YAML"):
        load_run_spec(broken)


def experiment(**overrides):
    body = {"datasets": [{"name": "sketch", "path": "s.json"}, {"name": "dtd", "path": "d.json"}]} | overrides
    return parse_spec(body, ExperimentSpec, "values.yaml")


def test_experiment_derives_one_run_spec_per_dataset():
    exp = experiment(rollout={"votes": 16, "groupSize": 8}, storage={"uri": "s3://bucket/exp1"})
    sketch = exp.run_spec("sketch")
    assert sketch.name == "sketch" and sketch.data.path == "s.json"
    assert sketch.rollout == exp.rollout
    assert sketch.storage.uri == "s3://bucket/exp1/sketch"
    assert exp.run_spec("dtd", storage_uri="s3://bucket/ns/exp/dtd").storage.uri == "s3://bucket/ns/exp/dtd"
    with pytest.raises(SpecError, match="no dataset named"):
        exp.run_spec("missing")


def test_experiment_rejects_duplicate_and_missing_datasets():
    with pytest.raises(SpecError, match="rename sketch"):
        experiment(datasets=[{"name": "sketch", "path": "a"}, {"name": "sketch", "path": "b"}])
    with pytest.raises(SpecError, match="datasets"):
        experiment(datasets=[])
    with pytest.raises(SpecError, match="values.yaml: datasets: required field is missing"):
        parse_spec({}, ExperimentSpec, "values.yaml")


def test_experiment_resource_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "apiVersion": "ttrv.io/v1alpha1", "kind": "Experiment", "metadata": {"name": "exp1", "namespace": "team-a"},
        "spec": {"datasets": [{"name": "sketch", "path": "s.json"}]},
    }))
    metadata, spec = load_experiment(path)
    assert metadata["namespace"] == "team-a" and spec.datasets[0].name == "sketch"
    path.write_text(yaml.safe_dump({"kind": "Deployment", "metadata": {"name": "x"}}))
    with pytest.raises(SpecError, match="kind: expected Experiment"):
        load_experiment(path)
