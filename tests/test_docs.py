"""The README stays true: it opens with the two set-up commands, and its spec table is the one generated from the
pydantic models (`ttrv spec docs`)."""

from pathlib import Path

import yaml

from ttrv.docs import BEGIN, END, fields_table
from ttrv.spec import load_run_spec

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_opens_with_the_two_commands():
    block = README.split("```bash\n", 1)[1].split("```", 1)[0]
    assert [line.split()[:2] for line in block.splitlines()] == [["make", "demo"], ["make", "test"]]


def test_readme_spec_table_is_generated_from_the_models():
    current = README[README.index(BEGIN) : README.index(END) + len(END)]
    assert current == fields_table(), "the README's spec table is stale: paste the output of `ttrv spec docs`"


def test_every_example_run_spec_loads():
    for path in sorted((ROOT / "examples").glob("tiny*.yaml")):
        assert load_run_spec(path).name == yaml.safe_load(path.read_text())["name"]
