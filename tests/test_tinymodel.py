"""The tiny Qwen2.5-VL: built from a config, saved as a normal checkpoint, loaded back through the Auto classes."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, Qwen2_5_VLProcessor

from ttrv.data import DataError, Prompt
from ttrv.modeling import chat_messages, load_model, load_processor, model_inputs, render_prompt
from ttrv.tinymodel import SPECIAL_TOKENS, build_tiny_qwen2vl

WORDS = "What is shown ? Options A B C D cat dog bird fish The answer is".split()
QUESTION = "<image>\nWhat is shown? Options:\nA. cat\nB. dog"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_qwen2vl(tmp_path_factory.mktemp("tiny") / "model", WORDS, seed=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = {}
    for name, size, color in [("red", (56, 56), (200, 30, 30)), ("blue", (56, 56), (20, 30, 230)),
                              ("wide", (112, 56), (20, 230, 30)), ("photo", (640, 480), (90, 90, 90))]:
        paths[name] = str(folder / f"{name}.png")
        Image.new("RGB", size, color).save(paths[name])
    return paths


@pytest.fixture(scope="module")
def processor(tiny):
    return load_processor(tiny)


@pytest.fixture(scope="module")
def model(tiny):
    return load_model(tiny)


def test_checkpoint_is_a_small_standard_qwen2_5_vl_folder(tiny):
    names = {p.name for p in tiny.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "processor_config.json", "generation_config.json"} <= names
    config = json.loads((tiny / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl"
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    text = config["text_config"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert (text["hidden_size"], head_dim) == (128, 32)
    assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2
    assert config["vision_config"]["depth"] == 2
    weights = load_file(tiny / "model.safetensors")
    assert sum(t.numel() for t in weights.values()) < 1_000_000
    assert sum((tiny / n).stat().st_size for n in names) < 5_000_000
    processor_config = json.loads((tiny / "processor_config.json").read_text())
    assert processor_config["processor_class"] == "Qwen2_5_VLProcessor"
    assert processor_config["image_processor"]["image_processor_type"] == "Qwen2VLImageProcessorPil"
    assert processor_config["video_processor"]["video_processor_type"] == "Qwen2VLVideoProcessor"


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, tiny):
    again = load_file(build_tiny_qwen2vl(tmp_path / "again", WORDS, seed=0) / "model.safetensors")
    other = load_file(build_tiny_qwen2vl(tmp_path / "other", WORDS, seed=1) / "model.safetensors")
    first = load_file(tiny / "model.safetensors")
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["lm_head.weight"], other["lm_head.weight"])


def test_tokenizer_round_trips_text_and_knows_the_special_tokens(processor):
    tokenizer = processor.tokenizer
    text = "What is shown? A. cat"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["What", "is", "shown", "?", "A", ".", "cat"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer("zebra")["input_ids"]) == ["[UNK]"]
    for token in SPECIAL_TOKENS:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token
    assert tokenizer.decode(tokenizer("<|im_start|>cat<|im_end|>")["input_ids"], skip_special_tokens=True) == "cat"


def test_processor_is_the_qwen_processor_with_its_chat_template(processor, images):
    assert isinstance(processor, Qwen2_5_VLProcessor)
    prompt = Prompt("0", QUESTION, images["red"])
    assert render_prompt(processor, prompt) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>\nWhat is shown? Options:\nA. cat\nB. dog"
        "<|im_end|>\n<|im_start|>assistant\n"
    )


# One token per 28x28 pixels; 640x480 is scaled down to 112x84 (max_pixels 112*112) and so gives 4x3.
@pytest.mark.parametrize(("image", "tokens"), [("red", 4), ("wide", 8), ("photo", 12)])
def test_image_token_count_follows_patch_merge_and_max_pixels(processor, images, image, tokens):
    batch = model_inputs(processor, [Prompt("0", QUESTION, images[image])])
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((batch["input_ids"] == image_pad).sum()) == tokens


def test_chat_messages_put_the_image_where_the_placeholder_was(images):
    content = chat_messages(Prompt("0", "Look: <image> Which?", images["red"]))[0]["content"]
    assert content == [{"type": "text", "text": "Look: "}, {"type": "image"}, {"type": "text", "text": " Which?"}]
    assert chat_messages(Prompt("1", "No image here", None))[0]["content"] == [{"type": "text", "text": "No image here"}]
    with pytest.raises(DataError, match="no image_path"):
        chat_messages(Prompt("2", QUESTION, None))
    with pytest.raises(DataError, match="no <image> placeholder"):
        chat_messages(Prompt("3", "What is shown?", images["red"]))
    with pytest.raises(DataError, match="2 <image> placeholders"):
        chat_messages(Prompt("4", "<image><image>", images["red"]))


def test_forward_sees_the_image_and_greedy_generation_is_deterministic(model, processor, images):
    red = model_inputs(processor, [Prompt("0", QUESTION, images["red"])])
    blue = model_inputs(processor, [Prompt("0", QUESTION, images["blue"])])
    with torch.no_grad():
        logits_red = model(**red).logits[0, -1]
        logits_blue = model(**blue).logits[0, -1]
        first = model.generate(**red, max_new_tokens=6, do_sample=False)
        second = model.generate(**red, max_new_tokens=6, do_sample=False)
    assert logits_red.shape == (len(processor.tokenizer),)
    assert (logits_red - logits_blue).abs().max() > 0.1
    assert torch.equal(first, second)
    assert first.shape[1] > red["input_ids"].shape[1]


def test_left_padded_batch_generates_what_each_prompt_generates_alone(model, processor, images):
    long_prompt = Prompt("1", QUESTION + "\nThe answer is", images["blue"])
    alone = []
    for prompt in (Prompt("0", QUESTION, images["red"]), long_prompt):
        batch = model_inputs(processor, [prompt])
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=4, do_sample=False)
        alone.append(out[0, batch["input_ids"].shape[1]:].tolist())
    batch = model_inputs(processor, [Prompt("0", QUESTION, images["red"]), long_prompt])
    with torch.no_grad():
        together = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, batch["input_ids"].shape[1]:]
    assert together.tolist() == alone


def test_save_and_reload_round_trip_is_exact(tmp_path, tiny, model, processor, images):
    model.save_pretrained(tmp_path / "copy")
    processor.save_pretrained(tmp_path / "copy")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "copy")
    reloaded_processor = load_processor(tmp_path / "copy")
    # Saved as the standard processor with its video entry: vLLM can serve what the trainer saves.
    saved = json.loads((tmp_path / "copy" / "processor_config.json").read_text())
    original = json.loads((tiny / "processor_config.json").read_text())
    assert saved["processor_class"] == original["processor_class"]
    assert saved["video_processor"] == original["video_processor"]
    assert saved["image_processor"]["image_processor_type"] == "Qwen2VLImageProcessorPil"
    original_state, reloaded_state = model.state_dict(), reloaded.state_dict()
    assert original_state.keys() == reloaded_state.keys()
    assert all(torch.equal(original_state[k], reloaded_state[k]) for k in original_state)
    prompt = Prompt("0", QUESTION, images["red"])
    batch, batch_again = model_inputs(processor, [prompt]), model_inputs(reloaded_processor, [prompt])
    assert torch.equal(batch["input_ids"], batch_again["input_ids"])
    assert torch.equal(batch["pixel_values"], batch_again["pixel_values"])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch_again).logits)


def test_builder_rejects_head_dims_vllm_cpu_cannot_run(tmp_path):
    with pytest.raises(ValueError, match="head_dim"):
        build_tiny_qwen2vl(tmp_path, WORDS, hidden=64, heads=4)
    with pytest.raises(ValueError, match="whitespace"):
        build_tiny_qwen2vl(tmp_path, ["two words"])
