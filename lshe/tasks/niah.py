"""Needle in a haystack: a magic number hidden in Paul Graham essays, over a context-length x depth grid."""

from __future__ import annotations

import math
import random
from pathlib import Path

from lshe.metrics import string_match_all
from lshe.tasks.base import Example, Task, question_of
from lshe.tasks.common import (
    as_list,
    check_fraction,
    check_int,
    count_tokens,
    haystack_budget,
    insert_at_depth,
    load_essays,
    take_sentences,
)

TEMPLATE = (
    "A special magic number is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the number afterwards.\n\n"
    "{context}\n\n"
    "What is the special magic number mentioned in the provided text?"
)
NEEDLE = "The special magic number is {number}."


class NIAH(Task):
    """Needle in a haystack (RULER / gkamradt style) with the Paul Graham essays as haystack.

    One example per cell of the grid ``context_lengths`` x ``depths``, times ``n_per_cell``; defaults
    [512, 1024] x [0, 0.25, 0.5, 0.75, 1] x 1 = 10 examples. ``n_examples`` (default None = the whole
    grid) keeps only the first examples, for smoke runs. Plain prompt by default, answer prefix "The
    special magic number mentioned in the provided text is", 16 new tokens.

    Each example's haystack is a run of consecutive essay sentences from a start drawn from the seed,
    filled up to the cell's context length (the whole prompt, in tokens); the needle "The special
    magic number is NNNNNNN." (7 digits, from the seed) is inserted at the sentence boundary nearest
    the cell's depth. Score: 1.0 when the number appears in the prediction. ``meta``: context_length,
    depth (the grid's), needle_depth (used), prompt_tokens. `niah_heatmap` draws the grid.
    Measured with a full cache: SmolLM2-135M-Instruct found 10 of 10 needles at the defaults (with
    this prompt and answer prefix); report the full-cache score beside the compressed ones.
    """

    name = "niah"
    metric = "accuracy"

    def __init__(
        self,
        context_lengths: list[int] = (512, 1024),
        depths: list[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
        n_per_cell: int = 1,
        n_examples: int | None = None,
        seed: int = 0,
        max_new_tokens: int = 16,
        chat_template: bool = False,
        answer_prefix: str = "The special magic number mentioned in the provided text is",
    ) -> None:
        self.context_lengths = [
            check_int(self.name, "context_lengths", c, 64)
            for c in as_list(self.name, "context_lengths", context_lengths)
        ]
        self.depths = [check_fraction(self.name, "depths", d) for d in as_list(self.name, "depths", depths)]
        self.n_per_cell = check_int(self.name, "n_per_cell", n_per_cell, 1)
        grid_size = len(self.context_lengths) * len(self.depths) * self.n_per_cell
        if n_examples is not None:
            check_int(self.name, "n_examples", n_examples, 1, grid_size)
        super().__init__(
            grid_size if n_examples is None else n_examples,
            seed,
            max_new_tokens,
            chat_template,
            answer_prefix,
        )

    def examples(self, tokenizer=None) -> list[Example]:
        sentences = [s for _, essay in load_essays() for s in essay]
        rng = random.Random(self.seed)
        examples = []
        for context_length in self.context_lengths:
            needle = NEEDLE.format(number="0000000")
            budget = haystack_budget(
                self.name, TEMPLATE, context_length, tokenizer, needle=needle, key="context_lengths"
            )
            for depth in self.depths:
                for k in range(self.n_per_cell):
                    number = str(rng.randint(1_000_000, 9_999_999))
                    start = rng.randrange(len(sentences))
                    haystack = take_sentences(sentences, budget, tokenizer, start=start)
                    with_needle, used_depth = insert_at_depth(
                        haystack, NEEDLE.format(number=number), depth, tokenizer
                    )
                    prompt = TEMPLATE.format(context=" ".join(with_needle))
                    examples.append(
                        Example(
                            id=f"{self.name}-s{self.seed}-{context_length}-{depth:g}-{k}",
                            prompt=prompt,
                            question=question_of(TEMPLATE),
                            target=number,
                            meta={
                                "context_length": context_length,
                                "depth": depth,
                                "needle_depth": round(used_depth, 4),
                                "prompt_tokens": count_tokens(prompt, tokenizer),
                            },
                        )
                    )
        return examples[: self.n_examples]

    def score(self, prediction: str, example: Example) -> float:
        return string_match_all(prediction, [example.target])

    def artefacts(self, predictions: list[dict], output_dir: Path, title: str) -> dict[str, str]:
        """The score heatmap over (context length, depth): ``niah_heatmap.png``."""
        return {
            "niah_heatmap": str(niah_heatmap(predictions, Path(output_dir) / "niah_heatmap.png", title=title))
        }

    def describe(self) -> dict:
        return {
            **super().describe(),
            "context_lengths": self.context_lengths,
            "depths": self.depths,
            "n_per_cell": self.n_per_cell,
        }


def _cell(prediction: dict) -> tuple[int, float, float]:
    meta = prediction.get("meta") or {}
    try:
        length = prediction.get("context_length", meta.get("context_length"))
        depth = prediction.get("depth", meta.get("depth"))
        return int(length), float(depth), float(prediction["score"])
    except (KeyError, TypeError) as err:
        raise ValueError(
            "each prediction needs 'score' and 'context_length'/'depth' (top level or in 'meta'), "
            f"got keys {sorted(prediction)}"
        ) from err


def niah_heatmap(predictions: list[dict], path: str | Path, title: str = "Needle in a haystack") -> Path:
    """Draw the mean score per (context length, depth) cell as a heatmap PNG at ``path``; return it.

    ``predictions`` are dicts with a ``score`` and the example's ``context_length`` and ``depth``,
    either at the top level or under ``meta`` (as the runner's predictions.jsonl rows carry them).
    x: context length, y: depth (0 = needle at the start of the haystack, at the top); colour: mean
    score from 0 (red) to 1 (green), written in each cell with the number of examples; cells without
    predictions stay blank. When every prediction also has ``score_full`` (the runner's rows), the
    full cache's heatmap of the same examples is drawn beside it, on the same scale.
    Draws with the Agg canvas, without pyplot, so it changes no global matplotlib state.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not predictions:
        raise ValueError("niah_heatmap needs at least one prediction")
    panels = [("score", title)]
    if all(isinstance(p.get("score_full"), (int, float)) for p in predictions):
        panels.append(("score_full", "full cache, same examples"))
    cells: dict[str, dict[tuple[int, float], list[float]]] = {key: {} for key, _ in panels}
    for prediction in predictions:
        length, depth, _ = _cell(prediction)
        for key, _ in panels:
            cells[key].setdefault((length, depth), []).append(float(prediction[key]))
    lengths = sorted({length for length, _ in cells["score"]})
    depths = sorted({depth for _, depth in cells["score"]})

    fig = Figure(
        figsize=(len(panels) * (1.4 + 1.1 * len(lengths)) + 0.8, 1.4 + 0.5 * len(depths)),
        layout="constrained",
    )
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, panel_title) in zip(axes, panels, strict=True):
        grid = [
            [
                sum(cells[key][(length, depth)]) / len(cells[key][(length, depth)])
                if (length, depth) in cells[key]
                else math.nan
                for length in lengths
            ]
            for depth in depths
        ]
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(length) for length in lengths])
        ax.set_yticks(range(len(depths)), [f"{depth:.0%}" for depth in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(panel_title, fontsize=9)
        for row, depth in enumerate(depths):
            for col, length in enumerate(lengths):
                value = grid[row][col]
                if not math.isnan(value):
                    n = len(cells[key][(length, depth)])
                    ax.text(col, row, f"{value:.2f}\nn={n}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=list(axes), label="mean score")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
