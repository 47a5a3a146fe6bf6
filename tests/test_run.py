"""`python run.py ...` as a user runs it (subprocesses): the design card, W&B files, external policies, bad input."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
TINY = ["model=tiny-llama", "limit=2", "task.context_tokens=300", "task.max_new_tokens=4"]


def cli(
    args: list[str], cwd: Path, env: dict | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run ``python run.py ARGS`` in ``cwd`` with one torch thread, offline W&B and outputs under ``cwd``."""
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "LSHE_ROOT": str(cwd),
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, str(REPO / "run.py"), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def refs(tmp_path_factory) -> str:
    """One full-cache reference folder for every CLI test of the session (as a sweep shares it)."""
    return f"reference_dir={tmp_path_factory.mktemp('references')}"


def wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (``run-*.wandb``: a LevelDB-style log of protobufs)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk of a record
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run(job_dir: Path) -> tuple[dict, int | None]:
    """(summary values, exit code) of the one offline W&B run under ``job_dir``."""
    files = list(job_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    summary, exit_code = {}, None
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "summary":
            summary.update(
                {item.key: json.loads(item.value_json) for item in record.summary.update if item.key}
            )
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return summary, exit_code


EXTERNAL_POLICY = '''
import torch

from policies.base import EvictionPolicy


class OldestFirst(EvictionPolicy):
    """Evict the oldest unprotected token: keep-score = the token's position."""

    name = "oldest"

    def __init__(self, marker: int = 0):
        self.marker = marker

    def token_features(self, layer_idx, keys, positions):
        return {"position": positions[:, None, :].expand(keys.shape[:3]).float()}

    def score(self, view):
        return view.features["position"]

    def describe(self):
        return {"policy": self.name, "marker": self.marker}


class Exploding(EvictionPolicy):
    name = "exploding"

    def score(self, view):
        raise RuntimeError("boom")
'''


@pytest.fixture
def external(tmp_path) -> Path:
    """A policy module and its configs in a folder outside the package, as a user would write them."""
    root = tmp_path / "mine"
    (root / "conf" / "policy").mkdir(parents=True)
    (root / "my_policies.py").write_text(EXTERNAL_POLICY)
    (root / "conf" / "policy" / "theirs.yaml").write_text("_target_: my_policies.OldestFirst\nmarker: 42\n")
    (root / "conf" / "policy" / "exploding.yaml").write_text("_target_: my_policies.Exploding\n")
    return root


def test_design_card_command_end_to_end_with_wandb_offline(tmp_path, refs):
    result = cli(["policy=lshe", "proj_dim=16", "budget=0.3", *TINY, refs], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1
    out = runs[0]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}", str(out.relative_to(tmp_path / "outputs")))

    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["policy"], metrics["budget"], metrics["proj_dim"]) == ("lshe", 0.3, 16)
    assert 0.0 <= metrics["score"] <= 1.0 and metrics["kv_cache_bytes"] < metrics["kv_cache_bytes_full"]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all({"id", "prediction", "target", "score"} <= set(r) for r in rows)
    config = OmegaConf.load(out / "config.yaml")
    assert config.budget == 0.3 and config.model.name == "tiny-llama"

    assert "score (accuracy)" in result.stderr and str(out) in result.stderr  # the result table
    assert "lshe budget=0.3: 100%" in result.stderr  # the progress bar
    log = (out / "run.log").read_text()  # everything the console showed but the progress bars
    assert "score (accuracy)" in log and "100%" not in log

    summary, exit_code = wandb_run(out)
    assert exit_code == 0
    assert summary["score"] == pytest.approx(metrics["score"])
    assert summary["kv_cache_bytes"] == pytest.approx(metrics["kv_cache_bytes"])


def test_external_policy_runs_through_run_py(tmp_path, external, refs):
    args = [f"hydra.searchpath=[file://{external}/conf]", "policy=theirs", "budget=0.3", "logger=none"]
    args += [*TINY, refs, f"hydra.run.dir={tmp_path}/out"]
    result = cli(args, tmp_path, env={"PYTHONPATH": str(external)})
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["policy"] == "theirs"
    assert metrics["policy_params"] == {"policy": "oldest", "marker": 42}
    assert 0.25 < metrics["kv_cache_fraction"] < 0.4


def test_failing_job_finishes_its_wandb_run_and_the_next_job_still_runs(tmp_path, external, refs):
    sweep = tmp_path / "sweep"
    args = ["-m", f"hydra.searchpath=[file://{external}/conf]", "policy=exploding,theirs", *TINY, refs]
    result = cli([*args, f"hydra.sweep.dir={sweep}"], tmp_path, env={"PYTHONPATH": str(external)})
    assert result.returncode != 0 and "boom" in result.stderr
    (failed,) = [d for d in sweep.iterdir() if "policy=exploding" in d.name]
    (passed,) = [d for d in sweep.iterdir() if "policy=theirs" in d.name]
    assert not (failed / "metrics.json").exists()
    assert wandb_run(failed)[1] == 1  # finished, with the failure's exit code
    summary, exit_code = wandb_run(passed)
    assert exit_code == 0
    assert summary["score"] == json.loads((passed / "metrics.json").read_text())["score"]
    assert len((sweep / "summary.csv").read_text().splitlines()) == 2  # header + the finished job


BAD_INPUTS = [
    (["policy=nope"], r"Could not find 'policy/nope'.*Available options in 'policy'.*lshe"),
    (["model=nope"], r"Could not find 'model/nope'.*Available options in 'model'.*smollm2-135m"),
    (["task=nope"], r"Could not find 'task/nope'.*Available options in 'task'.*passkey"),
    (["model.name=nope"], r"error: model: unknown model 'nope': use one of \['smollm2-135m', 'tiny-llama'\]"),
    (["budget=1.5"], r"error: budget must be a fraction in \(0, 1\] of prompt \+ max_new_tokens, got 1.5\n"),
    (
        ["budget=30"],
        r"error: budget must be .*got 30.0: did you mean budget=0.3 \(30% of the cache\) or slots=30",
    ),
    (["budget=-0.2"], r"error: budget must be a fraction in \(0, 1\]"),
    (["slots=1"], r"error: slots must be an integer >= 2, got 1"),
    (["proj_dim=0"], r"error: proj_dim must be an integer in \[1, 1024\], got 0"),
    (["seed=abc"], r"Value 'abc' of type 'str' could not be converted to Integer.*full_key: seed"),
    (
        ["model.trust_remote_code=maybe"],
        r"Value 'maybe' is not a valid bool.*full_key: model.trust_remote_code",
    ),
    (["skip_done=perhaps"], r"Value 'perhaps' is not a valid bool.*full_key: skip_done"),
    (["logger.mode=sometimes"], r"error: logger.mode must be one of \['offline', 'online', 'disabled'\]"),
    (["budgte=0.3"], r"Could not override 'budgte'.*Key 'budgte' not in 'Config'"),
    (["cache.sinks=2"], r"Key 'sinks' not in 'CacheConfig'"),
    (["+budgte=0.3"], r"error: unknown key 'budgte' \(added with \+\): the top-level keys are \['model',"),
    (["+cache.foo=1"], r"error: unknown key 'cache.foo' \(added with \+\): the cache keys are \['sink',"),
    (["task.chat_template=no"], r"error: task: passkey: chat_template must be true or false, got 'no'"),
    (["task.chat_template=maybe"], r"error: task: passkey: chat_template must be true or false, got 'maybe'"),
    (
        ["runner=bench", "runner.batches=[2,3]"],
        r"error: runner.batches must each be a multiple of the one before",
    ),
    (["policy=h2o", "model.attn_implementation=sdpa"], r"error: policy 'h2o' needs attention weights"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_exits_non_zero_with_its_message_and_leaves_no_results(tmp_path, refs, args, message):
    overrides = dict(arg.split("=", 1) for arg in TINY)
    for arg in args:
        overrides.pop(arg.split("=", 1)[0], None)
    result = cli([*args, *(f"{k}={v}" for k, v in overrides.items()), refs], tmp_path)
    assert result.returncode != 0
    assert re.search(message, result.stderr, re.DOTALL), result.stderr[-3000:]
    assert "Traceback" not in result.stderr  # one clear message, ours or Hydra's
    if "error:" in message:  # our own checks
        assert result.returncode == 2
    assert not list(tmp_path.rglob("metrics.json")) and not list(tmp_path.rglob("predictions.jsonl"))
    assert not list(tmp_path.rglob("wandb"))


@pytest.mark.real_model
def test_design_card_command_on_smollm2(tmp_path, refs):
    result = cli(
        ["policy=lshe", "proj_dim=16", "budget=0.3", "limit=2", "logger=none", refs], tmp_path, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics_file,) = (tmp_path / "outputs").glob("*/*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["model"] == "smollm2-135m" and metrics["task"] == "passkey"
    assert metrics["score_full"] >= 0.5  # the full cache finds the key
    assert 0.0 <= metrics["score"] <= 1.0 and 0.28 < metrics["kv_cache_fraction"] < 0.35


def test_trust_remote_code_no_is_false_and_reaches_the_loader(tmp_path):
    """YAML spellings of false (no, off, false) are False: the model folder's own code never runs."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import runners.config  # noqa: F401  (registers the schemas)

    for spelling in ("no", "false", "off", "'false'"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"model.trust_remote_code={spelling}"])
        assert cfg.model.trust_remote_code is False, spelling


def test_a_bad_budget_errors_faster_than_importing_torch(tmp_path):
    """The config is checked before torch and transformers are imported."""
    import time

    def timed(args: list[str]) -> float:
        start = time.perf_counter()
        subprocess.run(
            args, cwd=tmp_path, capture_output=True, env={**os.environ, "LSHE_ROOT": str(tmp_path)}
        )
        return time.perf_counter() - start

    bad = [sys.executable, str(REPO / "run.py"), "budget=30", "model=tiny-llama"]
    torch_only = [sys.executable, "-c", "import torch, transformers"]
    ratios = [timed(bad) / timed(torch_only) for _ in range(2)]
    assert min(ratios) < 1.0, ratios
    result = cli(["budget=30", *TINY], tmp_path)
    assert result.returncode == 2 and "slots=30" in result.stderr


EXAMPLES = REPO / "examples" / "custom"


@pytest.mark.parametrize(
    "args",
    [
        ["policy=oldest"],
        ["task=repeat_word"],
        ["model=tiny-qwen2"],
        ["runner=prompt_stats", "task=repeat_word"],
    ],
    ids=["policy", "task", "model", "runner"],
)
def test_a_users_own_component_from_their_folder_runs_through_run_py(tmp_path, refs, args):
    """The README's "Add a policy / task / model / runner" examples (examples/custom), from a folder outside
    the repo through hydra.searchpath, each through run.py."""
    import shutil

    folder = tmp_path / "theirs"
    shutil.copytree(EXAMPLES, folder)
    base = ["model=tiny-llama", "limit=2", "logger=none", "budget=0.5", refs, f"hydra.run.dir={tmp_path}/out"]
    if not any(a.startswith("task=") for a in args):
        base += ["task.context_tokens=300", "task.max_new_tokens=4"]
    overrides = [f"hydra.searchpath=[file://{folder / 'conf'}]", *base, *args]
    result = cli(overrides, tmp_path, env={"PYTHONPATH": str(folder)})
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    if args[0].startswith("runner="):
        assert metrics["task"] == "repeat_word" and metrics["max_tokens"] > 0
        assert metrics["n_examples"] == 2  # limit=2 of the task's 4 examples
        line = f"repeat_word: 2 prompts, longest {metrics['max_tokens']} tokens, 90% within "
        assert line in result.stderr and line in (tmp_path / "out" / "run.log").read_text()
    else:
        assert metrics["choices"][args[0].split("=")[0]] == args[0].split("=")[1]
        assert 0.0 <= metrics["score"] <= 1.0


def test_an_output_folder_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    result = cli([*TINY, "logger=none", f"hydra.run.dir={tmp_path}/a_file/out"], tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        f"error: cannot write results to {tmp_path}/a_file/out: {tmp_path}/a_file is not a folder"
        in result.stderr
    )


DISK_FULL = """
import errno, os, runpy, sys
real = os.replace
def full(src, dst, *args, **kwargs):
    if str(dst).endswith("metrics.json"):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))
    return real(src, dst, *args, **kwargs)
os.replace = full
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_full_disk_is_one_line_a_failed_exit_and_no_half_written_results(tmp_path, refs):
    out = tmp_path / "out"
    args = [*TINY, "logger=none", refs, f"hydra.run.dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LSHE_ROOT": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", DISK_FULL, str(REPO / "run.py"), *args], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"error: cannot write results to {out}/metrics.json: No space left on device" in result.stderr
    assert not (out / "metrics.json").exists() and not list(out.glob(".*.tmp*"))
    assert "No space left on device" in (out / "run.log").read_text()  # the folder says why it failed
    rerun = cli(args, tmp_path)  # space again: the job runs to the end
    assert rerun.returncode == 0 and (out / "metrics.json").is_file()


def test_wandb_failing_at_init_is_a_warning_and_the_results_are_written(tmp_path, refs):
    out = tmp_path / "out"
    out.mkdir()
    (out / "wandb").write_text("not a folder")  # W&B cannot create its run folder
    result = cli([*TINY, "logger=wandb", refs, f"hydra.run.dir={out}"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "warning: W&B could not start" in result.stderr and "Traceback" not in result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["score"] <= 1.0


def test_a_reference_dir_below_a_file_is_one_line_in_the_console_and_the_run_log(tmp_path):
    (tmp_path / "afile").write_text("not a folder\n")
    result = cli([*TINY, "logger=none", f"reference_dir={tmp_path}/afile/refs"], tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    line = f"error: cannot write results to {tmp_path}/afile/refs: Not a directory (reference_dir={tmp_path}/afile/refs"
    assert line in result.stderr, result.stderr[-3000:]
    (run_log,) = (tmp_path / "outputs").rglob("run.log")
    assert line in run_log.read_text()
    assert not list(tmp_path.rglob("metrics.json"))


def test_perplexity_notes_once_that_an_asked_prefill_is_not_used(tmp_path, refs):
    args = ["model=tiny-llama", "limit=1", "task=perplexity", "task.context_tokens=100", "logger=none", refs]
    asked = cli([*args, "cache.prefill=streaming"], tmp_path)
    assert asked.returncode == 0, asked.stderr[-3000:]
    note = "note: task=perplexity always streams its text through the decode path: cache.prefill=streaming unused"
    assert asked.stderr.count(note) == 1, asked.stderr[-3000:]
    default = cli(args, tmp_path)  # the default prefill (window) was not asked for: no note
    assert default.returncode == 0 and "cache.prefill" not in default.stderr, default.stderr[-3000:]
