"""A policy, a task and a runner that live outside the lshe repo (README, "Add a policy / task / model / runner").

Use them with:  PYTHONPATH=examples/custom python run.py hydra.searchpath=[file://$PWD/examples/custom/conf] \
                    policy=oldest task=repeat_word model=tiny-qwen2
"""

from __future__ import annotations

import logging
import random

from lshe.tasks import Example, Task
from policies.base import EvictionPolicy
from runners import common, components


class OldestFirst(EvictionPolicy):
    """Evict the oldest unprotected token: its keep-score is its position (a per-token feature)."""

    name = "oldest"

    def token_features(self, layer_idx, keys, positions):
        return {"position": positions[:, None, :].expand(keys.shape[:3]).float()}

    def score(self, view):
        return view.features["position"]


class RepeatWord(Task):
    """Say a word back after some filler text. Metric: accuracy (the word appears in the answer)."""

    name = "repeat_word"

    def __init__(self, n_examples: int = 4, seed: int = 0, filler: int = 20, max_new_tokens: int = 6) -> None:
        super().__init__(n_examples=n_examples, seed=seed, max_new_tokens=max_new_tokens)
        self.filler = filler

    def examples(self, tokenizer=None) -> list[Example]:
        rng = random.Random(self.seed)
        words = ["apple", "river", "candle", "orbit", "velvet", "maple"]
        out = []
        for i in range(self.n_examples):
            word = rng.choice(words)
            prompt = f"The word is {word}. " + "The sky is blue. " * self.filler + "Say the word:"
            out.append(Example(id=f"repeat-{i}", prompt=prompt, target=word))
        return out

    def score(self, prediction: str, example: Example) -> float:
        return float(example.target in prediction)


class PromptStats:
    """A runner: the length of every prompt of the task in the model's tokens, nothing generated."""

    def __init__(self, percentile: float = 0.9) -> None:
        self.percentile = percentile

    def __call__(self, cfg) -> dict:
        task = components.build_task(cfg.task)
        _, tokenizer = components.build_model(cfg, "lshe", "cpu")
        examples = task.examples(tokenizer)[: cfg.limit]  # limit: null = every example
        lengths = sorted(len(tokenizer(e.prompt)["input_ids"]) for e in examples)
        metrics = {"task": task.name, "n_examples": len(lengths), "max_tokens": lengths[-1],
                   "percentile_tokens": lengths[int(self.percentile * (len(lengths) - 1))]}  # fmt: skip
        with common.job_logger(cfg, job_type="prompt_stats") as logger:
            common.finish(cfg, metrics, [{"tokens": n} for n in lengths], logger)
        logging.getLogger("lshe").info(
            "%s: %d prompts, longest %d tokens, %g%% within %d tokens",
            task.name, len(lengths), lengths[-1], 100 * self.percentile, metrics["percentile_tokens"],
        )  # fmt: skip
        return metrics
