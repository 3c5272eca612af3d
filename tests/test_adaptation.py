"""`ttrv run` end to end on the bundled tiny benchmark and tiny model: the CLI a user types, the trainer
entrypoint as a local process, DeepSpeed on CPU, the weight store on disk, the in-process rollout engine."""

import json

import torch
import yaml
from trainer_util import SERVICE_SPEC, events, ttrv_run

from ttrv.modeling import load_model
from ttrv.store import open_store
from ttrv.weights import resolve_model


def test_short_adaptation_raises_the_reward_and_changes_the_weights(tmp_path):
    spec = {
        "name": "short",
        "data": {"path": "ttrv://tiny-shapes/test", "heldoutPath": "ttrv://tiny-shapes/heldout", "subsetSize": 16},
        "rollout": {"votes": 16, "groupSize": 8, "maxNewTokens": 3},
        "grpo": {"lr": 2e-3, "epochs": 4, "promptsPerStep": 8, "microBatchSize": 64},
        "eval": {"limit": 48, "majVotes": 8},
        "resources": {"gpusPerNode": 0},
    }
    result = ttrv_run(tmp_path, spec)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "report:" in result.stdout
    records = events(tmp_path / "out")
    assert len(records) == 8
    first, last = records[:2], records[-2:]
    assert sum(e["reward"] for e in last) / 2 > sum(e["reward"] for e in first) / 2 + 0.2
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    for key in ("base_accuracy", "final_accuracy", "base_maj_accuracy", "heldout_base_accuracy",
                "heldout_final_accuracy", "steps", "wall_seconds"):
        assert report[key] is not None, key
    assert (tmp_path / "out" / "report.png").stat().st_size > 10_000
    store = open_store(f"file://{tmp_path / 'out' / 'store'}")
    adapted = store.load_weights(store.latest_weights())
    base = load_model(resolve_model("ttrv://tiny-qwen2vl")).state_dict()
    assert any(not torch.equal(adapted[k], base[k]) for k in adapted)
    assert not any("visual" in k for k in adapted)  # the frozen vision tower is never re-sent


def test_collapse_guard_fires_and_rolls_back_to_the_healthy_weights(tmp_path):
    """A learning rate far too high drives the policy to one degenerate answer for every prompt (the reference's
    collapsed runs); the guard must see it from label-free signals, stop, and leave the healthy weights in place."""
    spec = {
        "name": "collapse",
        "data": {"path": "ttrv://tiny-shapes/test", "subsetSize": 16},
        "rollout": {"votes": 8, "groupSize": 8, "maxNewTokens": 3},
        "grpo": {"lr": 0.05, "epochs": 6, "promptsPerStep": 4, "microBatchSize": 32, "warmupRatio": 0.0,
                 "schedule": "constant"},
        "eval": {"before": False, "after": False},
        "resources": {"gpusPerNode": 0},
    }
    result = ttrv_run(tmp_path, spec)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    fired, healthy = report["guard_fired_at"], report["rolled_back_to"]
    assert fired is not None and fired < 24, "the guard did not fire"
    assert (report["stop_reason"], report["steps"], report["steps_saved"]) == ("CollapseGuard", fired, 24 - fired)
    records = {e["step"]: e for e in events(tmp_path / "out")}
    assert records[fired]["stop"] == {"reason": "CollapseGuard", "step": fired, "stepsSaved": 24 - fired}

    def collapsed_window(step: int) -> bool:  # the guard's defaults: 4-step means, entropy <= 0.15, share >= 0.6
        window = [records[s] for s in range(max(1, step - 3), step + 1)]
        return (sum(r["entropy"] for r in window) / len(window) <= 0.15
                and sum(r["dominant_share"] for r in window) / len(window) >= 0.6)

    assert collapsed_window(fired) and collapsed_window(fired - 1)  # patience 2
    first = min(s for s in range(1, fired + 1) if all(collapsed_window(t) for t in range(s, fired + 1)))
    assert healthy == (max(1, first - 3) - 1 or None)  # the version before the first collapsed window
    store = open_store(f"file://{tmp_path / 'out' / 'store'}")
    final = store.load_weights(store.latest_weights())
    if healthy is not None:
        kept = store.load_weights(healthy)
        assert all(torch.equal(final[k], kept[k]) for k in kept)
        collapsed = store.load_weights(fired)
        assert any(not torch.equal(collapsed[k], kept[k]) for k in kept)


def test_ttrv_run_with_the_rollout_service_and_the_embedded_s3_store(service_run):
    """The cluster's path on one machine: `ttrv serve` as a process of its own, the trainer sampling over HTTP,
    every weight version travelling through a real S3 server (SeaweedFS) that `ttrv run` starts and stops."""
    out = service_run / "out"
    assert yaml.safe_load((out / "run.yaml").read_text())["storage"]["uri"] == "s3://ttrv/svc"
    loaded = [json.loads(line) for line in (out / "rollout.log").read_text().splitlines()
              if '"weights_loaded"' in line]
    assert [e["step"] for e in loaded] == [1, 2, 3]  # the service loaded every version the trainer published
    assert [e["weight_version"] for e in events(out)] == [1, 2, 3]
    assert '"serve_stopping"' in (out / "rollout.log").read_text()  # and was stopped with the run


def test_a_lora_run_publishes_adapters_the_rollout_service_loads(tmp_path):
    """`model.lora` end to end through `ttrv serve` (Hugging Face engine) and the embedded S3 store: every version
    is peft's layout, adapter_model.safetensors next to adapter_config.json, which the store requires of a LoRA
    version and vLLM's /v1/load_lora_adapter reads. The loop published no adapter_config.json, so a LoRA run
    failed at its first publish (exit 2)."""
    spec = SERVICE_SPEC | {"name": "lora", "model": {"lora": {"rank": 4, "alpha": 8}},
                           "eval": {"before": False, "after": False}}
    result = ttrv_run(tmp_path, spec)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    loaded = [json.loads(line) for line in (out / "rollout.log").read_text().splitlines()
              if '"weights_loaded"' in line]
    assert [e["step"] for e in loaded] == [1, 2, 3]
    assert [e["weight_version"] for e in events(out)] == [1, 2, 3]


def test_ppo_mini_batches_take_an_optimiser_step_per_prompt_and_the_ratio_moves(tmp_path):
    """grpo.miniBatchPrompts: 1, the reference's granularity (verl's ppo_mini_batch_size=1): every step of 4 prompts
    takes 4 optimiser steps, the old log-probs come from before the first, so from the second on the ratio moves
    away from 1 (approx_kl and, at this lr, clipfrac are non-zero). With one optimiser step per step (the default)
    the ratio is 1 at the only forward: approx_kl and clipfrac are exactly 0."""
    base = {"name": "mini", "seed": 3, "data": {"path": "ttrv://tiny-shapes/test", "subsetSize": 8},
            "rollout": {"votes": 6, "groupSize": 4, "maxNewTokens": 3},
            "grpo": {"lr": 1.0e-2, "epochs": 1, "promptsPerStep": 4, "microBatchSize": 8},
            "eval": {"before": False, "after": False}, "resources": {"gpusPerNode": 0}}
    runs = {}
    for mini in (None, 1):
        folder = tmp_path / str(mini)
        folder.mkdir()
        spec = base | {"grpo": base["grpo"] | ({"miniBatchPrompts": mini} if mini else {})}
        result = ttrv_run(folder, spec)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[mini] = events(folder / "out")
    assert [e["optimizer_steps"] for e in runs[None]] == [1, 2]
    assert [e["optimizer_steps"] for e in runs[1]] == [4, 8]
    assert all(e["approx_kl"] == 0 and e["clipfrac"] == 0 for e in runs[None])
    assert all(e["approx_kl"] != 0 for e in runs[1]) and any(e["clipfrac"] > 0 for e in runs[1])
