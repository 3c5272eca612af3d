"""TTRV's label-free reward: read an answer from each sampled response, then reward agreement among the votes.

For one prompt with N sampled responses and extracted answers a_1..a_N (None = no readable answer):

    r_j = count(a_j) / N  -  w * H_norm        if a_j is not None
    r_j = invalid_reward                       if a_j is None

    H_norm = -sum_k p_k log p_k / log K        (p_k: shares of the K distinct valid answers; 0 when K < 2)

The reference counts an unreadable answer as its own vote class "None"; here it is no vote and gets a fixed
penalty (with no unreadable answer both agree exactly). Labels never enter these functions: `vote_stats` takes one
only to compute monitoring numbers (majority accuracy, reward accuracy, pass@N) in evaluation.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

_MARKUP = re.compile(r"[*_`#]+")
_WHITESPACE = re.compile(r"\s+")
# "answer is (B)", "Answer: B", "correct option is B", "answer would be **C**", "Option: D"
_STATED = r"(?:answer|option|choice)\s*(?:is|would\s+be|will\s+be|should\s+be|:|=|-)?\s*(?:is|:)?\s*[\(\[]?\s*({L})\s*[\)\]]?(?![A-Za-z0-9])"
# the whole response is one letter: "B", "B.", "(B)", "[B]", "B)"
_ALONE = r"^\s*[\(\[]?\s*({L})\s*[\)\]\.:]?\s*$"
# the response opens with a letter and a delimiter: "B. chameleon", "(B) chameleon", "B: chameleon"
_LEADING = r"^\s*[\(\[]?\s*({L})\s*(?:[\)\]\.:]|\s-)\s*\S"
# a letter standing alone as a word
_STANDALONE = r"(?<![A-Za-z0-9'’])({L})(?![A-Za-z0-9'’])"
# after a capital "A" these words mean the letter ("A is correct"); any other lowercase word means the article
_LETTER_VERBS = {"is", "was", "seems", "looks", "appears", "fits", "matches", "and", "or"}


def extract_choice(text: str, choices: str = "ABCD") -> str | None:
    """The option letter a response answers with, or None.

    Reads, in order of trust: a stated answer ("the answer is (B)", "Answer: B"; the last one counts), a response
    that is only a letter ("B", "(B)", "**B**"), a letter that opens the response with a delimiter ("B. chameleon"),
    and finally the last letter that stands alone as a word ("I think it is a dog. B"). Lowercase letters never
    count, and a capital "A" followed by a lowercase word is the English article ("A cat is shown" is no answer).
    """
    if not text:
        return None
    letters = "".join(sorted(set(choices)))
    cls = f"[{re.escape(letters)}]"
    # Runs of white space become one space: the patterns' consecutive optional `\s*` would otherwise try every
    # split of a long run (a sampled "answer" followed by 500 spaces took 46 s).
    clean = _WHITESPACE.sub(" ", _MARKUP.sub("", text))
    stated = re.findall(_STATED.format(L=cls), clean, flags=re.IGNORECASE)
    stated = [s for s in stated if s in letters]  # the keyword is case-free, the letter is not
    if stated:
        return stated[-1]
    for pattern in (_ALONE, _LEADING):
        match = re.match(pattern.format(L=cls), clean)
        if match:
            return match.group(1)
    for match in reversed(list(re.finditer(_STANDALONE.format(L=cls), clean))):
        letter = match.group(1)
        following = re.match(r"\s+([a-z]+)", clean[match.end():])
        if letter == "A" and following and following.group(1) not in _LETTER_VERBS:
            continue  # the article "A"
        return letter
    return None


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_number(text: str) -> str | None:
    """The last number in a response, normalised ("1,000.50" -> "1000.5", "3.0" -> "3"), or None."""
    found = _NUMBER.findall(text or "")
    if not found:
        return None
    raw = found[-1].replace(",", "")
    try:
        value = float(raw)
    except ValueError:
        return None
    if math.isinf(value) or math.isnan(value):
        return None
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ANSWER_PREFIX = re.compile(r"^\s*(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)\s*", re.IGNORECASE)


def extract_text(text: str) -> str | None:
    """A free-form answer normalised for voting: first line, no "answer:" prefix, lowercase, no articles or
    punctuation, single spaces (the VQA normalisation). None when nothing is left."""
    first_line = next((line for line in (text or "").splitlines() if line.strip()), "")
    body = _ANSWER_PREFIX.sub("", _MARKUP.sub("", first_line)).lower()
    body = re.sub(r"[^\w\s]", " ", body)
    body = " ".join(_ARTICLES.sub(" ", body).split())
    return body or None


def extract_reference_choice(text: str, choices: str = "ABCD") -> str:
    """The TTRV reference's multiple-choice parsing, `choice_answer_clean_gpqa` in
    verl/utils/reward_score/ttrl/qwen/qwen_math_parser.py (Akshit21112002/TTRV), behaviour for behaviour: the last
    option letter standing alone as a word in the upper-cased response (so "a cat" reads as A), else the response's
    own stripped text. It never returns None: an unreadable response votes with its raw text, and identical texts
    pool into one class (ttt_metrics.py counts `Counter(model_answers)` over whatever was extracted)."""
    pred = (text or "").strip("\n").rstrip(".").rstrip("/").strip(" ").lstrip(":")
    letters = re.findall(rf"\b({'|'.join(re.escape(c) for c in choices)})\b", pred.upper())
    pred = letters[-1] if letters else pred.strip().strip(".")
    return pred.rstrip(".").rstrip("/")


def extract_answer(text: str, extractor: str = "choice", choices: str = "ABCD") -> str | None:
    """Dispatch on the spec's `reward.extractor`."""
    if extractor == "choice":
        return extract_choice(text, choices)
    if extractor == "reference":
        return extract_reference_choice(text, choices)
    if extractor == "numeric":
        return extract_number(text)
    if extractor == "text":
        return extract_text(text)
    raise ValueError(f"reward.extractor: unknown extractor {extractor!r}; use choice, numeric, text or reference")


def normalize_label(label: str | None, extractor: str = "choice", choices: str = "ABCD") -> str | None:
    """A dataset's label in the form `extract_answer` gives a prediction, so that both sides of the comparison pass
    through the same extractor: "3.50" and "1,000" match the predictions "3.5" and "1000", "Yes" matches "yes",
    "a red car" matches "red car", "(B)" matches "B". A label the extractor reads nothing from is kept, stripped."""
    if label is None:
        return None
    return extract_answer(label, extractor, choices) or label.strip()


def normalized_entropy(answers: list[str | None]) -> float:
    """H_norm = -sum_k p_k log p_k / log K over the K distinct valid answers; 0 when K < 2."""
    counts = Counter(a for a in answers if a is not None)
    total = sum(counts.values())
    if len(counts) < 2:
        return 0.0
    entropy = -sum(c / total * math.log(c / total) for c in counts.values())
    return entropy / math.log(len(counts))


def vote_rewards(
    answers: list[str | None], entropy_weight: float = 0.75, invalid_reward: float = -1.0
) -> list[float]:
    """r_j = count(a_j)/N - w * H_norm for a readable answer (N counts every vote, unreadable ones too);
    `invalid_reward` for None."""
    if not answers:
        return []
    counts = Counter(a for a in answers if a is not None)
    penalty = entropy_weight * normalized_entropy(answers)
    n = len(answers)
    return [invalid_reward if a is None else counts[a] / n - penalty for a in answers]


@dataclass(frozen=True)
class VoteStats:
    """Monitoring numbers of one prompt's votes. The label-dependent ones are None without a label."""

    majority: str | None
    majority_ratio: float
    entropy: float
    valid_ratio: float
    majority_correct: bool | None = None
    reward_accuracy: float | None = None
    pass_at_n: bool | None = None


def vote_stats(answers: list[str | None], label: str | None = None) -> VoteStats:
    """Majority answer (ties: the one seen first), its share of all N votes, H_norm, share of readable answers;
    with a label, whether the majority is right, how often "agrees with the majority" equals "is right" (the
    reward accuracy of TTRL), and pass@N (any vote right)."""
    n = len(answers)
    counts = Counter(a for a in answers if a is not None)
    majority = max(counts, key=lambda a: (counts[a], -answers.index(a))) if counts else None
    stats = dict(
        majority=majority,
        majority_ratio=counts[majority] / n if majority is not None else 0.0,
        entropy=normalized_entropy(answers),
        valid_ratio=sum(counts.values()) / n if n else 0.0,
    )
    if label is not None:
        agree = [(a is not None and a == majority) == (a == label) for a in answers]
        stats |= dict(
            majority_correct=majority == label,
            reward_accuracy=sum(agree) / n if n else 0.0,
            pass_at_n=label in counts,
        )
    return VoteStats(**stats)
