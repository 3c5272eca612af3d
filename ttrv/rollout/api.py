"""The rollout service's HTTP API: the limits `ttrv serve` holds every request to (`ServiceLimits`) and the
pydantic request model built from them (`chat_request_model`), whose violations answer 400 naming the field."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from ttrv import log
from ttrv.data import MAX_IMAGE_PIXELS

logger = log.get_logger(__name__)


# ------------------------------------------------------------------------------------------------------ limits
@dataclass(frozen=True)
class ServiceLimits:
    """What one request, one connection and the whole service may take. Each can be set in the environment of
    `ttrv serve` as TTRV_SERVE_<NAME> (e.g. TTRV_SERVE_MAX_N=512)."""

    max_body_bytes: int = 64 << 20
    """A chat request's body (a prompt with its image as base64); larger answers 413, whatever Content-Length says."""
    max_n: int = 256
    """Samples per request (the trainer sends its votes per prompt, 32 by default)."""
    max_tokens: int = 32768
    """max_tokens / max_completion_tokens of a request."""
    max_image_pixels: int = MAX_IMAGE_PIXELS
    """Pixels of a request's image, read from its header before it is decoded (the trainer's own limit)."""
    max_in_flight: int = 512
    """Chat requests held at once (being sampled or waiting for the engine); more answer 503 with Retry-After."""
    max_connections: int = 2048
    """Open connections (uvicorn's limit_concurrency): past it uvicorn itself answers 503."""
    header_seconds: float = 30.0
    """A connection must send a request's headers within this (uvicorn bounds only the wait between requests)."""
    body_seconds: float = 60.0
    """A request's body must arrive within this once its headers have; else 408 and the connection is closed."""
    keep_alive_seconds: float = 5.0
    """An idle kept-alive connection is closed after this (uvicorn's timeout_keep_alive; vLLM's default too)."""
    shutdown_seconds: float = 20.0
    """On SIGTERM, how long the requests in flight may take to finish (uvicorn's timeout_graceful_shutdown)."""
    retry_after_seconds: int = 2
    """The Retry-After of a 503 for a full service."""

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ServiceLimits:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            name = f"TTRV_SERVE_{field.name.upper()}"
            if name in environ:
                kind = int if field.type == "int" else float
                try:
                    values[field.name] = kind(environ[name])
                except ValueError:
                    raise ValueError(f"{name}: expected {'an integer' if kind is int else 'a number'}, got "
                                     f"{environ[name]!r}") from None
                if not values[field.name] > 0:
                    raise ValueError(f"{name}: must be above 0, got {environ[name]!r}")
        return cls(**values)


# -------------------------------------------------------------------------------------------- request models
class _Closed(BaseModel):
    """A part of a request whose every field ttrv reads: anything else is a client's mistake (400)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class _Open(BaseModel):
    """A part of a request that may carry OpenAI's other fields, passed on to the engine as sent."""

    model_config = ConfigDict(extra="allow", strict=True)


class TextPart(_Closed):
    type: Literal["text"]
    text: str


class ImageURL(_Open):
    url: str = Field(description="data:image/...;base64,... (images are sent inline; nothing is fetched)")


class ImagePart(_Closed):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(_Open):
    role: str
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]]


class ChatRequestBase(BaseModel):
    """A chat-completion request as OpenAI and vLLM define it, with ttrv's `ttrv_weight_version`. Fields this model
    does not name pass on to the engine (vLLM takes many; the Hugging Face engine refuses them by name). Whether
    `messages` is one user turn, as the trainer sends, the engine checks (after the weight version, so a trainer
    with a stale version is told so first)."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = Field(None, description="the run's name, or absent")
    messages: list[Message]
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False, description="0 decodes greedily (then n: 1)")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=1 << 63)
    logprobs: bool | None = None
    return_token_ids: bool | None = None
    stream: bool | None = None
    ttrv_weight_version: int | None = Field(None, ge=0, description=(
        "pins the weight version (a step; null: the base model): another one served answers 409"))


def chat_request_model(limits: ServiceLimits) -> type[ChatRequestBase]:
    """ChatRequestBase with the limits of this service on n, max_tokens and max_completion_tokens (so that the
    OpenAPI description states them)."""
    return create_model(
        "ChatRequest", __base__=ChatRequestBase,
        n=(int | None, Field(None, ge=1, le=limits.max_n)),
        max_tokens=(int | None, Field(None, ge=1, le=limits.max_tokens)),
        max_completion_tokens=(int | None, Field(None, ge=1, le=limits.max_tokens)),
    )


def validation_message(error: ValidationError) -> str:
    """pydantic's errors as `field: what is wrong (got value)`, one per problem, the field first."""
    problems: list[str] = []
    for problem in error.errors(include_url=False):
        where = ".".join(str(part) for part in problem["loc"] if _is_field(part)) or "the body"
        got = problem.get("input")
        shown = "" if problem["type"] == "missing" or isinstance(got, (dict, list)) else f" (got {_short(got)})"
        line = f"{where}: {problem['msg']}{shown}"
        if line not in problems:
            problems.append(line)
    more = len(problems) - 4
    return "; ".join(problems[:4]) + (f"; and {more} more" if more > 0 else "")


def _is_field(part: str | int) -> bool:
    """Whether a part of a pydantic error's location is a field or an index, not the name of a union's member
    (`str`, `list[...]`, a model's class name, a discriminator's tag)."""
    return isinstance(part, int) or (part.isidentifier() and part.islower() and part not in _TYPE_NAMES)


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "text", "image_url"}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."

