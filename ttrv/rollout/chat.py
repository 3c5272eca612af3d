"""The OpenAI chat-completions wire format that every rollout engine behind HTTP speaks: vLLM's server, `ttrv serve`
and its client. A prompt travels as one user turn with its image inlined as a data: URL (nothing is fetched), and
an answer's choices carry vLLM's `token_ids` extension next to the sampler's log-probs."""

from __future__ import annotations

import base64
import binascii
import mimetypes
from pathlib import Path
from typing import Any

from ttrv.data import IMAGE_PLACEHOLDER, Prompt
from ttrv.modeling import chat_messages
from ttrv.rollout.base import Sample

NEUTRAL_SAMPLING = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
"""Sent with every vLLM request: a checkpoint's generation_config.json (Qwen's sets top_k=1) would otherwise
change the sampling the trainer asked for."""


def image_data_url(path: str) -> str:
    """The image file as a data: URL, the form vLLM accepts without fetching anything."""
    mime = mimetypes.guess_type(path)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def openai_messages(prompt: Prompt) -> list[dict[str, Any]]:
    """`ttrv.modeling.chat_messages` with the image inlined as an OpenAI image_url part."""
    messages = chat_messages(prompt)
    for message in messages:
        message["content"] = [
            {"type": "image_url", "image_url": {"url": image_data_url(prompt.image_path)}}
            if part["type"] == "image" else part
            for part in message["content"]
        ]
    return messages


def prompt_from_messages(messages: Any) -> tuple[str, bytes | None]:
    """The inverse of `openai_messages` for engines that take a `Prompt`: (text with `<image>` where the image part
    stood, the image's bytes). Raises ValueError naming the part it cannot read."""
    if not isinstance(messages, list) or len(messages) != 1 or not isinstance(messages[0], dict) \
            or messages[0].get("role") != "user":
        raise ValueError("messages: expected one user turn (the form openai_messages writes)")
    content = messages[0].get("content")
    if isinstance(content, str):
        return content, None
    if not isinstance(content, list):
        raise ValueError("messages[0].content: expected a string or a list of text and image_url parts")
    text, image = [], None
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            text.append(part["text"])
        elif kind == "image_url":
            if image is not None:
                raise ValueError(f"messages[0].content[{index}]: a second image; send one image per prompt")
            image = decode_data_url((part.get("image_url") or {}).get("url"), f"messages[0].content[{index}]")
            text.append(IMAGE_PLACEHOLDER)
        else:
            raise ValueError(f"messages[0].content[{index}]: expected a text or image_url part")
    return "".join(text), image


def decode_data_url(url: Any, where: str) -> bytes:
    if not isinstance(url, str) or not url.startswith("data:image/") or ";base64," not in url:
        raise ValueError(f"{where}.image_url.url: expected a data:image/...;base64, URL (images are sent inline)")
    try:
        return base64.b64decode(url.partition(";base64,")[2], validate=True)
    except binascii.Error:
        raise ValueError(f"{where}.image_url.url: the base64 payload does not decode") from None


def samples_from_completion(answer: Any, n: int, logprobs: bool) -> list[tuple[Sample, dict[str, Any]]]:
    """The `n` samples of a chat-completion answer in choice order, each with its raw choice. Raises ValueError when
    the answer lacks what the trainer needs (token ids; one log-prob per token when `logprobs`)."""
    choices = sorted((answer or {}).get("choices") or [], key=lambda c: c["index"])
    if len(choices) != n:
        raise ValueError(f"asked for {n} samples, got {len(choices)}")
    samples = []
    for choice in choices:
        token_ids = choice.get("token_ids")
        if token_ids is None:
            raise ValueError("the answer has no token_ids; the server must support return_token_ids (vLLM >= 0.10)")
        token_logprobs = None
        if logprobs:
            token_logprobs = tuple(entry["logprob"] for entry in (choice.get("logprobs") or {}).get("content") or [])
            if len(token_logprobs) != len(token_ids):
                raise ValueError(f"the answer has {len(token_ids)} token ids but {len(token_logprobs)} log-probs")
        text = (choice.get("message") or {}).get("content") or ""
        samples.append((Sample(text, tuple(token_ids), token_logprobs), choice))
    return samples
