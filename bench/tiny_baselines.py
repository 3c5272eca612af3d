"""The trivial baselines of the tiny benchmark, with no training: what TTRV's gain must be read against.

    python bench/tiny_baselines.py [--spec examples/tiny.yaml] [--splits test heldout]

For each split, on the base model (the spec's model.path):
- greedy: greedy decoding, answers read by the reward's extractor (what `base_accuracy` in a report is);
- letters: the first generated token restricted to the prompt's option letters (constrained decoding), argmax;
  no format can be missed, so this is the base model's knowledge without its format errors;
- maj@N: the majority of N sampled answers (rollout.votes, the run's seed), as a report's `base_maj_accuracy`.
Prints one JSON line per split and a table. Labels only score; nothing is trained.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ttrv.benchmark import resolve  # noqa: E402
from ttrv.data import read_dataset, require_images  # noqa: E402
from ttrv.evaluate import greedy_accuracy, majority_accuracy  # noqa: E402
from ttrv.modeling import load_model, load_processor, model_inputs  # noqa: E402
from ttrv.rollout.hf import HFEngine  # noqa: E402
from ttrv.spec import load_run_spec  # noqa: E402
from ttrv.weights import resolve_model  # noqa: E402


@torch.no_grad()
def letters_accuracy(model, processor, examples, batch: int = 64) -> float:
    """The first answer token restricted to each prompt's option letters."""
    tokenizer = processor.tokenizer
    correct = 0
    for start in range(0, len(examples), batch):
        chunk = examples[start:start + batch]
        inputs = model_inputs(processor, [e.prompt for e in chunk]).to(model.device)
        logits = model(**inputs).logits[:, -1, :].float()
        for row, example in zip(logits, chunk, strict=True):
            letters = sorted(example.prompt.options)
            ids = [tokenizer.encode(letter, add_special_tokens=False) for letter in letters]
            if any(len(i) != 1 for i in ids):
                raise ValueError(f"an option letter of {example.prompt.id} is not one token: {letters} -> {ids}")
            scores = row[[i[0] for i in ids]]
            correct += letters[int(scores.argmax())] == example.answer
    return correct / len(examples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(ROOT / "examples" / "tiny.yaml"))
    parser.add_argument("--splits", nargs="+", default=["test", "heldout"])
    args = parser.parse_args()
    torch.manual_seed(0)
    spec = load_run_spec(args.spec)
    path = resolve_model(spec.model.path)
    model, processor = load_model(path), load_processor(path)
    engine = HFEngine(model, processor)
    rows = []
    for split in args.splits:
        examples = require_images(read_dataset(resolve(f"ttrv://tiny-shapes/{split}"))).examples
        row = {"split": split, "prompts": len(examples),
               "greedy": greedy_accuracy(engine, examples, spec)["accuracy"],
               "letters": letters_accuracy(model, processor, examples),
               f"maj@{spec.eval.maj_votes or spec.rollout.votes}": majority_accuracy(engine, examples, spec)["maj_accuracy"]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
