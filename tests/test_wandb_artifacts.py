"""W&B offline: flat config with the group choices, summary metrics, the job's files as an artifact,
and the sweep-level run."""

from __future__ import annotations

import json

import pytest
from test_run import wandb_records

from runners import results, sweep
from runners.wandb_logger import WandbLogger, log_sweep

pytest.importorskip("wandb")

SETTINGS = dict(project="lshe-test", entity=None, mode="offline", group=None, tags=[], log_predictions=True)


def records_by_kind(folder):
    """The records of the one offline run under ``folder``, by kind, once its exit record is written
    (W&B's service may still be writing the file for a moment after ``finish`` returns, under load)."""
    import time

    files = list(folder.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    deadline = time.monotonic() + 60
    while True:
        found: dict[str, list] = {}
        for record in wandb_records(files[0]):
            found.setdefault(record.WhichOneof("record_type"), []).append(record)
        if "exit" in found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_offline_run_holds_flat_choices_summary_and_the_job_artifact(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    metrics = {
        "config_hash": "x",
        "score": 0.5,
        "score_ci": [0.2, 0.8],
        "policy": "lshe_key",
        "task": "passkey",
    }
    predictions = [{"id": "a", "prediction": "1", "target": "1", "score": 1.0}]
    results.save(tmp_path, {}, metrics, predictions)
    run_config = {
        "budget": 0.3,
        "policy": {"_target_": "policies.lshe.LSHEPolicy"},
        "choices": {"policy": "lshe_key", "task": "passkey"},
    }
    with WandbLogger(tmp_path, run_config, name="policy=lshe_key", job_type="evaluate", **SETTINGS) as logger:
        assert logger.run is not None
        logger.log_results(metrics, predictions)
    found = records_by_kind(tmp_path)
    config = {item.key: json.loads(item.value_json) for r in found["run"] for item in r.run.config.update}
    assert config["choices.policy"] == "lshe_key" and config["choices.task"] == "passkey"
    assert config["policy._target_"] == "policies.lshe.LSHEPolicy"
    summary = {item.key: json.loads(item.value_json) for r in found["summary"] for item in r.summary.update}
    assert summary["score"] == 0.5 and summary["score_ci_low"] == 0.2 and summary["policy"] == "lshe_key"
    artifacts = [r.artifact for r in found["artifact"] if r.artifact.type == "job-results"]
    assert len(artifacts) == 1
    assert {"metrics.json", "predictions.jsonl"} <= {entry.path for entry in artifacts[0].manifest.contents}
    history = {item.key for r in found.get("history", []) for item in r.history.item}
    assert "score" not in history  # results are summary metrics, not a one-step history


def test_sweep_level_run_holds_the_table_figures_and_report_artifact(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for budget in (0.3, 0.5):
        results.save(
            tmp_path / f"budget={budget}",
            {},
            {"config_hash": "x", "task": "passkey", "policy": "lshe", "budget": budget, "score": budget,
             "score_full": 1.0, "metric": "accuracy", "overrides": [f"budget={budget}"]},
            [],
        )  # fmt: skip
    sweep.write_report(tmp_path)
    log_sweep(tmp_path, SETTINGS, "my-sweep")
    found = records_by_kind(tmp_path)
    artifact = next(r.artifact for r in found["artifact"] if r.artifact.type == "sweep-report")
    names = {entry.path for entry in artifact.manifest.contents}
    assert {"summary.csv", "summary.md", "score_vs_budget.png"} <= names
    assert any(r.run.job_type == "sweep" and r.run.run_group == "my-sweep" for r in found.get("run", []))
    assert sweep.collect(tmp_path) and len(sweep.collect(tmp_path)) == 2  # the wandb folder is not a job


def test_a_failing_sweep_run_is_a_warning(tmp_path, caplog):
    log_sweep(tmp_path, {**SETTINGS, "mode": "no-such-mode"}, "g")
    assert "W&B" in caplog.text
