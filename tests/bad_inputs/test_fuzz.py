"""Fuzzing with hypothesis: whatever the input, the parsers either return or raise their one documented error.

- ttrv.reward's extractors read any text (model samples are arbitrary) and never raise, and stay fast on long
  runs of white space (a pattern with consecutive optional `\\s*` once took 46 s on 500 spaces).
- The data readers raise only DataError, whatever bytes or JSON structures a file holds, and image decoding of
  damaged files (Pillow raises a zoo of exception types) only DataError.
- parse_spec and load_run_spec raise only SpecError, whatever nested document or YAML text they get.
Example counts are modest for CI; each test names its count.
"""

from __future__ import annotations

import io
import json
import math
import time
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ttrv.data import DataError, check_dataset, load_image, read_dataset
from ttrv.reward import extract_choice, extract_number, extract_text
from ttrv.spec import ExperimentSpec, RunSpec, SpecError, load_run_spec, parse_spec


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# --- answer extraction -------------------------------------------------------------------------------------------

# text with what the extractors look for: option letters, "answer is", brackets, markup, numbers, white space
RESPONSES = st.lists(st.sampled_from(list("ABCDEabcd()[]*_.:,-=0123456789 \n\t") + ["answer", "is ", "Option", "the "]),
                     max_size=80).map("".join) | st.text(max_size=200)
CHOICE_SETS = st.sampled_from(["AB", "ABCD", "ABCDE", "ABCDEFGHIJKLMNOPQRSTUVWXYZ"])


@fuzz(400)
@given(RESPONSES, CHOICE_SETS)
def test_extractors_read_any_text(text, choices):
    letter = extract_choice(text, choices)
    assert letter is None or letter in choices
    number = extract_number(text)
    assert number is None or math.isfinite(float(number))
    normalised = extract_text(text)
    assert normalised is None or normalised == " ".join(normalised.split()) != ""


@pytest.mark.parametrize("text", [
    "answer" + " " * 5000, "answer" + " " * 5000 + "x", "The answer is" + " \n\t" * 3000, "(" * 20_000,
    " " * 20_000 + "B", "A" + " " * 20_000 + "a", "1," * 20_000 + "x", "answer " * 5000,
])
def test_extractors_stay_fast_on_long_runs(text):
    started = time.perf_counter()
    extract_choice(text)
    extract_number(text)
    extract_text(text)
    # linear work is milliseconds; the backtracking this guards against took minutes
    assert time.perf_counter() - started < 2.0


# --- data readers ------------------------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
FIELD = st.sampled_from(["id", "prompt", "image_path", "answer", "source"]) | st.text(max_size=8)
RECORD = st.dictionaries(FIELD, JSON | st.just("<image>\nQ? Options:\nA. x\nB. y"), max_size=6)


def read(path, fmt="auto"):
    """read_dataset, then the checks `ttrv data check` runs (images not opened: a fuzzed path may name a device)."""
    try:
        check_dataset(read_dataset(path, fmt), open_images=False)
    except DataError:
        pass


@fuzz(150)
@given(st.lists(RECORD | JSON, max_size=5) | JSON, st.sampled_from([".json", ".jsonl"]))
def test_readers_raise_only_data_error_on_any_json(tmp_path, document, suffix):
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl" and isinstance(document, list):
        path.write_text("\n".join(json.dumps(item) for item in document))
    else:
        path.write_text(json.dumps(document))
    read(path)


@fuzz(150)
@given(st.binary(max_size=300), st.sampled_from([".json", ".jsonl", ".parquet"]),
       st.sampled_from(["auto", "reference_json", "jsonl", "verl_parquet"]))
def test_readers_raise_only_data_error_on_any_bytes(tmp_path, data, suffix, fmt):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(data)
    read(path, fmt)


VERL_VALUE = st.none() | st.text(max_size=10) | st.integers(0, 9) | st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=10)}), max_size=2)


@fuzz(60)
@given(st.lists(st.fixed_dictionaries({}, optional={
    "prompt": VERL_VALUE, "images": VERL_VALUE, "reward_model": VERL_VALUE, "extra_info": VERL_VALUE,
    "data_source": VERL_VALUE}), min_size=1, max_size=3))
def test_parquet_reader_raises_only_data_error_on_any_columns(tmp_path, rows):
    path = tmp_path / "data.parquet"
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return  # rows whose types no parquet column can hold
    pq.write_table(table, path)
    read(path)


def _image_seeds() -> list[bytes]:
    seeds = []
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "ICO", "PPM", "TGA"):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (10, 20, 30)).save(buffer, fmt)
        seeds.append(buffer.getvalue())
    return seeds


@fuzz(300)
@given(st.sampled_from(_image_seeds()), st.lists(st.tuples(st.integers(0, 600), st.binary(min_size=1, max_size=4)),
                                                  max_size=3), st.integers(4, 800))
def test_damaged_images_raise_only_data_error(tmp_path, seed, patches, cut):
    data = bytearray(seed)
    for position, patch in patches:
        data[position:position + len(patch)] = patch
    path = tmp_path / "image"
    path.write_bytes(bytes(data[:cut]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about the damage it then reports
        try:
            load_image(str(path))
        except DataError:
            pass


# --- specs -------------------------------------------------------------------------------------------------------

def _keys(model) -> list[str]:
    """Every field name of a spec model and its nested models, camelCase, so fuzzed documents reach deep."""
    names = set()
    for name, field in model.model_fields.items():
        names.add(field.alias or name)
        for inner in getattr(field.annotation, "__args__", ()) + (field.annotation,):
            if isinstance(inner, type) and hasattr(inner, "model_fields"):
                names.update(_keys(inner))
    return sorted(names)


SPEC_KEYS = st.sampled_from(sorted(set(_keys(RunSpec)) | set(_keys(ExperimentSpec)))) | st.text(max_size=6)
SPEC_DOC = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2**40) | st.floats() | st.text(max_size=12)
    | st.sampled_from(["s3://b/p", "file://x", "s3://", "a=b", "ttrv://tiny-shapes/test", "service", "NaN"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(SPEC_KEYS, children, max_size=5),
    max_leaves=25,
)


@fuzz(300)
@given(st.dictionaries(SPEC_KEYS, SPEC_DOC, max_size=8) | SPEC_DOC, st.sampled_from([RunSpec, ExperimentSpec]))
def test_parse_spec_raises_only_spec_error(document, model):
    try:
        parse_spec(document, model, "fuzz.yaml")
    except SpecError as error:
        assert str(error).startswith("fuzz.yaml: ")


@fuzz(150)
@given(st.text(max_size=200) | st.text(alphabet=st.sampled_from(list("{}[]:,-!&*|>'\"#% \n\tab1")), max_size=200))
def test_load_run_spec_raises_only_spec_error_on_any_yaml(tmp_path, text):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    try:
        load_run_spec(path)
    except SpecError as error:
        assert str(error).startswith(f"{path}: ")
