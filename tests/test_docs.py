"""The README stays true: it opens with the two set-up commands, its spec table is the one generated from the
pydantic models (`ttrv spec docs`), and every repository path it and docs/ name exists. (Its commands are run by
test_readme_commands.py.)"""

import re
from pathlib import Path

import pytest
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


@pytest.mark.pure
def test_every_repository_path_the_docs_name_exists():
    """A path under one of the repository's top-level entries (`tests/faults/`, `examples/experiment-*.yaml`,
    `ttrv/spec.py`), in prose or in a block, and every relative link target, exists in the checkout."""
    ignored = {line.strip().strip("/") for line in (ROOT / ".gitignore").read_text().splitlines()} | {".git"}
    tops = sorted((p.name for p in ROOT.iterdir() if p.name not in ignored), key=len, reverse=True)
    # not after a character that makes it part of something else: a URL, an image name, s3://bucket/ttrv/...
    mention = re.compile(r"(?<![\w./:@<{-])((?:" + "|".join(map(re.escape, tops)) + r")/[\w.*/-]*)")
    link = re.compile(r"\]\(([^)\s#]+)")
    missing = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        named = {ROOT / m.rstrip(".,;:") for m in mention.findall(text)}
        named |= {doc.parent / target for target in link.findall(text) if "://" not in target}
        for path in named:
            if not (any(ROOT.glob(str(path.relative_to(ROOT)))) if "*" in path.name else path.exists()):
                missing.append(f"{doc.relative_to(ROOT)}: {path.relative_to(ROOT)}")
    assert not missing, missing
    assert mention.search("(`tests/test_resume.py`)") and not mention.search("s3://ttrv/experiments/team-a")
