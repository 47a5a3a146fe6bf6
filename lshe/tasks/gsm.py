"""GSM-Symbolic: grade-school math word problems (templated GSM8K, from ``reasoning_gym``), solved with
chain-of-thought and scored on the final number."""

from __future__ import annotations

from lshe.metrics import numeric_match
from lshe.tasks.base import Example, Task

INSTRUCTION = (
    'Solve the problem step by step. End your reply with the sentence "The answer is N.", '
    "where N is the final number."
)


class GSMSymbolic(Task):
    """GSM-Symbolic (``reasoning_gym.create_dataset('gsm_symbolic', size=n_examples, seed=seed)``).

    Defaults: 10 examples, chat template on, 256 new tokens for the chain of thought, no answer prefix.

    The prompt is the problem (which ends "Give the result as your final answer. Do not include
    units.") followed by an instruction to reason step by step and end with "The answer is N.".
    ``target`` is the numeric answer as a string; ``meta`` carries the generator (template) index,
    the dataset index and the reference chain of thought. Score: 1.0 when `extract_number` of the
    prediction equals the answer numerically ("1,234", "1234.0" and "$1234" all match 1234).
    Generating the problems is fast (thousands per second after a ~1 s import of reasoning_gym).
    SmolLM2-135M-Instruct solves almost none of them (0 of 5 with a full cache): this task is for
    larger models, or for comparing compressed outputs with the full-cache ones.
    """

    name = "gsm_symbolic"
    metric = "accuracy"

    def __init__(
        self,
        n_examples: int = 10,
        seed: int = 0,
        max_new_tokens: int = 256,
        chat_template: bool = True,
        answer_prefix: str = "",
    ) -> None:
        super().__init__(n_examples, seed, max_new_tokens, chat_template, answer_prefix)

    def examples(self, tokenizer=None) -> list[Example]:
        import reasoning_gym

        dataset = reasoning_gym.create_dataset("gsm_symbolic", size=self.n_examples, seed=self.seed)
        examples = []
        for i in range(self.n_examples):
            item = dataset[i]
            meta = item["metadata"]
            examples.append(
                Example(
                    id=f"{self.name}-s{self.seed}-{i}",
                    prompt=f"{item['question']}\n\n{INSTRUCTION}",
                    question=f"\n\n{INSTRUCTION}",
                    target=str(item["answer"]),
                    meta={
                        "template": dataset.task_indices[i],
                        "source_index": meta.get("source_index", i),
                        "reference_cot": meta.get("answer_cot", ""),
                    },
                )
            )
        return examples

    def score(self, prediction: str, example: Example) -> float:
        return numeric_match(prediction, example.target)
