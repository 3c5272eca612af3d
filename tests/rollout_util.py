"""What the rollout tests share: transformers' view of the tiny model (the reference every engine's samples are
checked against) and the weight versions they publish."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from ttrv.data import Prompt
from ttrv.modeling import load_model, load_processor, model_inputs
from ttrv.rollout.supervisor import ServeProcess
from ttrv.spec import RunSpec
from ttrv.tinymodel import build_tiny_qwen2vl

WORDS = "What is shown ? Options A B C D cat dog bird fish The answer is".split()
QUESTION = "<image>\nWhat is shown? Options:\nA. cat\nB. dog"
TOLERANCE = 1e-4  # float32 on both sides; measured differences are ~5e-6
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def tiny_models(work: Path) -> dict[str, Path]:
    """Two tiny models of one architecture: A, served first, and B, whose language weights get published."""
    return {"A": build_tiny_qwen2vl(work / "A", WORDS, seed=0), "B": build_tiny_qwen2vl(work / "B", WORDS, seed=1)}


def transformers_view(weights: dict[str, Path], prompts: Iterable[Prompt], suppressed_fields: Iterable[str] = ()):
    """transformers' view: the processor's batch of each prompt (by id), base A, and A's vision tower under B's
    language model (what a published full version of B's language weights makes of A); with `suppressed_fields`,
    the config's token ids an engine never samples (its log-probs are those of the distribution without them)."""
    processor = load_processor(weights["A"])
    base = load_model(weights["A"])
    mixed = load_model(weights["A"])
    mixed.load_state_dict(language_tensors(load_model(weights["B"])), strict=False)
    view = {"batches": {p.id: model_inputs(processor, [p]) for p in prompts}, "A": base, "mixed": mixed,
            "placeholders": set(processor.tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"]))}
    suppressed = [getattr(base.config, name) for name in suppressed_fields]
    return view | ({"suppressed": suppressed} if suppressed else {})


def served_spec(work: Path, document: dict) -> RunSpec:
    """The run spec `ttrv serve` reads, written to work/run.yaml."""
    (work / "run.yaml").write_text(yaml.safe_dump(document))
    return RunSpec.model_validate(document)


@contextmanager
def serving(work: Path, ended_by_test: bool = False) -> Iterator[ServeProcess]:
    """`ttrv serve --spec work/run.yaml` as a separate process, which must stop cleanly on SIGTERM; with
    `ended_by_test`, one that has already exited (a test ended it and checked how) is left as it is."""
    service = ServeProcess(work / "run.yaml", work / "serve.log").start()
    yield service
    if ended_by_test and service.process.poll() is not None:
        return
    assert service.stop() == 0, service.log_tail()


def hf_logprobs(model, batch, response_ids, placeholders, temperature=1.0, suppressed=()):
    """The response tokens transformers can score and its log-softmax row for each (row i predicts token i), with
    the `suppressed` tokens' logits at -inf (an engine that never samples them reports log-probs without them).

    Scoring stops after the first image/video placeholder token: a random model samples one now and then, and the
    Qwen model refuses to read one without image features (it can still score it, from the tokens before it)."""
    scored = list(response_ids)
    for index, token in enumerate(scored):
        if token in placeholders:
            scored = scored[:index + 1]
            break
    ids = torch.cat([batch["input_ids"], torch.tensor([scored[:-1]], dtype=batch["input_ids"].dtype)], 1)
    inputs = {**batch, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "mm_token_type_ids" in batch:
        inputs["mm_token_type_ids"] = torch.nn.functional.pad(batch["mm_token_type_ids"], (0, len(scored) - 1))
    start = batch["input_ids"].shape[1] - 1
    with torch.no_grad():
        logits = model(**inputs).logits[0, start:start + len(scored)].float()
    logits[:, list(suppressed)] = float("-inf")
    return scored, (logits / temperature).log_softmax(-1)


def assert_logprobs_match(model, hf, batch, samples, temperature=1.0):
    """Each sample's log-probs are transformers' log-probs of its tokens at `temperature` (without the tokens in
    hf["suppressed"], when there is that entry); returns how many tokens were compared."""
    compared = 0
    for sample in samples:
        scored, rows = hf_logprobs(model, batch, sample.token_ids, hf["placeholders"], temperature,
                                   hf.get("suppressed", ()))
        expected = rows[torch.arange(len(scored)), torch.tensor(scored)]
        assert torch.allclose(torch.tensor(sample.logprobs[:len(scored)]), expected, atol=TOLERANCE)
        compared += len(scored)
    return compared


def assert_greedy_under(model, hf, batch, response_ids):
    scored, rows = hf_logprobs(model, batch, response_ids, hf["placeholders"], suppressed=hf.get("suppressed", ()))
    for step, token in enumerate(scored):
        assert rows[step, token] >= rows[step].max() - TOLERANCE, f"token {step} ({token}) is not greedy"


def language_tensors(model) -> dict[str, torch.Tensor]:
    """What the trainer publishes with the vision tower frozen: every tensor outside it, under the model's names."""
    return {name: tensor.clone() for name, tensor in model.state_dict().items() if ".visual." not in name}


def synced(client, store) -> int | None:
    """Puts the client on the newest version in the store (none: the base model) and returns it."""
    latest = store.latest_weights()
    if latest is not None:
        client.load_version(latest)
    return latest


def publish_corrupt(store, uri: str, step: int, tensors) -> None:
    """Weight version `step` in `store` with one bit of its shard flipped: built in a store aside (`uri`-aside)
    and copied in shard first, manifest last, so a service never sees the version intact."""
    from ttrv.store import open_store, weights_prefix

    with open_store(f"{uri}-aside", retry_seconds=30) as aside:
        publish(aside, step, tensors)
        prefix = weights_prefix(step)
        shard = bytearray(aside._backend.get(f"{prefix}/model.safetensors"))
        shard[len(shard) // 2] ^= 0x01
        store._backend.put(f"{prefix}/model.safetensors", bytes(shard))
        store._backend.put(f"{prefix}/manifest.json", aside._backend.get(f"{prefix}/manifest.json"))


def publish(store, step, tensors):
    store.publish_weights(step, tensors, kind="full", base_model="A", dtype="float32")


def publish_adapter(store, step, base_path, directory, seed: int | None = None):
    """A random (non-zero) peft adapter on the language model, drawn with `seed` (default: `step`), published as
    LoRA version `step` in peft's layout; returns the peft model it makes."""
    torch.manual_seed(step if seed is None else seed)
    model = get_peft_model(load_model(base_path), LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS,
                                                             init_lora_weights=False)).eval()
    model.save_pretrained(directory)
    store.publish_weights(step, get_peft_model_state_dict(model), kind="lora", base_model=str(base_path),
                          dtype="float32", extra_files={"adapter_config.json": directory / "adapter_config.json"})
    return model
