"""RULER-style synthetic tasks: variable tracking (`ruler_vt`) and common words extraction (`ruler_cwe`).

Both follow RULER's prompts and scoring (string_match_all: the fraction of the expected strings
found in the output, case-insensitive), built from the seed without any dataset.
"""

from __future__ import annotations

import random
import string
from functools import lru_cache
from importlib import resources

from lshe.metrics import string_match_all
from lshe.tasks.base import Example, Task, question_of
from lshe.tasks.common import (
    FILLER_SENTENCES,
    check_int,
    count_tokens,
    haystack_budget,
    take_sentences,
)

VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    "{context}\n\n"
    "Question: Find all variables that are assigned the value {value} in the text above."
)
VT_ANSWER_PREFIX = "Answer: The variables that are assigned this value are VAR"

CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
    "{context}\n"
    "Question: What are the {n_common} most common words in the above list?"
)
CWE_ANSWER_PREFIX = "Answer: The top words that appear most often in the list are:"

DEFAULT_CONTEXT_TOKENS = 500
"""`RulerCommonWords`'s prompt length when ``context_tokens`` is None and the tokenizer allows it."""
MAX_DERIVED_CONTEXT_TOKENS = 8000


class _ListTooShort(Exception):
    """A word list at this context length has less noise than the derived default asks for."""


def _join_statements(items: list[str]) -> str:
    """Filler sentences run on in paragraphs; each "VAR ..." statement stands on a line of its own."""
    lines: list[str] = []
    paragraph: list[str] = []
    for item in items:
        if item.startswith("VAR "):
            if paragraph:
                lines.append(" ".join(paragraph))
                paragraph = []
            lines.append(item)
        else:
            paragraph.append(item)
    if paragraph:
        lines.append(" ".join(paragraph))
    return "\n".join(lines)


class RulerVariableTracking(Task):
    """RULER variable tracking: follow chains "VAR AAAAA = 12345." -> "VAR BBBBB = VAR AAAAA." in noise.

    Defaults: 10 examples, ``context_tokens=500`` (prompt length), ``num_chains=1``, ``num_hops=4``
    (RULER's defaults: each chain has num_hops + 1 variables), plain prompt, 30 new tokens, answer
    prefix "Answer: The variables that are assigned this value are VAR". Measured with a full cache,
    SmolLM2-135M-Instruct scores about 0.75 at these defaults (5 examples); the trailing "VAR"
    matters: with RULER's wording ending "...are:" it scored under 0.1 (it copied the filler).

    Variable names are 5 random capital letters, all distinct; each chain starts from its own 5-digit
    value. The statements of every chain are scattered, in chain order, between the filler sentences
    ("The grass is green. ..."), each statement on a line of its own. The question asks for the variables holding
    the first chain's value; ``target`` lists them and ``meta["refs"]`` holds them as a list. Score:
    string_match_all over those variables (recall only: naming extra variables costs nothing, as in
    RULER, so with ``num_chains > 1`` listing every variable scores 1.0).
    """

    name = "ruler_vt"
    metric = "string_match_all"

    def __init__(
        self,
        n_examples: int = 10,
        seed: int = 0,
        context_tokens: int = 500,
        num_chains: int = 1,
        num_hops: int = 4,
        max_new_tokens: int = 30,
        chat_template: bool = False,
        answer_prefix: str = VT_ANSWER_PREFIX,
    ) -> None:
        super().__init__(n_examples, seed, max_new_tokens, chat_template, answer_prefix)
        self.context_tokens = check_int(self.name, "context_tokens", context_tokens, 64)
        self.num_chains = check_int(self.name, "num_chains", num_chains, 1, 20)
        self.num_hops = check_int(self.name, "num_hops", num_hops, 1, 20)

    def _chains(self, rng: random.Random) -> tuple[list[list[str]], list[list[str]], str]:
        """Per chain: its variable names and its statements (first = the value assignment); and the
        first chain's value, the one the question asks about."""
        names: list[str] = []
        while len(names) < self.num_chains * (self.num_hops + 1):
            name = "".join(rng.choices(string.ascii_uppercase, k=5))
            if name not in names:
                names.append(name)
        values = rng.sample(range(10000, 100000), self.num_chains)
        variables, statements = [], []
        for c in range(self.num_chains):
            chain = names[c * (self.num_hops + 1) : (c + 1) * (self.num_hops + 1)]
            variables.append(chain)
            statements.append(
                [f"VAR {chain[0]} = {values[c]}."]
                + [f"VAR {chain[j + 1]} = VAR {chain[j]}." for j in range(self.num_hops)]
            )
        return variables, statements, str(values[0])

    def examples(self, tokenizer=None) -> list[Example]:
        rng = random.Random(self.seed)
        examples = []
        for i in range(self.n_examples):
            variables, statements, value = self._chains(rng)
            chain_text = "\n".join(s for chain in statements for s in chain)
            budget = haystack_budget(
                self.name, VT_TEMPLATE, self.context_tokens, tokenizer, needle=chain_text, value=value
            )
            lines = take_sentences(FILLER_SENTENCES, budget, tokenizer)
            if len(lines) < self.num_hops + 1:
                raise ValueError(
                    f"{self.name}: context_tokens={self.context_tokens} leaves no room for the noise around "
                    f"{self.num_chains} chain(s) of {self.num_hops} hops; raise context_tokens"
                )
            for chain in statements:
                positions = sorted(rng.sample(range(len(lines) + 1), len(chain)))
                for offset, (position, statement) in enumerate(zip(positions, chain, strict=True)):
                    lines.insert(position + offset, statement)
            prompt = VT_TEMPLATE.format(context=_join_statements(lines), value=value)
            examples.append(
                Example(
                    id=f"{self.name}-s{self.seed}-{i}",
                    prompt=prompt,
                    question=question_of(VT_TEMPLATE, value=value),
                    target=" ".join(variables[0]),
                    meta={
                        "refs": variables[0],
                        "value": value,
                        "context_tokens": self.context_tokens,
                        "prompt_tokens": count_tokens(prompt, tokenizer),
                    },
                )
            )
        return examples

    def score(self, prediction: str, example: Example) -> float:
        return string_match_all(prediction, example.meta.get("refs") or example.target.split())

    def describe(self) -> dict:
        return {
            **super().describe(),
            "context_tokens": self.context_tokens,
            "num_chains": self.num_chains,
            "num_hops": self.num_hops,
        }


@lru_cache(maxsize=1)
def english_words() -> tuple[str, ...]:
    """Nouns, verbs and adjectives of the ``wonderwords`` package: lower-case letters only, 3-10 long.

    Sorted and de-duplicated, profanity excluded, so that the list (and the examples) do not depend on
    file order.
    """
    assets = resources.files("wonderwords") / "assets"
    profanity = set((assets / "profanitylist.txt").read_text(encoding="utf-8").lower().split())
    words: set[str] = set()
    for name in ("nounlist.txt", "verblist.txt", "adjectivelist.txt"):
        for word in (assets / name).read_text(encoding="utf-8").split():
            if word.isascii() and word.isalpha() and word.islower() and 3 <= len(word) <= 10:
                words.add(word)
    return tuple(sorted(words - profanity))


def _distinct_words(rng: random.Random, count: int) -> list[str]:
    """``count`` random words none of which contains another (so substring scoring cannot confuse them)."""
    chosen: list[str] = []
    for word in rng.sample(english_words(), min(len(english_words()), 4 * count + 50)):
        if not any(word in other or other in word for other in chosen):
            chosen.append(word)
            if len(chosen) == count:
                return chosen
    raise ValueError(f"could not draw {count} distinct words")


class RulerCommonWords(Task):
    """RULER common words extraction: name the most frequent words of a long numbered list.

    Defaults: 10 examples, ``context_tokens=None`` (prompt length, see below), ``n_common=5`` words
    that appear ``common_repeats=10`` times each, the rest of the list filled with other words
    appearing ``uncommon_repeats=1`` time each, plain prompt, 40 new tokens. Measured with a full
    cache, SmolLM2-135M-Instruct scores about 0.4 at these defaults (5 examples; it tends to repeat
    one word) and about 0.15 with RULER-like settings (1000 tokens, 10 words x 8 vs x 2).

    ``context_tokens=None`` sizes the prompt from the tokenizer: 500 tokens
    (`DEFAULT_CONTEXT_TOKENS`, what SmolLM2's BPE tokenizer gets), or, for a tokenizer that spends
    more tokens per word (tiny-llama's byte tokenizer: one token per character), the smallest multiple
    of 100 tokens above it at which every example's list is at least one third uncommon words (at
    least one uncommon entry per two common ones; SmolLM2's lists at 500 tokens are 37-44% uncommon).
    The length used is in ``meta["context_tokens"]`` and `context_tokens_used`. An explicit
    ``context_tokens`` is taken as given and refused when the common words alone do not fit.

    Words come from the ``wonderwords`` word lists (no word contains another). The list is shuffled
    and written "1. word 2. word ..." as in RULER; the number of uncommon words is the largest that
    keeps the prompt within the context length. ``target`` lists the common words, ``meta["refs"]``
    holds them. Score: string_match_all over the common words.
    """

    name = "ruler_cwe"
    metric = "string_match_all"

    def __init__(
        self,
        n_examples: int = 10,
        seed: int = 0,
        context_tokens: int | None = None,
        n_common: int = 5,
        common_repeats: int = 10,
        uncommon_repeats: int = 1,
        max_new_tokens: int = 40,
        chat_template: bool = False,
        answer_prefix: str = CWE_ANSWER_PREFIX,
    ) -> None:
        super().__init__(n_examples, seed, max_new_tokens, chat_template, answer_prefix)
        self.context_tokens = (
            None if context_tokens is None else check_int(self.name, "context_tokens", context_tokens, 64)
        )
        self.n_common = check_int(self.name, "n_common", n_common, 1, 50)
        self.uncommon_repeats = check_int(self.name, "uncommon_repeats", uncommon_repeats, 1)
        self.common_repeats = check_int(
            self.name, "common_repeats", common_repeats, self.uncommon_repeats + 1
        )
        self.context_tokens_used: int | None = self.context_tokens  # set by `examples` when derived

    def _prompt(self, common: list[str], uncommon: list[str], shuffle_seed: str) -> str:
        words = common * self.common_repeats + uncommon * self.uncommon_repeats
        random.Random(shuffle_seed).shuffle(words)
        context = " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))
        return CWE_TEMPLATE.format(context=context, n_common=self.n_common)

    def examples(self, tokenizer=None) -> list[Example]:
        if self.context_tokens is not None:
            return self._examples(self.context_tokens, tokenizer, min_uncommon_entries=0)
        # Enough noise that the common words are at most two thirds of the list.
        min_uncommon_entries = -(-self.n_common * self.common_repeats // 2)
        for context_tokens in range(DEFAULT_CONTEXT_TOKENS, MAX_DERIVED_CONTEXT_TOKENS + 1, 100):
            try:
                examples = self._examples(context_tokens, tokenizer, min_uncommon_entries)
            except _ListTooShort:
                continue
            self.context_tokens_used = context_tokens
            return examples
        raise ValueError(
            f"{self.name}: no context_tokens up to {MAX_DERIVED_CONTEXT_TOKENS} holds n_common={self.n_common} "
            f"words x {self.common_repeats} with {min_uncommon_entries} uncommon entries for this tokenizer; "
            "set context_tokens"
        )

    def _examples(self, context_tokens: int, tokenizer, min_uncommon_entries: int) -> list[Example]:
        """The examples at ``context_tokens``; `_ListTooShort` when a list has fewer than
        ``min_uncommon_entries`` uncommon entries, ValueError when the common words alone do not fit."""
        rng = random.Random(self.seed)
        max_uncommon = context_tokens // (2 * self.uncommon_repeats)
        examples = []
        for i in range(self.n_examples):
            words = _distinct_words(rng, self.n_common + max_uncommon)
            common, pool = words[: self.n_common], words[self.n_common :]
            shuffle_seed = f"{self.seed}-{i}"

            def fits(k: int, common=common, pool=pool, shuffle_seed=shuffle_seed) -> bool:
                prompt = self._prompt(common, pool[:k], shuffle_seed)
                return count_tokens(prompt, tokenizer) <= context_tokens

            needed = -(-min_uncommon_entries // self.uncommon_repeats)  # uncommon words
            if needed and (needed > len(pool) or not fits(needed)):
                raise _ListTooShort
            if not fits(0):
                raise ValueError(
                    f"{self.name}: context_tokens={context_tokens} is too small for n_common="
                    f"{self.n_common} words repeated {self.common_repeats} times; raise context_tokens"
                )
            # Largest k with fits(k): grow k geometrically until it does not fit (so that no prompt
            # much longer than the context is ever tokenized), then bisect.
            low, high, probe = 0, len(pool), 1
            while probe <= high and fits(probe):
                low, probe = probe, 3 * probe
            high = min(high, probe - 1)
            while low < high:
                mid = (low + high + 1) // 2
                low, high = (mid, high) if fits(mid) else (low, mid - 1)
            prompt = self._prompt(common, pool[:low], shuffle_seed)
            examples.append(
                Example(
                    id=f"{self.name}-s{self.seed}-{i}",
                    prompt=prompt,
                    question=question_of(CWE_TEMPLATE, n_common=self.n_common),
                    target=", ".join(common),
                    meta={
                        "refs": common,
                        "n_uncommon": low,
                        "context_tokens": context_tokens,
                        "prompt_tokens": count_tokens(prompt, tokenizer),
                    },
                )
            )
        return examples

    def score(self, prediction: str, example: Example) -> float:
        return string_match_all(prediction, example.meta.get("refs") or example.target.split(", "))

    def describe(self) -> dict:
        return {
            **super().describe(),
            "context_tokens": self.context_tokens,
            "context_tokens_used": self.context_tokens_used,
            "n_common": self.n_common,
            "common_repeats": self.common_repeats,
            "uncommon_repeats": self.uncommon_repeats,
        }
