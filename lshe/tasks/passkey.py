"""Passkey retrieval: find a 5-digit key hidden in repeated filler sentences (Landmark/LongLoRA style)."""

from __future__ import annotations

import random

from lshe.metrics import string_match_all
from lshe.tasks.base import Example, Task, question_of
from lshe.tasks.common import (
    FILLER_SENTENCES,
    as_list,
    check_fraction,
    check_int,
    count_tokens,
    haystack_budget,
    insert_at_depth,
    take_sentences,
)

TEMPLATE = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there.\n\n"
    "{context}\n\n"
    "What is the pass key?"
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."


class Passkey(Task):
    """Passkey retrieval in filler text ("The grass is green. The sky is blue. ...").

    Defaults: 10 examples, ``context_tokens=1000`` (prompt length; SmolLM2-135M-Instruct with a full
    cache found 9 of 10 keys at the defaults, and scores about 17% at 2.2k tokens), ``depth`` cycling over
    0, 0.25, 0.5, 0.75, 1 across examples, plain prompt (no chat template) ending "What is the pass
    key?", answer prefix "The pass key is" (the runner appends it after a space), 10 new tokens.

    The needle "The pass key is NNNNN. Remember it. NNNNN is the pass key." sits between filler
    sentences at the boundary nearest ``depth`` (fraction of the filler's tokens). The key is drawn
    from the seed; the filler is the same for every example. Score: 1.0 when the key's digits appear
    in the prediction. ``meta``: depth (requested), needle_depth (used), context_tokens, prompt_tokens.
    """

    name = "passkey"
    metric = "accuracy"

    def __init__(
        self,
        n_examples: int = 10,
        seed: int = 0,
        context_tokens: int = 1000,
        depth: float | list[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
        max_new_tokens: int = 10,
        chat_template: bool = False,
        answer_prefix: str = "The pass key is",
    ) -> None:
        super().__init__(n_examples, seed, max_new_tokens, chat_template, answer_prefix)
        self.context_tokens = check_int(self.name, "context_tokens", context_tokens, 64)
        self.depths = [check_fraction(self.name, "depth", d) for d in as_list(self.name, "depth", depth)]

    def examples(self, tokenizer=None) -> list[Example]:
        needle = NEEDLE.format(key="00000")
        budget = haystack_budget(self.name, TEMPLATE, self.context_tokens, tokenizer, needle=needle)
        filler = take_sentences(FILLER_SENTENCES, budget, tokenizer)
        rng = random.Random(self.seed)
        examples = []
        for i in range(self.n_examples):
            key = str(rng.randint(10000, 99999))
            depth = self.depths[i % len(self.depths)]
            sentences, used_depth = insert_at_depth(filler, NEEDLE.format(key=key), depth, tokenizer)
            prompt = TEMPLATE.format(context=" ".join(sentences))
            examples.append(
                Example(
                    id=f"{self.name}-s{self.seed}-{i}",
                    prompt=prompt,
                    question=question_of(TEMPLATE),
                    target=key,
                    meta={
                        "depth": depth,
                        "needle_depth": round(used_depth, 4),
                        "context_tokens": self.context_tokens,
                        "prompt_tokens": count_tokens(prompt, tokenizer),
                    },
                )
            )
        return examples

    def score(self, prediction: str, example: Example) -> float:
        return string_match_all(prediction, [example.target])

    def describe(self) -> dict:
        return {**super().describe(), "context_tokens": self.context_tokens, "depth": self.depths}
