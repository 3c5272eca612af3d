"""The data layouts a run can adapt on, and what its report claims: the reference's train.json/test.json layout
(data.adaptPath), the held-out split checked disjoint from what is adapted on (by id, and by image + prompt text),
and report.json's `setting` (issue 16, item 8). Real files: the bundled tiny-shapes test split, rewritten."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ttrv import benchmark
from ttrv.data import DataError, check_dataset, load_image, read_dataset
from ttrv.spec import RunSpec, SpecError, parse_spec
from ttrv.splits import check_disjoint, setting, subset_examples
from ttrv.train import load_examples

pytestmark = pytest.mark.pure


@pytest.fixture(scope="module")
def records():
    path = Path(benchmark.resolve("ttrv://tiny-shapes/test"))
    rows = json.loads(path.read_text())
    for row in rows:  # absolute image paths, so that the rewritten files can live anywhere
        row["image_path"] = str(path.parent / row["image_path"])
    return rows


def write(folder, name, rows):
    path = folder / name
    path.write_text(json.dumps(rows))
    return str(path)


def spec(**data) -> RunSpec:
    return RunSpec.model_validate({"data": data})


def test_the_references_layout_adapts_on_train_json_and_reports_transductive(tmp_path, records):
    test = write(tmp_path, "test.json", records[:60])
    train = write(tmp_path, "train.json", [r | {"id": f"train-{i}"} for i, r in enumerate(records[10:30])])
    examples, prompts, heldout = load_examples(spec(path=test, adaptPath=train))
    assert [p.id for p in prompts] == [f"train-{i}" for i in range(20)]
    # train.json's copies carry other ids: the subset's labels are found by image + prompt text
    assert [e.prompt.id for e in subset_examples(examples, prompts)] == [r["id"] for r in records[10:30]]
    assert setting(examples, prompts, heldout) == {"test": "transductive", "adapted_prompts_in_test": 20,
                                                   "heldout": None}


def test_a_heldout_split_that_shares_an_example_with_the_adapted_prompts_is_refused(tmp_path, records):
    test = write(tmp_path, "test.json", records[:40])
    train = write(tmp_path, "train.json", records[:20])
    renamed = write(tmp_path, "renamed.json", [records[100], records[5] | {"id": "other-id"}])
    same_id = write(tmp_path, "same-id.json", [records[101], records[102] | {"id": records[7]["id"]}])
    for path, first in [(renamed, "other-id"), (same_id, records[7]["id"])]:
        with pytest.raises(DataError, match=f"1 of its 2 examples are adapted on .*id '{first}'"):
            load_examples(spec(path=test, adaptPath=train, heldoutPath=path))
    disjoint = write(tmp_path, "heldout.json", records[200:220])
    examples, prompts, heldout = load_examples(spec(path=test, adaptPath=train, heldoutPath=disjoint))
    assert setting(examples, prompts, heldout)["heldout"] == "disjoint"


def test_the_drawn_subset_is_checked_too_and_single_example_copies_count_as_their_example(records, tmp_path):
    test = write(tmp_path, "test.json", records[:30])
    examples, prompts, _ = load_examples(spec(path=test, subsetSize=10))
    with pytest.raises(DataError):
        check_disjoint(prompts, [e for e in examples if e.prompt.id == prompts[3].id], "h.json")
    _, single, _ = load_examples(spec(path=test, singleExample=True))
    chosen = [e for e in examples if e.prompt.id == single[0].id.split("#")[0]]
    with pytest.raises(DataError):
        check_disjoint(single, chosen, "h.json")


def test_adapt_path_and_single_example_are_one_choice():
    with pytest.raises(SpecError, match="data.adaptPath and data.singleExample"):
        parse_spec({"data": {"path": "t.json", "adaptPath": "a.json", "singleExample": True}}, RunSpec)


def test_the_held_out_split_of_the_bundled_benchmark_is_disjoint_from_its_test_split():
    test = read_dataset(benchmark.resolve("ttrv://tiny-shapes/test")).examples
    heldout = read_dataset(benchmark.resolve("ttrv://tiny-shapes/heldout")).examples
    check_disjoint([e.prompt for e in test], heldout, "ttrv://tiny-shapes/heldout")


def test_the_validation_split_shares_nothing_with_test_or_heldout():
    """Hyper-parameters are chosen on tiny-shapes' validation split, never on test or held-out (issues 16, 19)."""
    def pixels(split):
        examples = read_dataset(benchmark.resolve(f"ttrv://tiny-shapes/{split}")).examples
        return examples, {hashlib.sha256(load_image(e.prompt.image_path).tobytes()).hexdigest() for e in examples}

    validation, validation_images = pixels("validation")
    assert len(validation) == len(validation_images) == 400
    for split in ("test", "heldout"):
        other, images = pixels(split)
        check_disjoint([e.prompt for e in other], validation, f"ttrv://tiny-shapes/{split}")
        assert not validation_images & images  # no image of one split is an image of another


REFERENCE = Path(__file__).parent / "data" / "reference" / "mathvista_20"


def test_the_references_own_mathvista_files_load_as_they_are():
    """The reference's MathVista-20 (tests/data/reference): four-, two-, three-, five- and six-option prompts,
    "(A) 30°" option lines, a train.json of 20 prompts drawn from test.json. `ttrv data check` used to refuse it
    (an E outside reward.choices); its records pass as they are (images are not shipped: --no-images)."""
    train, test = (read_dataset(REFERENCE / f"{name}.json") for name in ("train", "test"))
    assert check_dataset(train, open_images=False) == [] and check_dataset(test, open_images=False) == []
    assert {e.prompt.choices("ABCD") for e in test.examples} >= {"AB", "ABC", "ABCD", "ABCDE"}
    adapted = [e.prompt for e in train.examples]
    assert setting(test.examples, adapted, [])["test"] == "transductive"
    assert len(subset_examples(test.examples, adapted)) == 20
    with pytest.raises(DataError, match="20 of its 490 examples are adapted on"):
        check_disjoint(adapted, test.examples, "test.json")  # test.json is no held-out split for train.json
