"""Helpers shared by the task modules: argument checks, token counting, haystacks and needles.

Lengths are in tokens of the model's tokenizer when one is given to `Task.examples`, else estimated
at `CHARS_PER_TOKEN` characters per token (about right for English and Llama/SmolLM-style BPE
tokenizers). A tokenizer here is anything with ``encode(text, add_special_tokens=False) -> list``,
which every Hugging Face tokenizer has.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

CHARS_PER_TOKEN = 4.0

FILLER_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
"""The repeated noise of the passkey and RULER variable-tracking tasks."""


# ---------------------------------------------------------------------------------------------- checks


def check_int(task: str, arg: str, value: object, low: int, high: int | None = None) -> int:
    """Return ``value`` if it is an int in [low, high] (high None = no upper bound), else ValueError."""
    allowed = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{task}: {arg} must be {allowed}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{task}: {arg} must be {allowed}, got {value!r}")
    return value


def check_bool(task: str, arg: str, value: object) -> bool:
    """Return ``value`` if it is a bool, else ValueError: task keys are untyped, so ``chat_template=no``
    arrives as the string ``'no'``, which Python would take as true."""
    if not isinstance(value, bool):
        raise ValueError(f"{task}: {arg} must be true or false, got {value!r}")
    return value


def check_fraction(task: str, arg: str, value: object) -> float:
    """Return ``value`` as a float if it is a number in [0, 1], else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{task}: {arg} must be a number in [0, 1], got {value!r}")
    return float(value)


def as_list(task: str, arg: str, value: object) -> list:
    """A scalar becomes a one-item list; a list/tuple (or Hydra ListConfig) a list; empty is a ValueError."""
    items = [value] if isinstance(value, (int, float, str)) else list(value)  # type: ignore[arg-type]
    if not items:
        raise ValueError(f"{task}: {arg} must be a number or a non-empty list, got {value!r}")
    return items


# ---------------------------------------------------------------------------------------------- tokens


def token_cost(text: str, tokenizer=None) -> float:
    """Tokens of ``text``: exact with a tokenizer, else ``len(text) / CHARS_PER_TOKEN`` (a float)."""
    if tokenizer is None:
        return len(text) / CHARS_PER_TOKEN
    return float(len(tokenizer.encode(text, add_special_tokens=False)))


def count_tokens(text: str, tokenizer=None) -> int:
    """`token_cost` rounded to an int."""
    return round(token_cost(text, tokenizer))


def take_sentences(sentences: Sequence[str], budget: float, tokenizer=None, start: int = 0) -> list[str]:
    """Consecutive sentences from index ``start`` (wrapping around) whose total cost stays <= budget.

    Each sentence is costed as it appears in a space-joined text (with a leading space), so that
    ``" ".join(result)`` is within one sentence of ``budget`` tokens. The corpus is reused from its
    beginning when it runs out.
    """
    if not sentences:
        raise ValueError("no sentences to take from")
    taken: list[str] = []
    total = 0.0
    i = start % len(sentences)
    while True:
        sentence = sentences[i]
        cost = max(token_cost(" " + sentence, tokenizer), 1.0)
        if total + cost > budget:
            return taken
        taken.append(sentence)
        total += cost
        i = (i + 1) % len(sentences)


def insert_at_depth(
    sentences: list[str], needle: str, depth: float, tokenizer=None
) -> tuple[list[str], float]:
    """Insert ``needle`` between sentences at the boundary nearest ``depth`` (fraction of the tokens).

    Returns the new list and the depth actually used (tokens before the needle / all haystack tokens):
    0.0 puts the needle first, 1.0 last.
    """
    costs = [max(token_cost(" " + s, tokenizer), 1.0) for s in sentences]
    total = sum(costs)
    if total == 0:
        return [needle], 0.0
    best_index, best_depth, cumulative = 0, 0.0, 0.0
    for index in range(len(sentences) + 1):
        fraction = cumulative / total
        if abs(fraction - depth) < abs(best_depth - depth):
            best_index, best_depth = index, fraction
        if index < len(costs):
            cumulative += costs[index]
    return sentences[:best_index] + [needle] + sentences[best_index:], best_depth


def haystack_budget(
    task: str,
    template: str,
    context_tokens: int,
    tokenizer=None,
    needle: str = "",
    key: str = "context_tokens",
    **fields: str,
) -> float:
    """Tokens left for the haystack once ``template`` holding only ``needle`` as its context is counted.

    ValueError naming ``key`` (the task's argument that gave ``context_tokens``) when fewer than 16
    tokens would be left.
    """
    overhead = token_cost(template.format(context=needle, **fields), tokenizer)
    budget = context_tokens - overhead
    if budget < 16:
        raise ValueError(
            f"{task}: {key} must be at least {int(overhead) + 16} for this prompt, got {context_tokens}"
        )
    return budget


# ---------------------------------------------------------------------------------------------- essays

_MONTH_LINE = re.compile(
    r"^\s*(January|February|March|April|May|June|July|August|September|October|November|December)"
    r"\s+\d{4}"
)
_FOOTNOTE = re.compile(r"\[\s*\d+\s*\]")
# The essays' files lost the blank lines between paragraphs: "accelerating.We wouldn't".
_GLUED_SENTENCE = re.compile(r"([a-z0-9%)][.!?][\"'”’)]?)([A-Z][a-z])")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'”’)])\s+")


def clean_essay(text: str) -> str:
    """One essay as plain prose: date line, footnote marks and hard line breaks removed.

    The Paul Graham essay files start with a date glued to the first word ("July 2010What ..."), carry
    footnote marks ("[1]"), are hard-wrapped, and have paragraphs glued together ("end.Next").
    """
    text = _MONTH_LINE.sub("", text)
    text = _FOOTNOTE.sub(" ", text)
    text = " ".join(text.split())
    return _GLUED_SENTENCE.sub(r"\1 \2", text).strip()


def split_sentences(text: str) -> list[str]:
    """Split prose at ".", "!" or "?" (optionally followed by a quote or bracket) and whitespace."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def load_essays() -> list[tuple[str, list[str]]]:
    """The Paul Graham essays (`lshe.assets.paul_graham_essays`) as (file name, sentences), by name.

    Essays that are empty after cleaning are skipped. The asset is fetched on first use.
    """
    from lshe import assets

    essays = []
    for name, text in sorted(assets.paul_graham_essays()):
        sentences = split_sentences(clean_essay(text))
        if sentences:
            essays.append((name, sentences))
    if not essays:
        raise RuntimeError("the Paul Graham essays asset holds no text")
    return essays


def essay_chunks(essays: list[tuple[str, list[str]]], chunk_tokens: int, tokenizer=None) -> list[dict]:
    """Cut each essay, in order, into consecutive excerpts of at most ``chunk_tokens`` tokens.

    Excerpts end at sentence boundaries and never cross essays; the tail of an essay shorter than
    half a chunk is dropped (so every excerpt holds about half to all of ``chunk_tokens``). Each chunk
    is ``{"essay": name, "first_sentence": index, "text": str, "tokens": int}``.
    """
    chunks = []
    for name, sentences in essays:
        start = 0
        while start < len(sentences):
            taken, total = [], 0.0
            for sentence in sentences[start:]:
                cost = max(token_cost(" " + sentence, tokenizer), 1.0)
                if taken and total + cost > chunk_tokens:
                    break
                taken.append(sentence)
                total += cost
            text = " ".join(taken)
            tokens = count_tokens(text, tokenizer)
            if tokens >= chunk_tokens / 2:
                chunks.append({"essay": name, "first_sentence": start, "text": text, "tokens": tokens})
            start += len(taken)
    return chunks


def essay_excerpts(task: str, n_examples: int, chunk_tokens: int, tokenizer=None) -> list[dict]:
    """The essays' excerpts (`essay_chunks`), checking that there are at least ``n_examples``."""
    chunks = essay_chunks(load_essays(), chunk_tokens, tokenizer)
    if n_examples > len(chunks):
        raise ValueError(
            f"{task}: the essays hold only {len(chunks)} excerpts of context_tokens={chunk_tokens} tokens, "
            f"fewer than the {n_examples} examples asked (n_examples or limit): use a smaller context_tokens"
        )
    return chunks
