"""The speed/memory benchmark on CPU with tiny-llama: it runs, writes its outputs, numbers are sane."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runners.bench import CONTROL, BenchSettings, run_bench, summarize, write_outputs

ROOT = Path(__file__).resolve().parent.parent
NUMBERS = ("prefill_s", "prefill_tokens_per_s", "step_ms", "step_ms_p10", "step_ms_p90", "tokens_per_s",
           "kv_bytes", "kv_bytes_kv", "peak_bytes")  # fmt: skip


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    torch.set_num_threads(1)
    settings = BenchSettings(
        model="tiny-llama", contexts=(96,), budgets=(0.3, 0.5), batches=(1, 2), steps=3, warmup=1
    )
    rows = run_bench(settings, log=lambda line: None)
    out = tmp_path_factory.mktemp("bench")
    summary = write_outputs(rows, settings, out, {"test": True})
    return settings, rows, summary, out


def test_every_measurement_is_there_with_positive_finite_numbers(bench):
    settings, rows, _, _ = bench
    measured = {(r["policy"], r["budget"], r["batch"], r.get("paired_with")) for r in rows}
    for batch in (1, 2):
        assert ("full", 1.0, batch, None) in measured
        for name in ("lshe", "h2o", "random"):
            for budget in (0.3, 0.5):
                assert (name, budget, batch, None) in measured
                assert (CONTROL, budget, batch, name) in measured
    assert len(rows) == 2 * (1 + 3 * 2 * 2)
    for r in rows:
        for key in NUMBERS:
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, (key, r)
        if r["policy"] not in ("full", CONTROL):
            assert math.isfinite(r["overhead"]) and r["overhead"] > 0
            assert r["control_step_ms"] > 0


def test_memory_follows_the_budget_and_the_batch(bench):
    _, rows, _, _ = bench

    def row(policy, budget, batch):
        return next(r for r in rows if (r["policy"], r["budget"], r["batch"]) == (policy, budget, batch))

    full, lshe = row("full", 1.0, 1), row("lshe", 0.3, 1)
    steps = (3 + 1 + 2) * 2 + 2  # every decode step of both batch sizes fits without growing
    assert full["slots"] == 96 + steps
    assert lshe["slots"] == math.ceil(0.3 * (96 + steps))
    assert lshe["kv_bytes_features"] > 0 and full["kv_bytes_features"] == 0  # LSH-E's packed codes
    assert 0.3 < lshe["kv_bytes"] / full["kv_bytes"] < 0.36
    assert row("lshe", 0.3, 2)["kv_bytes"] == 2 * lshe["kv_bytes"]
    assert row(CONTROL, 0.3, 1)["slots"] == lshe["slots"]  # the control has the policy's slots


def test_outputs_are_written_and_agree(bench):
    _, rows, summary, out = bench
    with open(out / "bench.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    assert float(table[0]["step_ms"]) == pytest.approx(rows[0]["step_ms"])
    payload = json.loads((out / "bench.json").read_text())
    assert payload["summary"] == json.loads(json.dumps(summary))
    assert len(payload["rows"]) == len(rows)
    assert (out / "bench.png").stat().st_size > 10_000
    assert set(summary) == {"ctx96_b1", "ctx96_b2"}
    assert {"lshe_overhead@0.3", "lshe_vs_full_kv_bytes@0.3", "lshe_vs_h2o_prefill@0.5"} <= set(
        summary["ctx96_b1"]
    )


def test_summary_computes_the_ratios_the_issue_targets():
    def r(policy, budget, **values):
        base = dict(policy=policy, budget=budget, context=8, batch=1, overhead=None, paired_with=None)
        return {**base, **values}

    rows = [
        r("full", 1.0, tokens_per_s=100.0, kv_bytes=1000, prefill_s=1.0, step_ms=10.0),
        r("lshe", 0.3, tokens_per_s=250.0, kv_bytes=303, prefill_s=1.0, step_ms=4.0, overhead=1.04),
        r("h2o", 0.3, tokens_per_s=200.0, kv_bytes=310, prefill_s=2.0, step_ms=5.0, overhead=1.3),
        r(CONTROL, 0.3, tokens_per_s=260.0, kv_bytes=300, prefill_s=1.0, step_ms=3.85, paired_with="lshe"),
    ]
    s = summarize(rows)["ctx8_b1"]
    assert s["lshe_overhead@0.3"] == pytest.approx(1.04)
    assert s["lshe_vs_full_tokens_per_s@0.3"] == pytest.approx(2.5)
    assert s["lshe_vs_full_kv_bytes@0.3"] == pytest.approx(0.303)
    assert s["lshe_vs_h2o_prefill@0.3"] == pytest.approx(2.0)
    assert s["lshe_vs_h2o_decode@0.3"] == pytest.approx(1.25)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (dict(policies=("lshe", "snapkv")), "policies"),
        (dict(steps=0), "steps"),
        (dict(contexts=(0,)), "contexts"),
        (dict(batches=(1, "most")), "batches"),
        (dict(shape="llama-9"), "shape"),
        (dict(graph=True), "graph"),
    ],
)
def test_bad_settings_raise_one_error_naming_the_setting(change, key):
    with pytest.raises(ValueError, match=key):
        BenchSettings(**change).check()


def test_run_py_runner_bench_writes_results_and_a_wandb_run(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cmd = [
        sys.executable, str(ROOT / "run.py"), "runner=bench", "model=tiny-llama", "device=cpu", "threads=1",
        "runner.contexts=[64]", "runner.budgets=[0.5]", "runner.policies=[full,lshe]", "runner.steps=2",
        "runner.warmup=1", f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n_rows"] == 3  # full, lshe and lshe's control
    assert metrics["measurements"]["lshe@0.5/ctx64_b1"]["step_ms"] > 0
    assert "lshe_overhead@0.5" in metrics["summary"]["ctx64_b1"]
    for name in ("bench.csv", "bench.json", "bench.png", "config.yaml"):
        assert (tmp_path / name).is_file(), name
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline W&B run was written"
