"""Perplexity: teacher-forced language modelling of Paul Graham essay excerpts."""

from __future__ import annotations

import random

from lshe.tasks.base import Example, Task
from lshe.tasks.common import check_int, essay_excerpts


class Perplexity(Task):
    """Perplexity of essay excerpts; ``kind="perplexity"``, reported ``score`` is perplexity (lower is better).

    Defaults: 5 examples of ``context_tokens=1000`` tokens each (5k scored tokens give a stable mean;
    the runner's teacher-forced pass over each excerpt is the expensive part, so keep the count low).

    The essays (sorted by file name) are cut, in order, into consecutive excerpts of at most
    ``context_tokens`` tokens that end at sentence boundaries and stay within one essay (see
    `essay_chunks`); the seed picks the first excerpt and the examples are the ``n_examples``
    excerpts that follow it in corpus order. ``prompt`` is the text to score, ``target`` is empty.
    The task only provides text: the runner computes the negative log-likelihood and reports
    ``exp(mean NLL per token)``; `score` is not used (it raises TypeError, as in `Task`).
    ``meta``: essay, first_sentence, tokens.
    """

    name = "perplexity"
    kind = "perplexity"
    metric = "perplexity"

    def __init__(self, n_examples: int = 5, seed: int = 0, context_tokens: int = 1000) -> None:
        super().__init__(n_examples, seed, max_new_tokens=0, chat_template=False, answer_prefix="")
        self.context_tokens = check_int(self.name, "context_tokens", context_tokens, 16)

    def examples(self, tokenizer=None) -> list[Example]:
        chunks = essay_excerpts(self.name, self.n_examples, self.context_tokens, tokenizer)
        start = random.Random(self.seed).randrange(len(chunks))
        examples = []
        for i in range(self.n_examples):
            chunk = chunks[(start + i) % len(chunks)]
            examples.append(
                Example(
                    id=f"{self.name}-s{self.seed}-{i}",
                    prompt=chunk["text"],
                    meta={
                        "essay": chunk["essay"],
                        "first_sentence": chunk["first_sentence"],
                        "tokens": chunk["tokens"],
                    },
                )
            )
        return examples

    def describe(self) -> dict:
        return {**super().describe(), "context_tokens": self.context_tokens, "higher_is_better": False}
