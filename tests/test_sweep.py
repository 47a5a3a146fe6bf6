"""Sweeps: a real multirun, its report, resuming after an interruption, atomic results, submitit_local."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from test_run import REPO, TINY, cli

from runners import results, sweep

SWEEP = ["-m", "policy=lshe,h2o", "budget=0.3,0.5", *TINY, "logger=none"]


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> str:
    return f"reference_dir={tmp_path_factory.mktemp('references')}"


def finished(sweep_dir: Path) -> dict[Path, int]:
    """metrics.json files of a sweep and their modification times; every one must be complete JSON."""
    found = {}
    for path in sweep_dir.rglob("metrics.json"):
        json.loads(path.read_text())  # a half-written file would fail here
        found[path] = path.stat().st_mtime_ns
    return found


def read_summary(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_multirun_2x2_reports_resumes_after_a_kill_and_skips_finished_jobs(tmp_path, refs):
    sweep_dir = tmp_path / "sweep"
    args = [*SWEEP, refs, f"hydra.sweep.dir={sweep_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LSHE_ROOT": str(tmp_path)}

    # 1. interrupt the sweep as soon as its first job has finished
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "run.py"), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while proc.poll() is None and not list(sweep_dir.rglob("metrics.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = finished(sweep_dir)
    assert 1 <= len(before) <= 4

    # 2. the same command resumes: the finished jobs are skipped, the others run
    resumed = cli(args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("skip: ") == len(before)
    after = finished(sweep_dir)
    assert len(after) == 4
    assert all(after[path] == stamp for path, stamp in before.items())  # finished work kept as it was

    rows = read_summary(sweep_dir)
    assert len(rows) == 4
    assert {(r["policy"], float(r["budget"])) for r in rows} == {
        (p, b) for p in ("lshe", "h2o") for b in (0.3, 0.5)
    }
    assert {r["label"] for r in rows} == {"lshe", "h2o"}
    for row in rows:  # the speed columns are each job's own metrics
        metrics = json.loads((sweep_dir / row["job"] / "metrics.json").read_text())
        assert float(row["examples_per_s"]) == pytest.approx(metrics["examples_per_s"])
        warm = metrics["examples_per_s_warm"]
        assert (
            (row["examples_per_s_warm"] == "") if warm is None else float(row["examples_per_s_warm"]) == warm
        )
    image = matplotlib.image.imread(sweep_dir / "score_vs_budget.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100

    # 3. running it again skips all 4 jobs; skip_done=false reruns them
    again = cli(args, tmp_path)
    assert again.returncode == 0 and again.stderr.count("skip: ") == 4
    assert finished(sweep_dir) == after
    rerun = cli([*args, "skip_done=false"], tmp_path)
    assert rerun.returncode == 0 and "skip: " not in rerun.stderr
    assert all(stamp != after[path] for path, stamp in finished(sweep_dir).items())


def test_submitit_local_runs_a_two_job_sweep(tmp_path, refs):
    sweep_dir = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=submitit_local", "policy=lshe,streaming", *TINY, "logger=none", refs]
    result = cli([*args, f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in result.stdout
    assert len(finished(sweep_dir)) == 2
    assert list((sweep_dir / ".submitit").iterdir())  # the jobs ran through submitit
    assert {r["policy"] for r in read_summary(sweep_dir)} == {"lshe", "streaming"}


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_a_job_with_a_bad_value_fails_alone_in_one_line_and_the_sweep_exits_1(tmp_path, refs, launcher):
    sweep_dir = tmp_path / "sweep"
    chosen = [] if launcher == "basic" else ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    args = ["-m", *chosen, "budget=30,0.5", "policy=streaming", *TINY, "logger=none", refs]
    result = cli([*args, f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "error: budget must be a fraction in (0, 1]" in result.stderr
    (bad,) = [d for d in sweep_dir.iterdir() if "budget=30" in d.name]
    (good,) = [d for d in sweep_dir.iterdir() if "budget=0.5" in d.name]
    assert result.stderr.strip().splitlines()[-1] == (
        f"sweep: 1 job(s) failed (the error is in each job's run.log): {bad.name}"
    )
    assert "error: budget must be" in (bad / "run.log").read_text()
    assert not (bad / "metrics.json").exists() and (good / "metrics.json").is_file()
    assert [r["budget"] for r in read_summary(sweep_dir)] == ["0.5"]
    # the failure is this sweep's: rerunning only the good job into the same folder exits 0
    rerun = cli(
        ["-m", "budget=0.5", "policy=streaming", *TINY, "logger=none", refs, f"hydra.sweep.dir={sweep_dir}"],
        tmp_path,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]


def _full_row(n: int, low: float, high: float, label: str = "lshe") -> dict:
    return {"task": "passkey", "metric": "accuracy", "model": "m", "budget": 0.5, "label": label,
            "score": 0.5, "n_examples": n, "score_full": 0.5, "score_full_ci_low": low, "score_full_ci_high": high}  # fmt: skip


def test_full_cache_cell_shows_an_interval_only_when_every_row_agrees_on_it():
    same = [_full_row(4, 0.1, 0.9), _full_row(4, 0.1, 0.9, label="h2o")]
    assert sweep._full_cell(same) == "0.5 [0.1, 0.9]"
    # same full-cache score on 4 and on 20 examples (limit=4 vs 20): the first row's interval is not theirs
    mixed = [_full_row(4, 0.1, 0.9), _full_row(20, 0.3, 0.7, label="lshe, limit=20")]
    assert sweep._full_cell(mixed) == "0.5"
    assert sweep._full_cell(list(reversed(mixed))) == "0.5"
    assert "| 0.5 |" in sweep.markdown(mixed) and "[0.1, 0.9] |" not in sweep.markdown(mixed)


def write_metrics(root: Path, job: str, **metrics) -> None:
    """A finished job's files as `results.save` writes them (the report reads only verified jobs)."""
    results.save(root / job, {}, {"config_hash": "test", **metrics}, [])


def test_report_has_one_line_per_policy_and_varied_setting_and_one_panel_per_task(tmp_path):
    for task, metric in (("passkey", "accuracy"), ("perplexity", "perplexity")):
        for proj_dim in (8, 16):
            for budget in (0.5, 0.1, 0.3):
                score = budget if metric == "accuracy" else 10 / budget
                write_metrics(
                    tmp_path,
                    f"{task}/lshe-{proj_dim}-{budget}",
                    task=task,
                    metric=metric,
                    higher_is_better=metric == "accuracy",
                    policy="lshe",
                    budget=budget,
                    proj_dim=proj_dim,
                    score=score,
                    score_full=1.0 if metric == "accuracy" else 9.0,
                    overrides=[
                        f"task={task}",
                        "policy=lshe",
                        f"budget={budget}",
                        f"proj_dim={proj_dim}",
                        "limit=2",
                    ],
                )
    write_metrics(tmp_path, "broken", policy="lshe")  # no score: not a finished job's metrics
    summary, figure = sweep.write_report(tmp_path)
    rows = read_summary(tmp_path)
    assert len(rows) == 12
    assert {r["label"] for r in rows} == {"lshe, proj_dim=8", "lshe, proj_dim=16"}
    first = [(r["task"], r["label"], r["budget"]) for r in rows[:3]]
    assert first == [("passkey", "lshe, proj_dim=16", b) for b in ("0.1", "0.3", "0.5")]
    image = matplotlib.image.imread(figure)
    assert image.shape[1] > image.shape[0]  # two panels side by side
    tables = (tmp_path / "summary.md").read_text()
    assert "| lshe, proj_dim=8 | 0.1 | 0.3 | 0.5 | 1 |" in tables  # scores by budget, then full cache
    assert "| lshe, proj_dim=16 | 100.0 | 33.3 | 20.0 | 9 |" in tables  # perplexity 10 / budget
    assert sweep.main([str(tmp_path)]) == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sweep.write_report(empty) is None and sweep.main([str(empty)]) == 1


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "_umask", lambda: 0o022)
    path = tmp_path / "metrics.json"
    results.atomic_write_text(path, '{"score": 1}')

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        results.atomic_write_text(path, '{"score": 2, "half": ')
    assert json.loads(path.read_text()) == {"score": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left
    assert path.stat().st_mode & 0o044  # readable by others, as a plainly written file (umask 022)


def test_skip_done_needs_a_finished_job_with_the_same_config(tmp_path):
    def cfg(*overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    base = cfg("budget=0.3")
    digest = results.config_hash(base)
    assert results.load_done(tmp_path, digest) is None
    results.save(tmp_path, base, {"score": 0.5, "config_hash": digest}, [{"id": "a"}])
    assert results.load_done(tmp_path, digest)["score"] == 0.5
    # bookkeeping keys do not change the hash; anything that changes results does
    assert results.config_hash(cfg("budget=0.3", "logger=none", "skip_done=false", "threads=2")) == digest
    assert results.load_done(tmp_path, results.config_hash(cfg("budget=0.5"))) is None
    assert results.load_done(tmp_path, results.config_hash(cfg("budget=0.3", "task=niah"))) is None
    assert (tmp_path / "config.yaml").is_file() and (
        tmp_path / "predictions.jsonl"
    ).read_text() == '{"id": "a"}\n'
