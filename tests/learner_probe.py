"""One GRPO update of ttrv's real Learner (DeepSpeed on CPU, a world of one) on a fixed batch of the bundled tiny
model, under spec variants given as JSON overrides; prints, per variant, the reference log-probs, the step's
metrics, the gradient DeepSpeed accumulated (Adam's first moment after the first step is (1 - beta1) times it) and
the micro-batches' padded sizes. Run as a separate process by tests/test_learner_memory.py: DeepSpeed's process
group and its engines stay out of the test process.

    python tests/learner_probe.py OUT.pt '{"name": {"grpo": {...}, "resources": {...}}, ...}'
"""

from __future__ import annotations

import json
import sys

import torch

from ttrv import benchmark
from ttrv.data import read_dataset, require_images
from ttrv.learner import Learner, World
from ttrv.modeling import load_processor
from ttrv.policy import PromptEncoder, collate
from ttrv.spec import RunSpec
from ttrv.train import init_distributed
from ttrv.weights import resolve_model

BASE = {"name": "probe", "data": {"path": "ttrv://tiny-shapes/test"},
        "grpo": {"lr": 1e-3, "klCoef": 0.05, "gradClip": 1e6, "promptsPerStep": 3},
        "rollout": {"votes": 2, "groupSize": 2}, "resources": {"gpusPerNode": 0}}
"""gradClip far above the gradient's norm: no clipping, so Adam's first moment is the accumulated gradient itself."""

RESPONSES = [[10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [13], [14, 15, 16, 17, 18], [19, 20],
             [21, 22, 23, 24, 25, 26, 27, 28, 29], [30, 31, 32]]
"""Six responses of ragged lengths (three prompts, two each): packing by tokens gives micro-batches of 1 to 3."""


def merge(base: dict, override: dict) -> dict:
    return {key: merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
            for key, value in (base | override).items()}


def main(out: str, variants: dict[str, dict]) -> None:
    torch.manual_seed(0)
    world = World(0, 1, 0)
    collectives = init_distributed(world)
    path = resolve_model("ttrv://tiny-qwen2vl")
    examples = require_images(read_dataset(benchmark.resolve("ttrv://tiny-shapes/test"), "auto", None)).examples
    encoder = PromptEncoder(load_processor(path))
    encoded = [encoder.encode(e.prompt) for e in examples[:3] for _ in range(2)]
    batch = collate(encoded, RESPONSES, pad_id=0)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    results = {}
    for name, override in variants.items():
        spec = RunSpec.model_validate(merge(BASE, override))
        learner = Learner(spec, path, total_steps=1, world=world, sequences_per_rank=len(batch),
                          collectives=collectives)
        plan = learner._micro_batches(batch)
        ref = learner.reference_log_probs(batch)
        stats = learner.update(batch, advantages, None, ref)
        adam = learner.optimizer.optimizer if hasattr(learner.optimizer, "optimizer") else learner.optimizer
        first_moment = torch.cat([state["exp_avg"].flatten() for state in adam.state.values()])
        results[name] = {
            "ref": ref, "stats": stats, "grad": first_moment / (1 - 0.9),
            "micro_batches": [(rows.start, rows.stop) for rows in plan],
            "padded": [batch.select(rows).input_ids.numel() for rows in plan],
            "lengths": batch.lengths(),
            "reference_device": str(next(learner.reference.parameters()).device) if learner.reference else None,
        }
    torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
