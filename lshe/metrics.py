"""Scorers shared by the tasks: text normalisation, numbers, exact match, ROUGE-L, RULER string match.

Every scorer takes plain strings and returns a float in [0, 1] (or a dict of them), so a task's
`score` is a one-liner and the runner can compare a compressed-cache output with the full-cache one
(`agreement`).
"""

from __future__ import annotations

import re
import string
from decimal import Decimal, InvalidOperation
from functools import lru_cache

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)

# A number: an optional minus sign (only when not glued to a word or another number, so "5-3" and
# "COVID-19" give positive numbers), then either thousands groups "1,234,567(.89)" or plain digits
# "1234(.5)" or a leading-dot decimal ".5". A trailing "." (end of sentence) is not part of it.
_NUMBER = re.compile(
    r"(?P<sign>(?<![\w)\]])-)?(?<![\d.,])(?P<digits>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
)
_MARKERS = re.compile(r"####|answer is", re.IGNORECASE)


def normalize_text(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD style)."""
    text = text.lower().translate(_PUNCT_TABLE)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _canonical_number(sign: str | None, digits: str) -> str | None:
    try:
        value = Decimal(digits.replace(",", ""))
    except InvalidOperation:
        return None
    if sign:
        value = -value
    if value == 0:
        return "0"  # "-0" and "0.00" are the same answer
    return format(value.normalize(), "f")


def _numbers(text: str) -> list[str]:
    found = (_canonical_number(m.group("sign"), m.group("digits")) for m in _NUMBER.finditer(text))
    return [n for n in found if n is not None]


def extract_number(text: str) -> str | None:
    """The answer number of a free-form reply, in a canonical form, or None when there is none.

    Which number: the first one after the last "####" or "answer is" (case-insensitive) when such a
    marker is followed by a number, else the last number in the text. Canonical form: commas removed
    ("1,234" -> "1234"), trailing zeros dropped ("3.50" -> "3.5", "70.0" -> "70"), a leading minus
    kept ("-5"), "-0" -> "0"; a currency sign or a unit after the number is ignored ("$42 apples"
    -> "42"). Two canonical strings are equal exactly when the numbers are equal.
    """
    markers = list(_MARKERS.finditer(text))
    if markers:
        after = _numbers(text[markers[-1].end() :])
        if after:
            return after[0]
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def numeric_match(prediction: str, reference: str) -> float:
    """1.0 when `extract_number` finds the same number in both, else 0.0 (also when either has none)."""
    pred = extract_number(prediction)
    return float(pred is not None and pred == extract_number(reference))


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when both are equal after `normalize_text`, else 0.0."""
    return float(normalize_text(prediction) == normalize_text(reference))


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (``rouge_score``, Porter stemming, its default tokenizer: lower-cased a-z0-9 words).

    Identical texts score 1.0 even when they have no words (two empty outputs agree); otherwise a
    text without words scores 0.0.
    """
    if prediction.strip() == reference.strip():
        return 1.0
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def _check_refs(refs: list[str]) -> list[str]:
    if isinstance(refs, str):
        refs = [refs]
    refs = list(refs)
    if not refs:
        raise ValueError("refs must hold at least one reference string")
    return refs


def string_match_all(prediction: str, refs: list[str]) -> float:
    """RULER's string_match_all: the fraction of ``refs`` contained in the prediction (case-insensitive).

    Containment is a plain substring test, as in RULER ("cat" is found in "category"). A single string
    is taken as one reference; an empty list is a ValueError.
    """
    refs = _check_refs(refs)
    pred = prediction.lower()
    return sum(ref.lower() in pred for ref in refs) / len(refs)


def string_match_part(prediction: str, refs: list[str]) -> float:
    """RULER's string_match_part: 1.0 when any of ``refs`` is contained in the prediction (case-insensitive)."""
    refs = _check_refs(refs)
    pred = prediction.lower()
    return float(any(ref.lower() in pred for ref in refs))


def agreement(prediction: str, full_prediction: str) -> dict[str, float]:
    """How close a compressed-cache output is to the full-cache output: exact match and ROUGE-L."""
    return {
        "exact_match": exact_match(prediction, full_prediction),
        "rouge_l": rouge_l(prediction, full_prediction),
    }
