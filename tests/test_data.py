"""Data readers on real files: reference JSON, verl parquet, JSONL, images on disk."""

import dataclasses
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ttrv.data import (
    DataError,
    Example,
    Prompt,
    adaptation_prompts,
    check_dataset,
    read_dataset,
    select_subset,
)

# Pure logic, no process or server: `make test-fast` runs these.
pytestmark = pytest.mark.pure

PROMPT = "<image>\nWhat colour is the shape? Options:\nA. red\nB. blue\nC. green\nD. yellow"


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (28, 28), (40 * i, 0, 0)).save(folder / f"{i}.png")
    return folder


def records(n=6, image_root="/authors/machine/imgs"):
    return [
        {"id": str(i), "prompt": PROMPT, "image_path": f"{image_root}/{i}.png", "answer": "ABCD"[i % 4], "source": "t"}
        for i in range(n)
    ]


def test_reference_json_with_path_map(tmp_path, images):
    path = tmp_path / "test.json"
    path.write_text(json.dumps(records()))
    dataset = read_dataset(path, path_map=[f"/authors/machine/imgs={images}"])
    assert dataset.format == "reference_json" and len(dataset.examples) == 6
    assert dataset.examples[1].prompt.image_path == str(images / "1.png")
    assert dataset.examples[1].answer == "B"
    assert dataset.examples[0].prompt.options == {"A": "red", "B": "blue", "C": "green", "D": "yellow"}
    assert check_dataset(dataset) == []


def test_prompts_with_more_options_than_reward_choices_load_as_they_are(tmp_path, images):
    """The reference's MathVista file has a five-option prompt among four-option ones; each prompt's options are
    its own (reward.choices is the fallback for prompts without option lines), so the file passes as it is."""
    rows = records()
    rows[0] |= {"prompt": PROMPT.replace("D. yellow", "D. yellow\nE. purple"), "answer": "E"}
    path = tmp_path / "mathvista.json"
    path.write_text(json.dumps(rows))
    dataset = read_dataset(path, path_map=[f"/authors/machine/imgs={images}"])
    assert check_dataset(dataset, choices="ABCD") == []
    assert [e.prompt.choices("ABCD") for e in dataset.examples[:2]] == ["ABCDE", "ABCD"]


def test_relative_image_paths_resolve_against_the_data_file(tmp_path, images):
    path = tmp_path / "test.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records(image_root="imgs")) + "\n")
    dataset = read_dataset(path)
    assert dataset.format == "jsonl"
    assert dataset.examples[2].prompt.image_path == str(tmp_path / "imgs" / "2.png")
    assert check_dataset(dataset) == []


def test_verl_parquet(tmp_path, images):
    rows = [
        {
            "data_source": "imagenet-r",
            "prompt": [{"role": "user", "content": PROMPT}],
            "images": [{"image": str(images / f"{i}.png")}],
            "reward_model": {"style": "rule", "ground_truth": "C"},
            "extra_info": {"split": "test", "index": i},
        }
        for i in range(3)
    ]
    path = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    dataset = read_dataset(path)
    assert dataset.format == "verl_parquet"
    assert [e.prompt.id for e in dataset.examples] == ["0", "1", "2"]
    assert dataset.examples[0].answer == "C" and dataset.examples[0].prompt.source == "imagenet-r"
    assert check_dataset(dataset) == []


def test_training_prompts_carry_no_label_by_type():
    assert "answer" not in {f.name for f in dataclasses.fields(Prompt)}
    examples = [Example(Prompt(str(i), PROMPT, None), "A") for i in range(10)]
    prompts = adaptation_prompts(examples, subset_size=4, seed=1)
    assert all(type(p) is Prompt for p in prompts)
    assert not any(hasattr(p, "answer") for p in prompts)


def test_subset_is_seeded_and_in_file_order():
    examples = [Example(Prompt(str(i), PROMPT, None), None) for i in range(50)]
    first = [e.prompt.id for e in select_subset(examples, 20, seed=3)]
    assert first == [e.prompt.id for e in select_subset(examples, 20, seed=3)]
    assert first != [e.prompt.id for e in select_subset(examples, 20, seed=4)]
    assert first == sorted(first, key=int) and len(set(first)) == 20
    assert len(select_subset(examples, None, 0)) == 50 and len(select_subset(examples, 500, 0)) == 50


def test_single_example_mode_repeats_one_prompt():
    examples = [Example(Prompt(str(i), PROMPT, f"{i}.png"), None) for i in range(10)]
    prompts = adaptation_prompts(examples, subset_size=None, seed=7, single_example=True, repeats=4)
    assert len(prompts) == 4 and len({p.image_path for p in prompts}) == 1
    assert len({p.id for p in prompts}) == 4  # distinct ids keep the data cursor exact


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        ("[{\"prompt\": ", "broken.json", "not valid JSON"),
        ("{\"a\": 1}\n{oops\n", "broken.jsonl", "broken.jsonl:2: not valid JSON"),
        ("[]", "empty.json", "contains no records"),
        ("[{\"id\": \"1\", \"image_path\": \"x.png\"}]", "noprompt.json", "field 'prompt' is missing"),
        ("[1, 2]", "numbers.json", "expected an object"),
        ("[{\"id\": \"1\", \"prompt\": \"p\"}, {\"id\": \"1\", \"prompt\": \"q\"}]", "dup.json", "duplicate record ids"),
        ("{\"prompt\": \"p\"}", "obj.json", None),  # a single JSON object reads as JSONL of one record
        ("x", "data.csv", "cannot tell the format"),
    ],
)
def test_malformed_files(tmp_path, content, name, message):
    path = tmp_path / name
    path.write_text(content)
    if message is None:
        assert len(read_dataset(path).examples) == 1
        return
    with pytest.raises(DataError, match=message):
        read_dataset(path)


def test_missing_file():
    with pytest.raises(DataError, match="no such data file"):
        read_dataset("/nonexistent/test.json")


def test_check_reports_every_problem(tmp_path, images):
    (images / "corrupt.png").write_bytes(b"not a png")
    bad = records(4, image_root=str(images))
    bad[0]["image_path"] = str(images / "missing.png")
    bad[1]["image_path"] = str(images / "corrupt.png")
    bad[2]["prompt"] = PROMPT.replace("<image>\n", "")
    bad[3]["answer"] = "E"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    problems = check_dataset(read_dataset(path))
    assert len(problems) == 4
    assert "image not found" in problems[0] and "data.pathMap" in problems[0]
    assert "unreadable image" in problems[1]
    assert "no <image> placeholder" in problems[2]
    assert "answer 'E' is not among the options" in problems[3]


def test_huge_image_is_refused_without_decoding(tmp_path):
    from ttrv.data import load_image

    path = tmp_path / "huge.png"
    Image.new("1", (8000, 8000)).save(path)
    with pytest.raises(DataError, match="downscale"):
        load_image(str(path))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ttrv.cli", *args], capture_output=True, text=True, timeout=120)


def test_data_check_cli(tmp_path, images):
    path = tmp_path / "test.json"
    path.write_text(json.dumps(records()))
    ok = run_cli("data", "check", str(path), "--path-map", f"/authors/machine/imgs={images}")
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout)
    assert summary["records"] == 6 and summary["option_letters"] == ["A", "B", "C", "D"]
    missing = run_cli("data", "check", str(path))
    assert missing.returncode == 3  # exitcodes.BAD_DATA, as the trainer on the same file
    assert "image not found" in missing.stderr and "Traceback" not in missing.stderr
    absent = run_cli("data", "check", str(tmp_path / "nope.json"))
    assert absent.returncode == 3 and "no such data file" in absent.stderr


def test_cli_help():
    assert run_cli("--help").returncode == 0
    assert "--path-map" in run_cli("data", "check", "--help").stdout
