"""Stored results you can trust: checksummed job results verified before reuse, per-job locks,
verified cached artefacts, content digests, faults that lose nothing and say one line."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from runners import results, sweep

REPO = Path(__file__).resolve().parent.parent
CFG = {"model": {"name": "tiny-llama"}, "policy": {"name": "lshe"}, "budget": 0.3}
PREDICTIONS = [{"id": "a", "output": "1234", "score": 1.0}, {"id": "b", "output": "99", "score": 0.0}]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def finished_job(folder: Path, score: float = 0.5, config_hash: str = "abc", **extra) -> dict:
    """A job folder as a runner leaves it: a plot written by the job, then `results.save`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plot.png").write_bytes(b"\x89PNG fake plot")
    metrics = {"score": score, "config_hash": config_hash, "budget": 0.3, **extra}
    results.save(folder, CFG, metrics, PREDICTIONS, extra_files=["plot.png", ("table.csv", "a,b\n1,2\n")])
    return metrics


def lshe_notes(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lshe" and r.levelno >= logging.INFO]


# --------------------------------------------------------------------------------------------- save
def test_save_records_the_sha256_of_every_file_and_a_checksum_of_metrics(tmp_path):
    metrics = finished_job(tmp_path)
    stored = json.loads((tmp_path / "metrics.json").read_text())
    assert stored == metrics  # the caller's dict got the same keys
    on_disk = {name: sha256((tmp_path / name).read_bytes()) for name in stored["files"]}
    assert set(on_disk) == {"config.yaml", "predictions.jsonl", "plot.png", "table.csv"}
    assert stored["files"] == on_disk
    assert (tmp_path / "table.csv").read_text() == "a,b\n1,2\n"
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == PREDICTIONS
    # the checksum: sha256 of the canonical JSON (sorted keys, no spaces) of everything else
    rest = {k: v for k, v in stored.items() if k != "checksum"}
    assert stored["checksum"] == sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode())


def test_save_renames_metrics_last_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    order = []
    real_replace = os.replace

    def recording_replace(src, dst):
        order.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    finished_job(tmp_path)
    assert order == ["config.yaml", "predictions.jsonl", "table.csv", "metrics.json"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_save_refuses_extra_files_outside_the_job_or_missing(tmp_path):
    (tmp_path / "elsewhere.png").write_bytes(b"x")
    job = tmp_path / "job"
    with pytest.raises(ValueError, match="not inside the job folder"):
        results.save(job, CFG, {"config_hash": "h"}, [], extra_files=[tmp_path / "elsewhere.png"])
    with pytest.raises(FileNotFoundError, match="plot.png of the job does not exist"):
        results.save(job, CFG, {"config_hash": "h"}, [], extra_files=["plot.png"])
    with pytest.raises(ValueError, match="clashes"):
        results.save(job, CFG, {"config_hash": "h"}, [], extra_files=[("config.yaml", "x")])
    assert not (job / "metrics.json").exists()


# ------------------------------------------------------------------------------------- load_done
def test_load_done_returns_the_metrics_of_a_job_that_verifies(tmp_path, caplog):
    metrics = finished_job(tmp_path)
    caplog.set_level(logging.INFO, logger="lshe")
    assert results.load_done(tmp_path, "abc") == metrics
    assert results.load_done(tmp_path / "never-ran", "abc") is None
    assert lshe_notes(caplog) == []  # nothing to say about a job that verifies or never finished


def rewrite_metrics(folder: Path, change) -> None:
    metrics = json.loads((folder / "metrics.json").read_text())
    change(metrics)
    (folder / "metrics.json").write_text(json.dumps(metrics))


def edit_same_length(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert old in data and len(old) == len(new)
    path.write_bytes(data.replace(old, new, 1))


DAMAGE = {
    "metrics truncated": (
        lambda d: (d / "metrics.json").write_bytes((d / "metrics.json").read_bytes()[:40]),
        "not valid JSON",
    ),
    "metrics garbled": (
        lambda d: (d / "metrics.json").write_bytes(b"\x00\xff{garbage"),
        "metrics.json: cannot read it",
    ),
    "metrics empty": (lambda d: (d / "metrics.json").write_text(""), "not valid JSON"),
    "metrics null": (lambda d: (d / "metrics.json").write_text("null"), "holds null, not an object"),
    "metrics a list": (lambda d: (d / "metrics.json").write_text("[]"), "holds a list, not an object"),
    "metrics score edited": (
        lambda d: edit_same_length(d / "metrics.json", b'"score": 0.5', b'"score": 0.9'),
        "checksum does not match",
    ),
    "metrics without checksum (older lshe)": (
        lambda d: rewrite_metrics(d, lambda m: m.pop("checksum")),
        "lacks checksum",
    ),
    "metrics without config_hash": (
        lambda d: rewrite_metrics(d, lambda m: m.pop("config_hash")),
        "lacks config_hash",
    ),
    "metrics files edited": (
        lambda d: rewrite_metrics(d, lambda m: m["files"].pop("plot.png")),
        "checksum does not match",
    ),
    "predictions truncated": (
        lambda d: (d / "predictions.jsonl").write_bytes((d / "predictions.jsonl").read_bytes()[:-20]),
        "predictions.jsonl was changed or truncated",
    ),
    "predictions edited, same length": (
        lambda d: edit_same_length(d / "predictions.jsonl", b'"1234"', b'"1235"'),
        "predictions.jsonl was changed or truncated",
    ),
    "predictions missing": (lambda d: (d / "predictions.jsonl").unlink(), "predictions.jsonl is missing"),
    "config edited": (
        lambda d: edit_same_length(d / "config.yaml", b"budget: 0.3", b"budget: 0.5"),
        "config.yaml was changed",
    ),
    "plot missing": (lambda d: (d / "plot.png").unlink(), "plot.png is missing"),
    "extra table changed": (lambda d: (d / "table.csv").write_text("a,b\n1,3\n"), "table.csv was changed"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_job_is_not_done_and_a_note_says_why(tmp_path, caplog, damage):
    finished_job(tmp_path)
    corrupt, why = DAMAGE[damage]
    corrupt(tmp_path)
    caplog.set_level(logging.INFO, logger="lshe")
    assert results.load_done(tmp_path, "abc") is None
    (note,) = lshe_notes(caplog)
    assert why in note and str(tmp_path) in note and "re-run" in note and "\n" not in note
    # the job is run again and saved: then it verifies
    finished_job(tmp_path)
    assert results.load_done(tmp_path, "abc")["score"] == 0.5


def test_a_job_of_another_config_is_not_done(tmp_path, caplog):
    finished_job(tmp_path, config_hash="abc")
    caplog.set_level(logging.INFO, logger="lshe")
    assert results.load_done(tmp_path, "def") is None
    (note,) = lshe_notes(caplog)
    assert "another config" in note and "abc" in note and "def" in note


def test_check_job_without_config_hash_verifies_content_only(tmp_path):
    finished_job(tmp_path, config_hash="abc")
    metrics, why = results.check_job(tmp_path)
    assert why is None and metrics["score"] == 0.5
    assert results.check_job(tmp_path / "nothing") == (None, None)


# ------------------------------------------------------------------------------------------ faults
def fail_nth_fsync(monkeypatch, n: int, code: int) -> None:
    """The n-th fsync of a file fails with ``code`` (ENOSPC often surfaces at fsync)."""
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == n:
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_disk_full_while_saving_raises_one_line_and_writes_nothing(tmp_path, monkeypatch):
    job = tmp_path / "job"
    job.mkdir()
    fail_nth_fsync(monkeypatch, 3, errno.ENOSPC)  # config and predictions staged, metrics fails
    with pytest.raises(results.ResultsError) as caught:
        results.save(job, CFG, {"score": 1.0, "config_hash": "h"}, PREDICTIONS)
    assert str(caught.value) == f"cannot write results to {job / 'metrics.json'}: No space left on device"
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.ENOSPC
    assert list(job.iterdir()) == []  # no config.yaml without metrics.json, no temporary file


def test_a_failed_save_keeps_the_earlier_results_intact(tmp_path, monkeypatch):
    finished_job(tmp_path, score=0.5, config_hash="old")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    fail_nth_fsync(monkeypatch, 2, errno.ENOSPC)
    with pytest.raises(results.ResultsError, match="No space left on device"):
        results.save(tmp_path, {"other": 1}, {"score": 0.1, "config_hash": "new"}, [{"id": "z"}])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert results.load_done(tmp_path, "old")["score"] == 0.5


def test_read_only_output_raises_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "replace", read_only)
    with pytest.raises(results.ResultsError) as caught:
        results.save(tmp_path, CFG, {"score": 1.0, "config_hash": "h"}, PREDICTIONS)
    assert str(caught.value) == f"cannot write results to {tmp_path / 'config.yaml'}: Read-only file system"
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(results.ResultsError, match="Read-only file system"):
        results.atomic_write_text(tmp_path / "summary.csv", "x")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_fails_before_anything_is_computed(tmp_path, monkeypatch):
    """chmod does not stop root, so permission denied is simulated at os.open (used by mkstemp too)."""
    job = tmp_path / "job"
    job.mkdir()
    real_open = os.open

    def denied(path, flags, *args, **kwargs):
        if str(path).startswith(str(job)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(results.ResultsError) as caught:
        with results.job_lock(job):
            pytest.fail("the lock of an unwritable job folder must not be granted")
    assert str(caught.value) == f"cannot write results to {job}: Permission denied"
    with pytest.raises(results.ResultsError, match="Permission denied"):
        results.save(job, CFG, {"score": 1.0, "config_hash": "h"}, PREDICTIONS)
    assert list(job.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_by_chmod(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    job.chmod(0o555)
    try:
        with pytest.raises(results.ResultsError, match="Permission denied"):
            results.save(job, CFG, {"score": 1.0, "config_hash": "h"}, PREDICTIONS)
        assert list(job.iterdir()) == []
    finally:
        job.chmod(0o755)


# -------------------------------------------------------------------------------------------- locks
HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from runners import results
    job, hold = Path(sys.argv[1]), float(sys.argv[2])
    with results.job_lock(job):
        (job / "holding").write_text("yes")
        time.sleep(hold)
        if sys.argv[3] == "save":
            results.save(job, {}, {"score": 0.75, "config_hash": "h"}, [{"id": 1}])
    """
)


def start_holder(job: Path, hold: float, then: str) -> subprocess.Popen:
    job.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(job), str(hold), then], cwd=REPO)
    deadline = time.monotonic() + 60
    while not (job / "holding").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the lock holder did not start"
        time.sleep(0.02)
    return proc


def test_a_second_process_waits_for_the_job_then_finds_it_done(tmp_path, caplog):
    holder = start_holder(tmp_path, 1.0, "save")
    caplog.set_level(logging.INFO, logger="lshe")
    with results.job_lock(tmp_path):
        assert holder.poll() is not None or (tmp_path / "metrics.json").exists()
        assert results.load_done(tmp_path, "h")["score"] == 0.75
    assert holder.wait() == 0
    assert any(f"pid {holder.pid}" in note and "waiting" in note for note in lshe_notes(caplog))


def test_the_lock_of_a_killed_process_is_taken_over_and_its_temporary_files_removed(tmp_path):
    holder = start_holder(tmp_path, 600, "none")
    (tmp_path / ".metrics.json.x1y2.tmp").write_text('{"half": ')  # a write the kill interrupted
    (tmp_path / ".predictions.jsonl.tmp").write_text("partial")
    (tmp_path / "notes.tmp").write_text("not ours: kept")
    with pytest.raises(TimeoutError, match="stayed locked"):
        with results.job_lock(tmp_path, timeout_s=0.3):
            pass
    assert (tmp_path / ".metrics.json.x1y2.tmp").exists()  # not cleaned while the holder lives
    holder.kill()
    holder.wait()
    started = time.monotonic()
    with results.job_lock(tmp_path, timeout_s=10):
        assert time.monotonic() - started < 5
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == ["notes.tmp"]


def test_job_lock_is_reentrant_in_a_thread_and_exclusive_between_threads(tmp_path):
    events = []
    with results.job_lock(tmp_path):
        with results.job_lock(tmp_path, timeout_s=1):  # the same thread: no deadlock
            events.append("nested")

        def other():
            with results.job_lock(tmp_path):
                events.append("other")

        thread = threading.Thread(target=other)
        thread.start()
        time.sleep(0.3)
        events.append("first done")
    thread.join(10)
    assert events == ["nested", "first done", "other"]


# ------------------------------------------------------------------------------ verified JSON store
FINGERPRINT = {"weights": "a" * 64, "prompts": "b" * 64, "max_new_tokens": 4, "transformers": "4.57.0"}
PAYLOAD = {"outputs": [{"text": "1234", "tokens": [1, 2, 3]}], "wall_s": 1.5, "peak_memory_bytes": 1024}


def test_store_json_round_trip_with_checksum_of_the_payload(tmp_path, caplog):
    path = tmp_path / "refs" / "passkey-tiny.json"
    results.store_json(path, PAYLOAD, FINGERPRINT)
    document = json.loads(path.read_text())
    assert document["fingerprint"] == FINGERPRINT and document["payload"] == PAYLOAD
    assert document["checksum"] == sha256(json.dumps(PAYLOAD, sort_keys=True, separators=(",", ":")).encode())
    caplog.set_level(logging.INFO, logger="lshe")
    assert results.load_json(path, dict(FINGERPRINT)) == PAYLOAD
    assert lshe_notes(caplog) == []


def set_key(path: Path, key: str, value) -> None:
    document = json.loads(path.read_text())
    document[key] = value
    path.write_text(json.dumps(document))


STORE_DAMAGE = {
    "missing": (lambda p: p.unlink(), "no such file"),
    "truncated": (lambda p: p.write_text(p.read_text()[:30]), "not valid JSON"),
    "garbled": (lambda p: p.write_bytes(b"\xff\xfe\x00"), "cannot read it"),
    "an empty list": (lambda p: p.write_text("[]"), "holds a list, not an object"),
    "null": (lambda p: p.write_text("null"), "holds null"),
    "no payload": (
        lambda p: p.write_text(json.dumps({"format": 1, "fingerprint": {}})),
        "lacks checksum, payload",
    ),
    "edited, same length": (lambda p: edit_same_length(p, b'"1234"', b'"1235"'), "checksum mismatch"),
    "payload a list": (lambda p: set_key(p, "payload", []), "payload is a list"),
    "another format": (lambda p: set_key(p, "format", 99), "format 99"),
    "other weights": (
        lambda p: set_key(p, "fingerprint", {**FINGERPRINT, "weights": "c" * 64}),
        "another weights",
    ),
}


@pytest.mark.parametrize("damage", STORE_DAMAGE)
def test_a_stored_reference_that_does_not_verify_is_recomputed_with_a_note(tmp_path, caplog, damage):
    path = tmp_path / "ref.json"
    results.store_json(path, PAYLOAD, FINGERPRINT)
    corrupt, why = STORE_DAMAGE[damage]
    corrupt(path)
    caplog.set_level(logging.INFO, logger="lshe")
    assert results.load_json(path, FINGERPRINT) is None
    (note,) = lshe_notes(caplog)
    assert (
        note == f"reference {path} does not verify ({note.split('(', 1)[1].rsplit(')', 1)[0]}): recomputing"
    )
    assert why in note


def test_a_different_fingerprint_names_what_changed(tmp_path, caplog):
    path = tmp_path / "ref.json"
    results.store_json(path, PAYLOAD, FINGERPRINT)
    caplog.set_level(logging.INFO, logger="lshe")
    assert results.load_json(path, {**FINGERPRINT, "transformers": "5.0.0", "max_new_tokens": 8}) is None
    assert "made for another max_new_tokens, transformers" in lshe_notes(caplog)[0]


# ----------------------------------------------------------------------------------- file digests
@pytest.fixture
def lshe_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "lshe-cache"
    monkeypatch.setenv("LSHE_CACHE", str(cache))
    return cache


def age(path: Path, seconds: float) -> None:
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp))


def test_file_digest_is_the_sha256_and_is_cached_by_size_mtime_and_inode(tmp_path, lshe_cache, monkeypatch):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"weights v1")
    age(path, 100)
    assert results.file_digest(path) == sha256(b"weights v1")
    cache = json.loads((lshe_cache / results.DIGEST_CACHE).read_text())
    assert list(cache["entries"].values())[0]["sha256"] == sha256(b"weights v1")

    def no_hashing(path):
        raise AssertionError(f"{path} was hashed again although it did not change")

    monkeypatch.setattr(results, "_sha256_file", no_hashing)
    assert results.file_digest(path) == sha256(b"weights v1")  # from the cache
    monkeypatch.undo()
    monkeypatch.setenv("LSHE_CACHE", str(lshe_cache))
    path.write_bytes(b"weights v2")  # same size, another (old) mtime
    age(path, 50)
    assert results.file_digest(path) == sha256(b"weights v2")


def test_file_digest_sees_an_edit_within_one_mtime_tick(tmp_path, lshe_cache):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"weights v1")
    first = results.file_digest(path)
    path.write_bytes(b"weights v2")  # same size, possibly the same coarse mtime
    assert first == sha256(b"weights v1") and results.file_digest(path) == sha256(b"weights v2")


def test_file_digest_works_without_a_writable_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("LSHE_CACHE", str(blocker / "cache"))
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc")
    age(path, 100)
    assert results.file_digest(path) == sha256(b"abc")


def model_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "model.safetensors").write_bytes(b"\x00" * 64)
    (root / "config.json").write_text('{"hidden_size": 64}')
    (root / "tokenizer.json").write_text('{"vocab": {}}')
    (root / "README.md").write_text("# a model")
    (root / ".cache").mkdir()
    (root / ".cache" / "download.lock").write_text("")
    return root


def test_weights_fingerprint_changes_with_any_model_file_and_not_with_the_location(tmp_path, lshe_cache):
    folder = model_folder(tmp_path / "model")
    first = results.weights_fingerprint(folder)
    assert first["files"] == {
        "config.json": sha256(b'{"hidden_size": 64}'),
        "model.safetensors": sha256(b"\x00" * 64),
        "tokenizer.json": sha256(b'{"vocab": {}}'),
    }
    assert results.weights_fingerprint(model_folder(tmp_path / "copy")) == first
    (folder / "README.md").write_text("# edited docs")
    assert results.weights_fingerprint(folder) == first
    (folder / "model.safetensors").write_bytes(b"\x00" * 63 + b"\x01")  # one weight byte
    changed = results.weights_fingerprint(folder)
    assert (
        changed["sha256"] != first["sha256"]
        and changed["files"]["model.safetensors"] != first["files"]["model.safetensors"]
    )
    (folder / "tokenizer.json").write_text('{"vocab": {"a": 1}}')
    assert results.weights_fingerprint(folder)["sha256"] != changed["sha256"]


def test_weights_fingerprint_of_a_missing_or_empty_folder_is_a_clear_error(tmp_path, lshe_cache):
    with pytest.raises(FileNotFoundError, match="model folder .*nowhere does not exist"):
        results.weights_fingerprint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no model files"):
        results.weights_fingerprint(tmp_path / "empty")


# ------------------------------------------------------------------------------------- sweep report
def sweep_job(root: Path, name: str, policy: str, budget: float, score: float, **overrides) -> Path:
    folder = root / name
    settings = [f"{k}={v}" for k, v in overrides.items()]
    metrics = {
        "task": "passkey",
        "metric": "accuracy",
        "higher_is_better": True,
        "model": "tiny-llama",
        "policy": policy,
        "budget": budget,
        "score": score,
        "score_full": 1.0,
        "config_hash": name,
        "overrides": [f"policy={policy}", f"budget={budget}", *settings],
    }
    results.save(folder, CFG, metrics, PREDICTIONS)
    return folder


def test_sweep_report_reads_only_jobs_that_verify(tmp_path, caplog):
    for i, budget in enumerate((0.1, 0.1 + 0.2, 0.5)):
        sweep_job(tmp_path, f"ok{i}", "lshe", budget, score=budget)
    edited = sweep_job(tmp_path, "edited", "h2o", 0.5, score=0.25)
    edit_same_length(edited / "metrics.json", b'"score": 0.25', b'"score": 0.99')
    truncated = sweep_job(tmp_path, "truncated", "h2o", 0.3, score=0.5)
    (truncated / "predictions.jsonl").write_text("")
    for name, text in (("null", "null"), ("garbage", "{{{"), ("list", "[1, 2]")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(text)
    caplog.set_level(logging.INFO, logger="lshe")
    summary, _ = sweep.write_report(tmp_path)
    with open(summary, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["budget"], r["score"]) for r in rows] == [
        ("ok0", "0.1", "0.1"),
        ("ok1", "0.3", "0.30000000000000004"),  # the budget rounded, the score kept as measured
        ("ok2", "0.5", "0.5"),
    ]
    notes = lshe_notes(caplog)
    assert sorted(n.split(":")[1].split()[-1] for n in notes) == [
        "edited",
        "garbage",
        "list",
        "null",
        "truncated",
    ]
    assert all("sweep report: leaving out" in n and "\n" not in n for n in notes)
    tables = (tmp_path / "summary.md").read_text()
    assert "| policy | 0.1 | 0.3 | 0.5 | full cache |" in tables and "0.30000000000000004" not in tables
    assert "| lshe | 0.1 | 0.3 | 0.5 | 1 |" in tables
    assert "h2o" not in tables


def test_sweep_labels_round_swept_floats(tmp_path):
    sweep_job(tmp_path, "a", "lshe", 0.5, score=0.5, temperature=0.1 + 0.2)
    sweep_job(tmp_path, "b", "lshe", 0.5, score=0.25, temperature=0.7)
    rows = sweep.collect(tmp_path)
    assert [r["label"] for r in rows] == ["lshe, temperature=0.3", "lshe, temperature=0.7"]


def test_sweep_cli_on_a_folder_of_damaged_jobs_says_so_without_a_traceback(tmp_path):
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "metrics.json").write_text("null")
    done = subprocess.run(
        [sys.executable, "-m", "runners.sweep", str(tmp_path)], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "leaving out job: metrics.json: holds null, not an object" in done.stderr


def test_sweep_report_removes_temporary_files_of_a_killed_report_writer(tmp_path):
    sweep_job(tmp_path, "a", "lshe", 0.5, score=0.5)
    for name in (".summary.csv.k1.tmp", ".summary.md.k2.tmp", ".score_vs_budget.png.k3.tmp"):
        (tmp_path / name).write_text("half")
    sweep.write_report(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.is_dir()) == [
        ".summary.csv.lock",
        "score_vs_budget.png",
        "summary.csv",
        "summary.md",
    ]


def test_run_py_reruns_a_job_whose_predictions_were_truncated_with_a_note(tmp_path):
    from test_run import TINY, cli

    args = [*TINY, "logger=none", f"reference_dir={tmp_path / 'refs'}", f"hydra.run.dir={tmp_path / 'out'}"]
    first = cli(args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    job = tmp_path / "out"
    original = (job / "predictions.jsonl").read_text()
    score = json.loads((job / "metrics.json").read_text())["score"]
    (job / "predictions.jsonl").write_text(original[: len(original) // 2])

    again = cli(args, tmp_path)
    output = again.stdout + again.stderr
    assert again.returncode == 0 and "Traceback" not in output, output[-3000:]
    assert "skip: " not in output
    assert "results do not verify (predictions.jsonl was changed or truncated" in output
    assert "results do not verify" in (job / "run.log").read_text()  # the note is in the job's log too
    assert (job / "predictions.jsonl").read_text() == original  # recomputed, same outputs
    assert (
        results.load_done(job, json.loads((job / "metrics.json").read_text())["config_hash"])["score"]
        == score
    )
