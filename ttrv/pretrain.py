"""Pre-trains the tiny VLM that ships with ttrv (`ttrv/assets/tiny-qwen2vl`) into a weak but not useless base.

    python -m ttrv.pretrain --out ttrv/assets/tiny-qwen2vl        (`make tiny-model`; ~2 min on 2 CPU cores)

Ordinary supervised steps on tiny-shapes' source domain (solid shapes on plain backgrounds). The answers in the
training data follow the asked format ("Answer with the option's letter") only `letterShare` of the time; the
rest name the option instead ("blue"), as web-scale instruction data often does. The base model therefore knows
the answer far more often than it gives it in the asked format, and on the shifted test domain it is also less
sure what the answer is. Both are what TTRV's label-free votes act on (see the README's "What the tiny benchmark
shows").
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ttrv import benchmark, log
from ttrv.data import read_dataset
from ttrv.modeling import load_model, load_processor
from ttrv.policy import PromptEncoder, collate, token_log_probs
from ttrv.tinymodel import build_tiny_qwen2vl

logger = log.get_logger(__name__)
ASSET = Path(__file__).parent / "assets" / "tiny-qwen2vl"


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 3000
    """Optimiser steps."""
    batch: int = 32
    """Sequences per step."""
    lr: float = 3e-3
    """Peak AdamW learning rate (linear warm-up over 5 %, then cosine)."""
    letter_share_colour: float = 0.85
    """Share of colour questions answered with the option letter in training; the others name the colour."""
    letter_share_shape: float = 0.25
    """Share of shape questions answered with the option letter; the others name the shape."""
    seed: int = 0
    """Seed of initialisation and data order."""
    layers: int = 4
    """Language-model layers."""


def letter_share(example, config: PretrainConfig) -> float:
    return config.letter_share_colour if example.prompt.source.endswith("colour") else config.letter_share_shape


def response_text(answer: str, options: dict[str, str], as_letter: bool) -> str:
    return answer if as_letter else options[answer]


def pretrain(out: Path, config: PretrainConfig) -> dict:
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    source = read_dataset(benchmark.resolve("ttrv://tiny-shapes/source")).examples
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent if out.parent.exists() else None))
    build_tiny_qwen2vl(staging, benchmark.vocabulary(), seed=config.seed, layers=config.layers)
    model = load_model(staging).train()
    processor = load_processor(staging)
    tokenizer = processor.tokenizer
    encoder = PromptEncoder(processor)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    warmup = max(1, config.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + torch.cos(torch.tensor(torch.pi * (s - warmup) / max(1, config.steps - warmup))).item())))
    started = time.perf_counter()
    for step in range(config.steps):
        batch = rng.sample(source, config.batch)
        responses = [
            tokenizer(response_text(e.answer, e.prompt.options, rng.random() < letter_share(e, config)),
                      add_special_tokens=False)["input_ids"] + [eos]
            for e in batch
        ]
        train_batch = collate([encoder.encode(e.prompt) for e in batch], responses, tokenizer.pad_token_id)
        log_probs = token_log_probs(model, train_batch)
        loss = -(log_probs * train_batch.target_mask).sum() / train_batch.target_mask.sum()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == config.steps - 1:
            logger.info("pretrain.step", step=step, loss=round(loss.item(), 4), lr=schedule.get_last_lr()[0])
    model.eval()
    model.save_pretrained(staging)
    card = {"pretrain": asdict(config), "seconds": round(time.perf_counter() - started, 1),
            "benchmark": benchmark.VERSION, "final_loss": round(loss.item(), 4)}
    (staging / "ttrv_pretrain.json").write_text(json.dumps(card, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ASSET)
    for name, field in PretrainConfig.__dataclass_fields__.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(field.default), default=field.default)
    args = parser.parse_args(argv)
    log.configure()
    config = PretrainConfig(**{k: getattr(args, k) for k in PretrainConfig.__dataclass_fields__})
    print(json.dumps(pretrain(args.out, config)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
