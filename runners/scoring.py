"""Scoring a policy's outputs beside the full cache's on the same examples, with intervals.

`score_outputs` turns the outputs of `runners.decode.run_policy` and of the full-cache reference into
predictions.jsonl rows and the task score (perplexity: from summed NLL and tokens; generation: the
task's `score`, plus the agreement of each output with the full-cache output). `intervals` gives every
score its interval and the paired comparison with the full cache (`lshe.stats`).
"""

from __future__ import annotations

import dataclasses
import math

from runners.decode import Workload


def score_outputs(work: Workload, outputs: list[dict], reference: list[dict]) -> tuple[list[dict], dict]:
    """Per-example prediction rows and the task score, beside the full cache's on the same examples."""
    from lshe.metrics import agreement

    task = work.task
    if task.kind == "perplexity":
        rows = [
            {
                "id": example.id,
                "prediction": "",
                "target": "",
                "score": out["perplexity"],
                "score_full": ref["perplexity"],
                "nll": out["nll"],
                "full_nll": ref["nll"],
                "tokens": out["tokens"],
                "prompt_tokens": out["prompt_tokens"],
                "meta": example.meta,
            }
            for example, out, ref in zip(work.examples, outputs, reference, strict=True)
        ]
        return rows, {
            "score": _perplexity(outputs),
            "score_full": _perplexity(reference),
            "scored_tokens": sum(o["tokens"] for o in outputs),
        }
    rows = []
    for example, out, ref in zip(work.examples, outputs, reference, strict=True):
        if task.target_from_reference:  # scored against the full-cache output; the example is untouched
            example = dataclasses.replace(example, target=ref["prediction"])
        agree = agreement(out["prediction"], ref["prediction"])
        rows.append(
            {
                "id": example.id,
                "prediction": out["prediction"],
                "target": example.target,
                "score": float(task.score(out["prediction"], example)),
                "full_prediction": ref["prediction"],
                "score_full": float(task.score(ref["prediction"], example)),
                "agreement_exact_match": agree["exact_match"],
                "agreement_rouge_l": agree["rouge_l"],
                "prompt_tokens": out["prompt_tokens"],
                "generated_tokens": out["generated_tokens"],
                "meta": example.meta,
            }
        )
    n = len(rows)

    def mean(key: str) -> float:
        return sum(r[key] for r in rows) / n

    return rows, {
        "score": mean("score"),
        "score_full": mean("score_full"),
        "agreement_exact_match": mean("agreement_exact_match"),
        "agreement_rouge_l": mean("agreement_rouge_l"),
        "generated_tokens": mean("generated_tokens"),
    }


def intervals(
    kind: str, rows: list[dict], seed: int, metric: str = "accuracy", n_boot: int = 2000, level: float = 0.95
) -> dict:
    """95% intervals of the score, the full cache's score and the agreements, and the paired comparison
    with the full cache on the same examples (`lshe.stats`: Wilson for 0/1 scores, else the bootstrap;
    exact McNemar for 0/1 scores, else the paired bootstrap), from the predictions.jsonl rows."""
    from lshe import stats

    settings = {"level": level, "n_boot": n_boot, "seed": seed}
    if kind == "perplexity":
        nll, full_nll = [r["nll"] for r in rows], [r["full_nll"] for r in rows]
        tokens = [r["tokens"] for r in rows]
        return {
            "score_ci": list(stats.bootstrap_ratio(nll, tokens, n_boot=n_boot, seed=seed, level=level)),
            "score_full_ci": list(
                stats.bootstrap_ratio(full_nll, tokens, n_boot=n_boot, seed=seed, level=level)
            ),
            "paired_vs_full": stats.paired(nll, full_nll, n_boot, seed, level, perplexity_tokens=tokens),
            "intervals": {**settings, "score": "bootstrap_ratio"},
        }
    out = {}
    for key in ("score", "score_full", "agreement_exact_match", "agreement_rouge_l"):
        values = [r[key] for r in rows]
        # Wilson for 0/1 outcomes (accuracy, exact match); the bootstrap for fractional scores (ROUGE,
        # string_match_all), even where every example happens to score 0 or 1
        binary = key == "agreement_exact_match" or (key.startswith("score") and metric == "accuracy")
        if binary and stats.is_binary(values):
            out[f"{key}_ci"], settings[key] = (
                list(stats.wilson(int(sum(values)), len(values), level)),
                "wilson",
            )
        else:
            out[f"{key}_ci"] = list(stats.bootstrap(values, n_boot, seed, level))
            settings[key] = "bootstrap"
    out["paired_vs_full"] = stats.paired(
        [r["score"] for r in rows],
        [r["score_full"] for r in rows],
        n_boot,
        seed,
        level,
        binary=metric == "accuracy",
    )
    return {**out, "intervals": settings}


def _perplexity(outputs: list[dict]) -> float:
    tokens = sum(o["tokens"] for o in outputs)
    return math.exp(sum(o["nll"] for o in outputs) / max(tokens, 1))
