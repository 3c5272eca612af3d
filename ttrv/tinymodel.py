"""The tiny vision-language model that ships with ttrv: a randomly initialised Qwen2.5-VL small enough for a CPU.

`build_tiny_qwen2vl` writes an ordinary Hugging Face checkpoint folder (config, safetensors, tokenizer, chat
template, processor configs) that loads through the same Auto classes as Qwen2.5-VL-7B does on a GPU, in the
trainer (transformers) and in the rollout service (vLLM). Nothing about it is tiny-specific except the sizes, so
every test that passes on it exercises the code path of the real model.

Architecture: Qwen2.5-VL rather than Qwen2-VL because Qwen2.5-VL-7B is the reference model; both transformers 5.19
and vLLM 0.32 (CPU) accept it, and its vision tower has the windowed plus full-attention blocks of the real one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast, Qwen2_5_VLConfig

from ttrv import log

logger = log.get_logger(__name__)

UNK_TOKEN = "[UNK]"
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# The chat template of Qwen2-VL-Instruct (Qwen2.5-VL-Instruct ships the same), verbatim: the tiny model must see
# prompts laid out exactly as the real one does.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Words the chat template itself writes; without them every prompt would start with [UNK]s.
TEMPLATE_WORDS = ("system", "user", "assistant", "You", "are", "a", "helpful", "assistant", ".", ":", "Picture",
                  "Video")
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
# One image token covers a 28x28 patch after merging: 56x56 is the smallest image (4 tokens), 112x112 the largest
# (16 tokens); larger images are scaled down, so prompts stay short on a CPU.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 112 * 112


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` plus the Qwen special tokens; unknown words map to [UNK]."""
    vocab: dict[str, int] = {UNK_TOKEN: 0}
    for word in [*words, *TEMPLATE_WORDS]:
        if not word or any(ch.isspace() for ch in word):
            raise ValueError(f"tiny-model word {word!r} is empty or contains whitespace; pass single words")
        vocab.setdefault(word, len(vocab))
    for token in SPECIAL_TOKENS:
        if token in vocab:
            raise ValueError(f"tiny-model word {token!r} is a reserved special token; remove it from words")
        vocab[token] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Punctuation is split off so "cat." and "A." reuse the words "cat" and "A".
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    # WordPiece's decoder joins words with spaces and glues punctuation back ("A . cat" -> "A. cat").
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token=UNK_TOKEN,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS),
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(tokenizer: PreTrainedTokenizerFast, layers: int = 2, hidden: int = 128, heads: int = 4,
                kv_heads: int = 2, vision_depth: int = 2, vision_hidden: int = 64,
                init_std: float = 0.2) -> Qwen2_5_VLConfig:
    head_dim = hidden // heads
    # mrope splits the rotary half-dimension into (temporal, height, width) sections; Qwen2.5-VL-7B uses 16/24/24 of
    # 64, the same 1/4 : 3/8 : 3/8 shares are kept here.
    half = head_dim // 2
    mrope_section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope_section},
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
            "tie_word_embeddings": False,
            "initializer_range": init_std,
        },
        vision_config={
            "depth": vision_depth,
            "hidden_size": vision_hidden,
            "intermediate_size": 2 * vision_hidden,
            "num_heads": 2,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "temporal_patch_size": TEMPORAL_PATCH_SIZE,
            "window_size": 112,
            "fullatt_block_indexes": [vision_depth - 1],
            "out_hidden_size": hidden,
            "tokens_per_second": 2,
            "initializer_range": init_std,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def processor_config() -> dict:
    """processor_config.json naming the standard Qwen classes, so that vLLM and transformers load it unchanged.

    The image processor is the PIL one on purpose: it exists with and without torchvision, so trainer and rollout
    service compute the same pixel values. The video entry is never used by ttrv but vLLM's Qwen2.5-VL processor
    requires one."""
    common = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "merge_size": MERGE_SIZE,
        "patch_size": PATCH_SIZE,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"longest_edge": MAX_PIXELS, "shortest_edge": MIN_PIXELS},
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
    }
    return {
        "processor_class": "Qwen2_5_VLProcessor",
        "image_processor": {**common, "image_processor_type": "Qwen2VLImageProcessorPil"},
        "video_processor": {**common, "video_processor_type": "Qwen2VLVideoProcessor", "do_sample_frames": False,
                            "min_frames": 4, "max_frames": 768, "return_metadata": False},
    }


def build_tiny_qwen2vl(out_dir: str | Path, words: list[str], seed: int = 0, *, layers: int = 2,
                       hidden: int = 128, heads: int = 4, kv_heads: int = 2, vision_depth: int = 2,
                       vision_hidden: int = 64, init_std: float = 0.2) -> Path:
    """Write a randomly initialised tiny Qwen2.5-VL checkpoint to `out_dir` and return its path.

    `words` is the vocabulary (besides the special tokens and the chat template's own words); the same seed and
    words give the same weights. `init_std` is ten times the usual 0.02 so that the random model's next-token
    distributions are peaked and depend on the image: greedy outputs then differ visibly between weight versions and
    are robust to the rounding differences between transformers and vLLM."""
    if hidden % heads or (hidden // heads) not in (32, 64, 80, 96, 112, 128, 256):
        raise ValueError(f"hidden {hidden} / heads {heads} must give a head_dim vLLM's CPU attention supports "
                         "(32, 64, 80, 96, 112, 128 or 256); e.g. hidden=128, heads=4")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(words)
    config = tiny_config(tokenizer, layers, hidden, heads, kv_heads, vision_depth, vision_hidden, init_std)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config.update(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=[config.text_config.eos_token_id, config.text_config.pad_token_id],
        pad_token_id=config.text_config.pad_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps(processor_config(), indent=2) + "\n")
    logger.info("tiny_model.built", path=str(out), parameters=sum(p.numel() for p in model.parameters()),
                vocab=len(tokenizer), seed=seed)
    return out
