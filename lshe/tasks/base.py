"""The `Task` interface: examples in, a score per prediction out. A task never knows the policy.

A task builds its examples deterministically from a seed (no dataset hub), says how it is run
(`kind`: free generation or teacher-forced perplexity), and scores one prediction at a time. The
runner (``runners/evaluate.py``) turns examples into prompts (chat template or plain text, as the
task says), generates with the evicting cache, and calls `score`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal


@dataclass
class Example:
    """One evaluation item.

    ``prompt`` is the user message (before any chat template) for generation tasks, or the text to
    score for perplexity tasks. ``target`` is the reference answer (empty for perplexity).
    ``meta`` carries anything the scorer or a report needs (needle depth, context length, ...).

    ``question`` is the end of ``prompt`` that asks about the context (``"\n\nWhat is the pass key?"``);
    `context` is the rest. ``prompt`` stays the whole message (``context + question``): the default
    ``joint`` protocol prefills it at once; ``cache.protocol=kvpress`` compresses the context alone
    and appends the question uncompressed (`runners.decode`). Empty for tasks without a question
    (perplexity), which the kvpress protocol refuses.
    """

    id: str
    prompt: str
    target: str = ""
    meta: dict = field(default_factory=dict)
    question: str = ""

    def __post_init__(self) -> None:
        if not self.prompt.endswith(self.question):
            raise ValueError(f"example {self.id}: the question must be the end of the prompt")

    @property
    def context(self) -> str:
        """The prompt without its question: what the kvpress protocol compresses."""
        return self.prompt[: len(self.prompt) - len(self.question)]


def question_of(template: str, field_name: str = "context", **fields) -> str:
    """The part of ``template`` after ``{field_name}``, formatted with ``fields``: the question."""
    return template.split("{" + field_name + "}", 1)[1].format(**fields)


class Task(ABC):
    """Base class of every task.

    Attributes set by each task (and overridable from its config):
        name: the task name used in configs and results.
        kind: ``"generate"`` (greedy generation, scored against ``target``) or ``"perplexity"``
            (teacher-forced NLL of ``prompt``; the runner reports perplexity).
        metric: the name of the task metric reported as ``score`` (e.g. ``"accuracy"``).
        max_new_tokens: generation length.
        chat_template: wrap the prompt in the tokenizer's chat template when it has one.
        answer_prefix: text appended after the prompt (after the chat template's assistant header
            when a template is used) to steer the answer, e.g. ``"The pass key is"``.
    """

    name: ClassVar[str] = "base"
    kind: ClassVar[Literal["generate", "perplexity"]] = "generate"
    metric: ClassVar[str] = "accuracy"
    # True: the task has no reference answers offline, and each example is scored against the
    # full-cache output of the same prompt (the runner passes a copy of the example with that target).
    target_from_reference: ClassVar[bool] = False

    def __init__(
        self,
        n_examples: int = 10,
        seed: int = 0,
        max_new_tokens: int = 32,
        chat_template: bool = False,
        answer_prefix: str = "",
    ) -> None:
        from lshe.tasks.common import check_bool, check_int

        if n_examples is not None:  # None: the task's own natural count (e.g. a whole NIAH grid)
            check_int(self.name, "n_examples", n_examples, 1)
        check_int(self.name, "max_new_tokens", max_new_tokens, 1 if self.kind == "generate" else 0)
        self.n_examples = n_examples
        self.seed = seed
        self.max_new_tokens = max_new_tokens
        self.chat_template = check_bool(self.name, "chat_template", chat_template)
        self.answer_prefix = answer_prefix

    @abstractmethod
    def examples(self, tokenizer=None) -> list[Example]:
        """The task's examples, identical for the same seed and settings.

        ``tokenizer`` (optional) lets length-controlled tasks size their context in tokens.
        """

    def score(self, prediction: str, example: Example) -> float:
        """Score one prediction in [0, 1] (generation tasks). Perplexity tasks do not use it."""
        raise TypeError(f"task {self.name!r} of kind {self.kind!r} does not score text predictions")

    def artefacts(self, predictions: list[dict], output_dir: Path, title: str) -> dict[str, str]:
        """Extra files of a finished run (e.g. NIAH's heatmap): written into ``output_dir``, returned as
        ``{metrics key: path}``. ``predictions`` are the predictions.jsonl rows. Default: none."""
        return {}

    def describe(self) -> dict:
        """Settings worth recording in results."""
        return {"task": self.name, "n_examples": self.n_examples, "max_new_tokens": self.max_new_tokens}
