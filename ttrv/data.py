"""Test-set readers: the TTRV reference's JSON, verl's parquet, and JSONL.

Every reader yields `Example(prompt, answer)`. Training only ever receives `Prompt` objects, which have no answer
field at all: `adaptation_prompts` strips labels by type, so no code path of the trainer can read one. Answers flow
only to `ttrv.evaluate`.

Reference JSON (a list) and JSONL (one object a line) records:
    {"id": "0", "prompt": "<image>\\nWhat is shown? Options:\\nA. cat\\nB. dog ...", "image_path": "/x.jpg",
     "answer": "B", "source": "imagenet-r"}
verl parquet rows:
    data_source, prompt=[{"role": "user", "content": "<image>..."}], images=[{"image": path}],
    reward_model={"style": "rule", "ground_truth": "B"}, extra_info={"split": ..., "index": ...}
"""

from __future__ import annotations

import json
import os
import random
import re
import stat
import struct
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

IMAGE_PLACEHOLDER = "<image>"
MAX_IMAGE_PIXELS = 40_000_000  # ~6300 x 6300: larger is refused, not decoded (decompression-bomb guard)
MAX_ASPECT_RATIO = 200
"""The Qwen2-VL image processors refuse an image whose long side is over 200 times its short side (`smart_resize`
in transformers/models/qwen2_vl/image_processing_qwen2_vl.py and image_processing_pil_qwen2_vl.py raise
ValueError "absolute aspect ratio must be smaller than 200"): refused here, from the header, with the file named."""
MAX_INT_DIGITS = 4300
"""Python's int/str conversion limit (sys.get_int_max_str_digits(), PEP 651's follow-up in 3.11): `json.loads`
raises ValueError on a longer integer literal; such a literal is kept as its digits (an id, an answer) instead."""
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[\.\)]\s+(\S.*)$", re.MULTILINE)


class DataError(ValueError):
    """A data file that cannot be used; the message names the file (and record) and the fix."""


@dataclass(frozen=True)
class Prompt:
    """What adaptation sees of a test example: no answer, by construction."""

    id: str
    text: str
    image_path: str | None
    source: str = ""

    @property
    def options(self) -> dict[str, str]:
        """Option letter -> option text, read from the prompt's "A. ..." lines."""
        return dict(_OPTION_LINE.findall(self.text))

    def choices(self, fallback: str) -> str:
        """The option letters this prompt offers, in its order (A-E, two options, ...): the number of options varies
        from prompt to prompt (the reference's MathVista file has an E among ABCD prompts). `fallback`, the spec's
        reward.choices, for a prompt that lists no option lines."""
        return "".join(self.options) or fallback


@dataclass(frozen=True)
class Example:
    """A test example with its label; labels are for evaluation only."""

    prompt: Prompt
    answer: str | None


@dataclass
class Dataset:
    path: Path
    format: str
    examples: list[Example]
    problems: list[str] = field(default_factory=list)

    @property
    def prompts(self) -> list[Prompt]:
        return [e.prompt for e in self.examples]


def parse_path_map(items: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        old, sep, new = item.partition("=")
        if not sep or not old:
            raise DataError(f"path map {item!r} is not OLD=NEW; write e.g. /data/authors=/mnt/data")
        pairs.append((old, new))
    return pairs


def resolve_image_path(raw: str, base: Path, path_map: list[tuple[str, str]]) -> str:
    """Apply the first matching OLD=NEW prefix rewrite; resolve a relative path against the data file's folder."""
    for old, new in path_map:
        if raw.startswith(old):
            raw = new + raw[len(old):]
            break
    path = Path(raw)
    return str(path if path.is_absolute() else (base / path))


def regular_file(path: str | Path, what: str, fix: str) -> None:
    """Refuses anything but a regular file (a FIFO, a device, a directory, a socket) from its `stat`, before it is
    opened: reading a FIFO without a writer blocks for ever, a device may never end (/dev/zero) or act when opened.
    Raises FileNotFoundError for a missing path (the caller names it), DataError otherwise."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read {what} ({getattr(error, 'strerror', None) or error}); {fix}") from None
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else
                "not a regular file")
        raise DataError(f"{path}: {what} is {kind}, not a regular file; {fix}")


def _open_regular(path: str | Path):
    """A binary file object of the regular file `path`, refused from its `stat` as `regular_file` says, then opened
    without blocking and checked again from the descriptor (the path may be swapped for a FIFO in between)."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise DataError(f"{path}: not a regular file (it changed while being opened); replace the file")
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def _json_int(literal: str) -> int | str:
    return int(literal) if len(literal.lstrip("-")) <= MAX_INT_DIGITS else literal


def _loads(text: str) -> Any:
    return json.loads(text, parse_int=_json_int)


def detect_format(path: Path) -> str:
    if path.suffix == ".parquet":
        return "verl_parquet"
    if path.suffix == ".jsonl":
        return "jsonl"
    if path.suffix == ".json":
        with _open_regular(path) as handle:
            head = handle.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()  # a UTF-8 BOM (Windows editors)
        return "reference_json" if head.startswith(b"[") else "jsonl"
    raise DataError(f"{path}: cannot tell the format from the extension; set data.format to reference_json, "
                    "verl_parquet or jsonl")


def _records(path: Path, fmt: str) -> list[dict[str, Any]]:
    try:
        if fmt == "reference_json":
            data = _loads(path.read_text(encoding="utf-8-sig"))
            if not isinstance(data, list):
                raise DataError(f"{path}: reference JSON must be a list of records, got {type(data).__name__}")
            return data
        if fmt == "jsonl":
            records = []
            # Lines end at '\n' only: str.splitlines also splits at U+2028, U+0085 and other characters that JSON
            # strings may hold unescaped (RFC 8259), which would cut a record in two.
            for number, line in enumerate(path.read_text(encoding="utf-8-sig").split("\n"), 1):
                if line.strip():
                    try:
                        records.append(_loads(line))
                    except json.JSONDecodeError as error:
                        raise DataError(f"{path}:{number}: not valid JSON ({error.msg}); one object per line") from None
            return records
        if fmt == "verl_parquet":
            return _verl_records(path)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON at line {error.lineno} column {error.colno} ({error.msg}); fix "
                        "the file there") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start}); save the file as UTF-8 JSON") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply; records are flat objects") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error}); check data.path") from None
    raise DataError(f"{path}: unknown format {fmt!r}; use reference_json, verl_parquet or jsonl")


def _verl_records(path: Path) -> list[dict[str, Any]]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except pyarrow.ArrowException as error:
        raise DataError(f"{path}: not a readable parquet file ({error}); write it with pyarrow or pandas, or set "
                        "data.format to the file's real format") from None
    if "prompt" not in table.column_names:
        raise DataError(f"{path}: verl parquet without a 'prompt' column (it has {table.column_names}); write "
                        "verl's layout: data_source, prompt, images, reward_model, extra_info")
    return [_from_verl(row) for row in table.to_pylist()]


def _mapping(value: Any) -> dict[str, Any]:
    """A nested parquet field as a dict; any other shape reads as absent (the record check then names it)."""
    return value if isinstance(value, dict) else {}


def _from_verl(row: dict[str, Any]) -> dict[str, Any]:
    messages = row.get("prompt")
    messages = messages if isinstance(messages, list) else []
    text = next((m.get("content", "") for m in messages if isinstance(m, dict) and m.get("role") == "user"), None)
    images = row.get("images")
    images = images if isinstance(images, list) else []
    image = _mapping(images[0]).get("image") if images else None
    extra = _mapping(row.get("extra_info"))
    return {
        "id": str(extra["index"]) if extra.get("index") is not None else None,
        "prompt": text,
        "image_path": image,
        "answer": _mapping(row.get("reward_model")).get("ground_truth"),
        "source": row.get("data_source", ""),
    }


def read_dataset(path: str | Path, fmt: str = "auto", path_map: list[str] | None = None) -> Dataset:
    """Read every record; malformed records raise DataError naming the file, record and field."""
    path = Path(path)
    try:
        regular_file(path, "the data file", "point data.path at a JSON, JSONL or parquet file")
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file; check data.path") from None
    fmt = detect_format(path) if fmt == "auto" else fmt
    records = _records(path, fmt)
    if not records:
        raise DataError(f"{path}: contains no records; point data.path at a non-empty test set")
    pairs = parse_path_map(path_map or [])
    examples = []
    for index, record in enumerate(records):
        where = f"{path}: record {index}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object, got {type(record).__name__}")
        text = record.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: field 'prompt' is missing or empty; every record needs the question text")
        raw_image = record.get("image_path")
        if raw_image is not None and (not isinstance(raw_image, str) or "\x00" in raw_image):
            raise DataError(f"{where}: field 'image_path' must be a string path (without NUL characters)")
        answer = record.get("answer")
        prompt = Prompt(
            id=str(record["id"]) if record.get("id") is not None else str(index),
            text=text,
            image_path=resolve_image_path(raw_image, path.parent, pairs) if raw_image else None,
            source=str(record.get("source") or ""),
        )
        examples.append(Example(prompt, None if answer is None else str(answer).strip()))
    ids = Counter(e.prompt.id for e in examples)
    duplicates = sorted(i for i, n in ids.items() if n > 1)
    if duplicates:
        raise DataError(f"{path}: duplicate record ids {duplicates[:5]}; give every record a unique 'id'")
    return Dataset(path, fmt, examples)


@contextmanager
def _opened(path: str) -> Iterator[Image.Image]:
    """An image with only its header read; refuses missing, unreadable and oversized files with a DataError."""
    try:
        regular_file(path, "the image", "point image_path at an image file")
        with _open_regular(path) as handle, Image.open(handle) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise DataError(f"{path}: image is {image.width}x{image.height}, over {MAX_IMAGE_PIXELS} pixels; "
                                "downscale it")
            if max(image.size) > MAX_ASPECT_RATIO * max(min(image.size), 1) or min(image.size) == 0:
                raise DataError(f"{path}: image is {image.width}x{image.height}, its long side over "
                                f"{MAX_ASPECT_RATIO} times its short side (the Qwen2-VL processor refuses it); crop "
                                "or pad it")
            yield image
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: image not found; fix image_path or add a data.pathMap OLD=NEW rewrite") from None
    # Pillow's decoders report a damaged file with any of these (found by fuzzing, tests/bad_inputs).
    except (OSError, ValueError, EOFError, SyntaxError, IndexError, struct.error,
            Image.DecompressionBombError) as error:
        raise DataError(f"{path}: unreadable image ({type(error).__name__}); replace the file") from None


def load_image(path: str) -> Image.Image:
    """Open an image as RGB, as it is meant to be seen: EXIF orientation applied (a phone's portrait photo is stored
    sideways), transparency composited on white, 16-bit samples scaled to 8 bits (Pillow's convert("RGB") would
    clip them: every value over 255 becomes white). Refuses missing, unreadable and oversized files with a
    DataError."""
    with _opened(path) as image:
        try:
            return to_rgb(ImageOps.exif_transpose(image))
        except (OSError, ValueError, EOFError, SyntaxError, IndexError, struct.error) as error:
            raise DataError(f"{path}: unreadable image ({type(error).__name__}); replace the file") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB (see `load_image`)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grayscale (PNG, TIFF): Pillow opens it as I;16 or as 32-bit I holding 0..65535.
        samples = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(samples / 257.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def placeholder_problem(prompt: Prompt) -> str | None:
    """What is wrong with the prompt's `<image>` placeholders for its image (one image, one placeholder), or None:
    the rule the chat rendering (ttrv.modeling.chat_messages) holds every prompt to."""
    count = prompt.text.count(IMAGE_PLACEHOLDER)
    if count > 1:
        return f"{count} {IMAGE_PLACEHOLDER} placeholders but one image; keep one"
    if count == 1 and prompt.image_path is None:
        return f"has {IMAGE_PLACEHOLDER} but no image_path; add the image or drop the placeholder"
    if count == 0 and prompt.image_path is not None:
        return f"prompt has no {IMAGE_PLACEHOLDER} placeholder; add it where the image goes"
    return None


def require_images(dataset: Dataset) -> Dataset:
    """The dataset, once every prompt's placeholders fit its image and the header of every image it names reads:
    a trainer stops here, before it has written anything, rather than at the step that first samples such a
    record (a permanent failure mid-run)."""
    for index, example in enumerate(dataset.examples):
        if (problem := placeholder_problem(example.prompt)) is not None:
            raise DataError(f"{dataset.path}: record {index} (id {example.prompt.id}): {problem}")
        if example.prompt.image_path is not None:
            try:
                with _opened(example.prompt.image_path):
                    pass
            except DataError as error:
                raise DataError(f"{dataset.path}: record {index} (id {example.prompt.id}): {error}") from None
    return dataset


def check_dataset(dataset: Dataset, choices: str = "ABCD", open_images: bool = True) -> list[str]:
    """Every problem of a dataset, one line each (an empty list means it is usable)."""
    problems = []
    for index, example in enumerate(dataset.examples):
        prompt = example.prompt
        where = f"{dataset.path}: record {index} (id {prompt.id})"
        if IMAGE_PLACEHOLDER not in prompt.text:
            problems.append(f"{where}: prompt has no {IMAGE_PLACEHOLDER} placeholder; add it where the image goes")
        elif (problem := placeholder_problem(prompt)) is not None and prompt.image_path is not None:
            problems.append(f"{where}: {problem}")
        if prompt.image_path is None:
            problems.append(f"{where}: no image_path")
        elif open_images:
            try:
                load_image(prompt.image_path)
            except DataError as error:
                problems.append(f"{where}: {error}")
        options = prompt.options
        if example.answer is not None and options and example.answer not in options:
            problems.append(f"{where}: answer {example.answer!r} is not among the options {sorted(options)}; "
                            "correct the answer or the prompt's option lines")
    return problems


def select_subset(examples: list[Example], size: int | None, seed: int) -> list[Example]:
    """A seeded random subset of `size` examples (all of them when size is None or too large), in file order."""
    if size is None or size >= len(examples):
        return list(examples)
    chosen = sorted(random.Random(seed).sample(range(len(examples)), size))
    return [examples[i] for i in chosen]


def adaptation_prompts(
    examples: list[Example], subset_size: int | None, seed: int, single_example: bool = False, repeats: int = 4
) -> list[Prompt]:
    """The unlabeled prompts to adapt on. Single-example mode: one seeded random example, `repeats` times (the
    reference repeats its one image/prompt 4 times)."""
    if single_example:
        chosen = examples[random.Random(seed).randrange(len(examples))].prompt
        return [Prompt(f"{chosen.id}#{k}", chosen.text, chosen.image_path, chosen.source) for k in range(repeats)]
    return [e.prompt for e in select_subset(examples, subset_size, seed)]
