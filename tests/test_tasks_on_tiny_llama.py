"""Every task end to end through the evaluation runner on tiny-llama: it runs, its score is in range,
and the same seed gives the same predictions and score."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from lshe.tasks import TASKS
from runners.evaluate import evaluate, prepare

torch.set_num_threads(1)

CONF = Path(__file__).resolve().parent.parent / "conf"
SMALL = {  # tiny-llama's tokenizer is one token per byte: keep contexts short
    "passkey": ["task.context_tokens=400", "task.max_new_tokens=6"],
    "niah": ["task.context_lengths=[400]", "task.depths=[0.0,0.5]", "task.max_new_tokens=6"],
    "ruler_vt": ["task.context_tokens=400", "task.max_new_tokens=6"],
    "ruler_cwe": ["task.context_tokens=1200", "task.max_new_tokens=6"],
    "gsm_symbolic": ["task.max_new_tokens=6"],
    "perplexity": ["task.context_tokens=160"],
    "summarize": ["task.context_tokens=160", "task.max_new_tokens=6"],
}


def run_task(name: str, refs: Path, out: Path) -> tuple[dict, list[dict]]:
    GlobalHydra.instance().clear()
    overrides = [
        "model=tiny-llama", "logger=none", "limit=2", "device=cpu", "policy=lshe", "budget=0.5",
        f"reference_dir={refs}", f"task={name}", *SMALL[name],
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return evaluate(prepare(cfg), out)


def test_every_task_is_covered():
    assert set(SMALL) == set(TASKS)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_task_runs_scores_in_range_and_is_deterministic_under_its_seed(name, tmp_path):
    refs = tmp_path / "refs"
    first, predictions = run_task(name, refs, tmp_path / "a")
    again, predictions_again = run_task(name, refs, tmp_path / "b")
    assert first["n_examples"] == len(predictions) == 2
    if first["higher_is_better"]:
        assert 0.0 <= first["score"] <= 1.0 and 0.0 <= first["score_full"] <= 1.0
    else:  # perplexity
        assert 1.0 <= first["score"] < math.inf and 1.0 <= first["score_full"] < math.inf
    assert first["score"] == again["score"]
    assert [p["prediction"] for p in predictions] == [p["prediction"] for p in predictions_again]
    assert first["kv_cache_bytes"] < first["kv_cache_bytes_full"]  # eviction really held less
