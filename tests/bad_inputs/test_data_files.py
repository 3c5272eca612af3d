"""Bad test-set files through `ttrv data check` (the CLI's `main` in this process): exit 1, every problem named by
file (and record) with its fix, and the folder left as it was (the check only reads)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bad_inputs.catalogue import Case, cases, check, files_under

PROMPT = "<image>\nWhich shape is shown? Options:\nA. circle\nB. square\nC. triangle\nD. star"


def record(i: int = 0, **fields) -> dict:
    return {"id": str(i), "prompt": PROMPT, "image_path": "ok.png", "answer": "B"} | fields


def jsonl(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def parquet(rows: list[dict]):
    return lambda path: pq.write_table(pa.Table.from_pylist(rows), path)


# (file name, content: text, bytes or a writer, extra CLI arguments)
DATA = cases("data file", [
    ("malformed-json", ("bad.json", '[{"id": "0", "prompt": ', ()), ("bad.json", "line 1 column"),
     "fix the file there"),
    ("jsonl-bad-line", ("bad.jsonl", jsonl(record(0)) + "{oops\n", ()), ("bad.jsonl:2",), "one object per line"),
    ("not-utf8", ("bad.jsonl", b'{"prompt": "\xff\xfe"}\n', ()), ("bad.jsonl",), "save the file as UTF-8"),
    ("too-deep", ("bad.json", "[" * 100_000 + "]" * 100_000, ()), ("bad.json",), "records are flat objects"),
    ("empty-file", ("bad.json", "", ()), ("bad.json",), "point data.path at a non-empty test set"),
    ("empty-list", ("bad.json", "[]", ()), ("bad.json",), "point data.path at a non-empty test set"),
    ("top-level-object", ("bad.json", json.dumps({"records": [record()]}), ("--format", "reference_json")),
     ("bad.json",), "must be a list of records"),
    ("record-not-object", ("bad.json", "[1, 2]", ()), ("bad.json: record 0",), "expected an object"),
    ("prompt-missing", ("bad.json", json.dumps([record(), {"id": "1", "image_path": "ok.png"}]), ()),
     ("bad.json: record 1", "'prompt'"), "every record needs the question text"),
    ("image-path-not-string", ("bad.json", json.dumps([record(image_path=["ok.png"])]), ()),
     ("bad.json: record 0", "'image_path'"), "must be a string path"),
    ("duplicate-ids", ("bad.jsonl", jsonl(record(3), record(3)), ()), ("bad.jsonl", "['3']"),
     "give every record a unique 'id'"),
    ("image-missing", ("bad.jsonl", jsonl(record(0), record(1, image_path="gone.png")), ()),
     ("record 1 (id 1)", "gone.png"), "fix image_path or add a data.pathMap OLD=NEW rewrite"),
    ("image-corrupt", ("bad.jsonl", jsonl(record(0, image_path="corrupt.png")), ()),
     ("record 0", "corrupt.png"), "replace the file"),
    ("image-truncated", ("bad.jsonl", jsonl(record(0, image_path="truncated.png")), ()),
     ("record 0", "truncated.png"), "replace the file"),
    ("image-decompression-bomb", ("bad.jsonl", jsonl(record(0, image_path="huge.png")), ()),
     ("record 0", "huge.png", "8000x8000"), "downscale it"),
    ("prompt-without-image-placeholder", ("bad.jsonl", jsonl(record(0, prompt=PROMPT.replace("<image>\n", ""))), ()),
     ("record 0", "<image>"), "add it where the image goes"),
    ("answer-not-an-option", ("bad.jsonl", jsonl(record(0, answer="E")), ()), ("record 0", "'E'"),
     "correct the answer or the prompt's option lines"),
    ("parquet-without-prompt-column", ("bad.parquet", parquet([{"question": "x", "answer": "B"}]), ()),
     ("bad.parquet", "'prompt'"), "write verl's layout"),
    ("parquet-garbage", ("bad.parquet", b"PAR1 this is not parquet", ()), ("bad.parquet",),
     "not a readable parquet file"),
    ("unknown-extension", ("bad.csv", "id,prompt\n0,x\n", ()), ("bad.csv",),
     "set data.format to reference_json, verl_parquet or jsonl"),
    ("path-map-without-equals", ("bad.jsonl", jsonl(record(0)), ("--path-map", "/authors/imgs")),
     ("path map '/authors/imgs'",), "is not OLD=NEW"),
    ("file-missing", ("absent.json", None, ()), ("absent.json",), "no such data file; check data.path"),
])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    Image.new("RGB", (28, 28), (200, 0, 0)).save(folder / "ok.png")
    (folder / "corrupt.png").write_bytes(b"not a png at all")
    (folder / "truncated.png").write_bytes((folder / "ok.png").read_bytes()[:60])
    # 8000 x 8000 one-bit pixels: a few kB on disk, 64 megapixels (192 MB as RGB) once decoded
    Image.new("1", (8000, 8000)).save(folder / "huge.png")
    return folder


@pytest.fixture
def folder(tmp_path, images):
    """A folder with one good image beside the data file, and the bad images the cases name."""
    for image in images.iterdir():
        (tmp_path / image.name).write_bytes(image.read_bytes())
    return tmp_path


@pytest.mark.parametrize("case", DATA)
def test_data_check_rejects_the_file(case: Case, folder, cli):
    name, content, args = case.input
    path = folder / name
    if callable(content):
        content(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    before = files_under(folder)
    code, _, stderr = cli("data", "check", str(path), *args)
    assert str(path) in stderr or "path map" in stderr, stderr
    check(case, code, stderr, sorted(set(files_under(folder)) - set(before)))
