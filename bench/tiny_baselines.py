"""The trivial baselines of the tiny benchmark, with no training: what TTRV's gain must be read against.

    python bench/tiny_baselines.py [--spec examples/tiny.yaml] [--splits test heldout] [--seeds 0] [--json FILE]

For each split, on the base model (the spec's model.path):
- greedy: greedy decoding, answers read by the reward's extractor (what `base_accuracy` in a report is);
- letters: the first generated token restricted to the prompt's option letters (constrained decoding), argmax;
  no format can be missed, so this is the base model's knowledge without its format errors;
- maj@N: the majority of N sampled answers (rollout.votes, sampled with each --seeds seed as a run's votes), read
  by ttrv's extractor (`choice`: an unreadable answer is no vote) as a report's `base_maj_accuracy`;
- maj@N reference: the same samples read by the reference's extractor (`reference`: an unreadable answer votes
  with its raw text, so "square" can win), what a report of a run with `reward.extractor: reference` shows.
greedy and letters do not depend on the seed. Prints one JSON line per split and seed and a table; --json writes
the rows as a list. Labels only score; nothing is trained.
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
from ttrv.evaluate import generate_in_chunks, greedy_accuracy, majority_votes  # noqa: E402
from ttrv.modeling import load_model, load_processor, model_inputs  # noqa: E402
from ttrv.reward import extract_answer, normalize_label, vote_stats  # noqa: E402
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


def majority_both(engine, examples, spec, seed: int) -> dict[str, float]:
    """maj@N of one set of samples (drawn as ttrv.evaluate.majority_accuracy draws them, with `seed`), read by
    ttrv's extractor and by the reference's."""
    outputs = generate_in_chunks(engine, [e.prompt for e in examples], n=majority_votes(spec),
                                 temperature=spec.rollout.temperature, top_p=spec.rollout.top_p,
                                 max_new_tokens=spec.eval.max_new_tokens or spec.rollout.max_new_tokens, seed=seed)
    result = {}
    for extractor in ("choice", "reference"):
        correct = 0
        for samples, example in zip(outputs, examples, strict=True):
            choices = example.prompt.choices(spec.reward.choices)
            answers = [extract_answer(s.text, extractor, choices) for s in samples]
            correct += vote_stats(answers, normalize_label(example.answer, extractor, choices)).majority_correct
        result[extractor] = correct / len(examples)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(ROOT / "examples" / "tiny.yaml"))
    parser.add_argument("--splits", nargs="+", default=["test", "heldout"])
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="vote seeds (default: the spec's seed)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    spec = load_run_spec(args.spec)
    if spec.reward.extractor != "choice":
        raise SystemExit(f"{args.spec}: reward.extractor is {spec.reward.extractor!r}; the baselines' greedy row is "
                         "read by ttrv's `choice` extractor (maj@N is read by both): give a spec with the default")
    votes = majority_votes(spec)
    path = resolve_model(spec.model.path)
    model, processor = load_model(path), load_processor(path)
    engine = HFEngine(model, processor)
    rows = []
    for split in args.splits:
        examples = require_images(read_dataset(resolve(f"ttrv://tiny-shapes/{split}"))).examples
        greedy = greedy_accuracy(engine, examples, spec)["accuracy"]
        letters = letters_accuracy(model, processor, examples)
        for seed in args.seeds if args.seeds is not None else [spec.seed]:
            majority = majority_both(engine, examples, spec, seed)
            row = {"split": split, "seed": seed, "prompts": len(examples), "greedy": greedy, "letters": letters,
                   f"maj@{votes}": majority["choice"], f"maj@{votes} reference": majority["reference"]}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
