"""Summarization of essay excerpts, scored against the full-cache model's own summary."""

from __future__ import annotations

import random

from lshe.metrics import rouge_l
from lshe.tasks.base import Example, Task, question_of
from lshe.tasks.common import check_int, essay_excerpts

TEMPLATE = (
    "Here is an excerpt from an essay by Paul Graham.\n\n"
    "{text}\n\n"
    "Summarize the excerpt above in two or three sentences."
)


class Summarize(Task):
    """Summarize a Paul Graham essay excerpt; metric ``rouge_l_vs_full``.

    Defaults: 10 examples, excerpts of ``context_tokens=800`` tokens (half to all of it; the prompt
    adds about 30 tokens), chat template on, 96 new tokens.

    Excerpts are consecutive sentences of one essay (see `essay_chunks`), drawn at random from the
    seed. There is no reference summary: ``target`` is empty and the runner scores against a copy of
    the example whose target is the full-cache output, so `score` is the ROUGE-L F-measure of a compressed-cache summary against the
    full-cache one (1.0 for the full cache itself). ``meta``: essay, first_sentence, tokens.
    """

    name = "summarize"
    metric = "rouge_l_vs_full"
    target_from_reference = True

    def __init__(
        self,
        n_examples: int = 10,
        seed: int = 0,
        context_tokens: int = 800,
        max_new_tokens: int = 96,
        chat_template: bool = True,
        answer_prefix: str = "",
    ) -> None:
        super().__init__(n_examples, seed, max_new_tokens, chat_template, answer_prefix)
        self.context_tokens = check_int(self.name, "context_tokens", context_tokens, 32)

    def examples(self, tokenizer=None) -> list[Example]:
        chunks = essay_excerpts(self.name, self.n_examples, self.context_tokens, tokenizer)
        chosen = random.Random(self.seed).sample(chunks, self.n_examples)
        return [
            Example(
                id=f"{self.name}-s{self.seed}-{i}",
                prompt=TEMPLATE.format(text=chunk["text"]),
                question=question_of(TEMPLATE, "text"),
                meta={
                    "essay": chunk["essay"],
                    "first_sentence": chunk["first_sentence"],
                    "tokens": chunk["tokens"],
                },
            )
            for i, chunk in enumerate(chosen)
        ]

    def score(self, prediction: str, example: Example) -> float:
        """ROUGE-L F-measure against ``example.target``: the full-cache summary (`target_from_reference`)."""
        if not example.target:
            raise ValueError(
                f"{self.name}: example {example.id} has no target; the runner must set it to the "
                "full-cache summary before scoring (metric rouge_l_vs_full)"
            )
        return rouge_l(prediction, example.target)

    def describe(self) -> dict:
        return {**super().describe(), "context_tokens": self.context_tokens}
