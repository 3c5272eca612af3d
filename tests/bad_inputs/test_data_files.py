"""Bad test-set files through `ttrv data check` (the CLI's `main` in this process): exit 3 (exitcodes.BAD_DATA, what
the trainer exits with on the same file), every problem named by file (and record) with its fix, and the folder
left as it was (the check only reads). What the check passes, the run accepts: the same rules refuse the same
records (ttrv.data.placeholder_problem, the image checks of ttrv.data._opened)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bad_inputs.catalogue import Case, cases, check, files_under
from ttrv import exitcodes
from ttrv.data import load_image, read_dataset

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
    # What the run refuses, the check refuses (the chat rendering, the Qwen2-VL processor's aspect-ratio limit).
    ("two-image-placeholders", ("bad.jsonl", jsonl(record(0, prompt="<image> and <image>\n" + PROMPT[8:])), ()),
     ("record 0", "2 <image> placeholders"), "keep one"),
    ("image-extreme-aspect-ratio", ("bad.jsonl", jsonl(record(0, image_path="thin.png")), ()),
     ("record 0", "thin.png", "1000x4", "200 times"), "crop or pad it"),
    # Special files are refused from their stat, never opened for reading (a FIFO blocks, a device never ends).
    ("image-is-a-directory", ("bad.jsonl", jsonl(record(0, image_path="folder.png")), ()),
     ("record 0", "folder.png", "a directory"), "point image_path at an image file"),
    ("image-is-a-device", ("bad.jsonl", jsonl(record(0, image_path="/dev/zero")), ()),
     ("record 0", "/dev/zero", "a device"), "point image_path at an image file"),
    ("file-is-a-directory", ("bad.json", lambda path: path.mkdir(), ()), ("bad.json", "a directory"),
     "point data.path at a JSON, JSONL or parquet file"),
])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    Image.new("RGB", (28, 28), (200, 0, 0)).save(folder / "ok.png")
    (folder / "corrupt.png").write_bytes(b"not a png at all")
    (folder / "truncated.png").write_bytes((folder / "ok.png").read_bytes()[:60])
    # 8000 x 8000 one-bit pixels: a few kB on disk, 64 megapixels (192 MB as RGB) once decoded
    Image.new("1", (8000, 8000)).save(folder / "huge.png")
    Image.new("RGB", (1000, 4)).save(folder / "thin.png")  # 250:1, over the processor's 200
    return folder


@pytest.fixture
def folder(tmp_path, images):
    """A folder with one good image beside the data file, and the bad images the cases name."""
    for image in images.iterdir():
        (tmp_path / image.name).write_bytes(image.read_bytes())
    (tmp_path / "folder.png").mkdir()
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
    assert code == exitcodes.BAD_DATA, stderr


FIFOS = cases("data file", [
    ("image-is-a-fifo", "image", ("record 0 (id 0)", "pipe.png", "FIFO"), "point image_path at an image file"),
    ("file-is-a-fifo", "data", ("pipe.jsonl", "FIFO"), "point data.path at a JSON, JSONL or parquet file"),
])


@pytest.mark.parametrize("case", FIFOS)
def test_data_check_refuses_a_fifo_at_once(case: Case, folder):
    """A FIFO without a writer blocks whoever opens it for reading: the check (a process of its own here, so that
    a hang ends with the test's timeout rather than with the suite) refuses it from its stat, at once."""
    os.mkfifo(folder / ("pipe.png" if case.input == "image" else "pipe.jsonl"))
    path = folder / "test.jsonl"
    path.write_text(jsonl(record(0, image_path="pipe.png")))
    data = path if case.input == "image" else folder / "pipe.jsonl"
    before = files_under(folder)
    started = time.monotonic()
    try:
        result = subprocess.run([sys.executable, "-m", "ttrv.cli", "data", "check", str(data)], capture_output=True,
                                text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"ttrv data check opened the FIFO and hung ({time.monotonic() - started:.0f} s)")
    check(case, result.returncode, result.stderr, sorted(set(files_under(folder)) - set(before)))
    assert result.returncode == exitcodes.BAD_DATA, result.stderr


def test_what_strict_json_holds_is_read_as_written(folder, cli):
    """Accepted, and read as written: an integer of thousands of digits (over Python's int-str limit: json.loads
    raises ValueError), a U+2028 or U+0085 inside a JSONL string (str.splitlines splits there), a .json file with
    a UTF-8 BOM (read as JSONL when the BOM hides its '[')."""
    big = "9" * 5000
    (folder / "big.jsonl").write_text(f'{{"id": {big}, "prompt": {json.dumps(PROMPT)}, "image_path": "ok.png", '
                                      '"answer": "B"}\n')
    odd = PROMPT + "\u2028D2. \u0085more"
    (folder / "odd.jsonl").write_text(json.dumps(record(0, prompt=odd), ensure_ascii=False) + "\n")
    (folder / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([record(0), record(1)]).encode())
    for name, records in (("big.jsonl", 1), ("odd.jsonl", 1), ("bom.json", 2)):
        code, out, err = cli("data", "check", str(folder / name))
        assert code == 0 and "Traceback" not in err, err
        summary = json.loads(out)
        assert summary["records"] == records and summary["format"] == ("reference_json" if name == "bom.json" else
                                                                       "jsonl"), summary
    assert read_dataset(folder / "big.jsonl").prompts[0].id == big
    assert read_dataset(folder / "odd.jsonl").prompts[0].text == odd


def test_images_are_converted_as_they_are_meant_to_be_seen(tmp_path):
    """EXIF orientation applied (a phone stores a portrait photo sideways with Orientation=6), transparency
    composited on white (dropping alpha shows the hidden colour, often black), 16-bit samples scaled to 8 bits
    (Pillow's convert("RGB") clips them: mid-grey 32896 would become white)."""
    sideways = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    sideways.save(tmp_path / "sideways.jpg", exif=exif)
    assert load_image(str(tmp_path / "sideways.jpg")).size == (20, 40)

    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    half.save(tmp_path / "half.png")
    assert load_image(str(tmp_path / "clear.png")).getpixel((0, 0)) == (255, 255, 255)
    assert all(abs(c - 127) <= 1 for c in load_image(str(tmp_path / "half.png")).getpixel((0, 0)))
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.save(tmp_path / "palette.png", transparency=0)
    assert load_image(str(tmp_path / "palette.png")).getpixel((0, 0)) == (255, 255, 255)

    Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16)).save(tmp_path / "grey16.png")
    assert load_image(str(tmp_path / "grey16.png")).getpixel((0, 0)) == (128, 128, 128)
    ramp = np.arange(0, 65536, 4096, dtype=np.uint16).reshape(4, 4)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    values = [load_image(str(tmp_path / "ramp16.png")).getpixel((x, y))[0] for y in range(4) for x in range(4)]
    assert values == sorted(values) and len(set(values)) == 16  # monotone and distinct: scaled, not clipped
