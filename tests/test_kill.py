"""A real 6-job sweep killed (SIGKILL) at random moments three times, then resumed: nothing is lost,
nothing finished is computed again, and the report equals an uninterrupted sweep's. Two identical
sweeps started at once into one folder compute every job exactly once (the per-job lock)."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_run import REPO, TINY

from runners import results

SWEEP = ["-m", "task=passkey", *TINY, "policy=lshe,random", "budget=0.3,0.5,0.7", "logger=none"]
JOBS = 6
# what a job computes (timings and memory are measurements, not results)
COMPARED = [
    "job",
    "task",
    "policy",
    "budget",
    "seed",
    "score",
    "score_full",
    "agreement_exact_match",
    "kv_slots",
]


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> str:
    return f"reference_dir={tmp_path_factory.mktemp('references')}"


def start(sweep_dir: Path, refs: str, log: Path) -> subprocess.Popen:
    """``python run.py -m ...`` in the background, console output to ``log``."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "PYTHONUNBUFFERED": "1",  # a killed process has printed all it said
        "LSHE_ROOT": str(sweep_dir.parent),
    }
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, str(REPO / "run.py"), *SWEEP, refs, f"hydra.sweep.dir={sweep_dir}"],
            cwd=sweep_dir.parent,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@pytest.fixture
def launch(refs):
    """`start` for this test; sweeps still running when the test ends (it failed) are killed."""
    procs = []

    def run(sweep_dir: Path, log: Path) -> subprocess.Popen:
        procs.append(start(sweep_dir, refs, log))
        return procs[-1]

    yield run
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def finish(proc: subprocess.Popen, log: Path, timeout: float = 400) -> str:
    assert proc.wait(timeout) == 0, log.read_text()[-3000:]
    return log.read_text()


def finished(sweep_dir: Path) -> dict[Path, int]:
    """Job folders whose results verify, with the mtime of their metrics.json."""
    found = {}
    for path in sweep_dir.glob("*/" + results.METRICS):
        metrics, why = results.check_job(path.parent)
        if metrics is not None:
            found[path.parent] = path.stat().st_mtime_ns
    return found


def summary_rows(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "summary.csv", newline="") as f:
        return [{k: row[k] for k in COMPARED} for row in csv.DictReader(f)]


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*.tmp")]


@pytest.mark.slow  # 5 sweeps of 6 jobs (each process imports torch): 60-80 s on a loaded 2-core machine
def test_three_kills_then_a_rerun_lose_nothing_and_redo_nothing(tmp_path, launch):
    # the uninterrupted sweep, for comparison, runs meanwhile (the two share the full-cache reference)
    clean = tmp_path / "clean" / "sweep"
    clean.parent.mkdir()
    clean_run = launch(clean, tmp_path / "clean.log")

    sweep_dir = tmp_path / "killed" / "sweep"
    sweep_dir.parent.mkdir()
    rng = random.Random(20261130)
    done: dict[Path, int] = {}
    for attempt in range(3):
        log = tmp_path / f"attempt{attempt}.log"
        proc = launch(sweep_dir, log)
        # a random moment after this attempt has finished one job, and before it finishes another:
        # anywhere in the next job (its save included) or in the report written between jobs
        deadline = time.monotonic() + 300
        while len(finished(sweep_dir)) < len(done) + 1:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.02)
        moment = time.monotonic() + rng.uniform(0.0, 1.0)
        while time.monotonic() < moment and len(finished(sweep_dir)) < min(len(done) + 2, JOBS - 1):
            time.sleep(0.02)
        assert proc.poll() is None, log.read_text()[-3000:]  # at most 5 of 6 jobs done: still running
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        now = finished(sweep_dir)
        # nothing finished before was lost or computed again
        assert all(now.get(job) == stamp for job, stamp in done.items()), attempt
        assert log.read_text().count("skip: ") == len(done)
        done = now
    assert len(done) < JOBS  # the rerun has work left

    rerun = finish(launch(sweep_dir, tmp_path / "rerun.log"), tmp_path / "rerun.log")
    finish(clean_run, tmp_path / "clean.log")
    assert len(finished(clean)) == JOBS
    after = finished(sweep_dir)
    assert len(after) == JOBS  # 6 results
    assert rerun.count("skip: ") == len(done)  # 0 redone: every job finished before was skipped...
    assert all(after[job] == stamp for job, stamp in done.items())  # ...and kept as it was (0 lost)
    assert not leftovers(sweep_dir)  # temporary files of killed writes were cleaned
    assert summary_rows(sweep_dir) == summary_rows(clean)
    for job in after:  # the same outputs, example by example
        assert (job / results.PREDICTIONS).read_text() == (clean / job.name / results.PREDICTIONS).read_text()


def test_two_identical_sweeps_at_once_compute_every_job_once(tmp_path, launch):
    sweep_dir = tmp_path / "sweep"
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    procs = [launch(sweep_dir, log) for log in logs]
    outputs = [finish(proc, log) for proc, log in zip(procs, logs, strict=True)]
    assert len(finished(sweep_dir)) == JOBS
    # each process either computed or skipped each job; 6 skips in all and every job finished means
    # that every job was computed exactly once
    assert sum(out.count("skip: ") for out in outputs) == JOBS
    assert not leftovers(sweep_dir)
    assert len(summary_rows(sweep_dir)) == JOBS
