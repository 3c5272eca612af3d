"""Which examples a run adapts on, evaluates and holds out, and what its report can then claim.

TTRV is transductive by design: it adapts on unlabeled prompts of the test set itself (the reference adapts on
`train.json`, a 20-prompt subset of `test.json`, and evaluates on `test.json`). A held-out split measures
generalisation only if nothing in it was adapted on, so `data.heldoutPath` is checked to share no example with the
adapted prompts, by id and by image + prompt text (a copy of a record under another id is the same example), and
`report.json`'s `setting` says what each number measured.
"""

from __future__ import annotations

from collections.abc import Iterable

from ttrv.data import DataError, Example, Prompt


def example_key(prompt: Prompt) -> tuple[str | None, str]:
    """What makes two records the same example whatever their ids: the image and the prompt text."""
    return prompt.image_path, prompt.text.strip()


def check_disjoint(adapted: Iterable[Prompt], heldout: list[Example], heldout_path: str) -> None:
    """A DataError naming the first shared example when the held-out split overlaps the adapted prompts."""
    adapted = list(adapted)
    ids = {p.id.split("#")[0] for p in adapted}  # single-example mode's copies are "<id>#k"
    keys = {example_key(p) for p in adapted}
    shared = [e.prompt for e in heldout if e.prompt.id in ids or example_key(e.prompt) in keys]
    if shared:
        first = shared[0]
        raise DataError(
            f"data.heldoutPath {heldout_path}: {len(shared)} of its {len(heldout)} examples are adapted on (the "
            f"first: id {first.id!r}, image {first.image_path!r}), so it would not measure generalisation; use a "
            "split that shares no id and no image+prompt with the adapted prompts")


def subset_examples(test: list[Example], adapted: list[Prompt]) -> list[Example]:
    """The labelled test examples of the adapted prompts (for evaluation only), matched by id, then by image +
    prompt text (an adaptation file's copy of a test record may carry another id)."""
    by_id = {e.prompt.id: e for e in test}
    by_key = {example_key(e.prompt): e for e in test}
    found = (by_id.get(p.id) or by_key.get(example_key(p)) for p in adapted)
    return [e for e in found if e is not None]


def setting(test: list[Example], adapted: list[Prompt], heldout: list[Example]) -> dict:
    """What the report's numbers measure: `test` is transductive when adapted prompts are among the test set's (the
    reference's setting and ttrv's default), inductive otherwise; `heldout`, when there is one, is disjoint (checked
    by `check_disjoint`)."""
    test_ids = {e.prompt.id for e in test}
    test_keys = {example_key(e.prompt) for e in test}
    inside = sum(p.id.split("#")[0] in test_ids or example_key(p) in test_keys for p in adapted)
    return {
        "test": "transductive" if inside else "inductive",
        "adapted_prompts_in_test": inside,
        "heldout": "disjoint" if heldout else None,
    }
