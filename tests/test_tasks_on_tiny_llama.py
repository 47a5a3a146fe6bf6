"""Every task end to end through the evaluation runner on tiny-llama: it runs, its score is in range,
and the same seed gives the same predictions and score."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
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


def test_ruler_cwe_runs_with_its_defaults_on_tiny_llama(tmp_path):
    """`python run.py task=ruler_cwe model=tiny-llama`, no task setting changed: the byte tokenizer
    spends a token per character, so the task sizes its list from the tokenizer (it used to refuse its
    own default: "context_tokens=500 is too small for n_common=5 words")."""
    out = tmp_path / "run"
    args = [
        "task=ruler_cwe", "model=tiny-llama", "limit=2", "logger=none", "device=cpu",
        f"reference_dir={tmp_path / 'refs'}", f"hydra.run.dir={out}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, str(CONF.parent / "run.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert metrics["n_examples"] == len(predictions) == 2
    assert 0.0 <= metrics["score"] <= 1.0
    contexts = {p["meta"]["context_tokens"] for p in predictions}
    assert len(contexts) == 1 and contexts.pop() > 500
