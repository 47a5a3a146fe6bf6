"""The speed/memory benchmark on CPU with tiny-llama: it runs, writes its outputs, numbers are sane."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lshe.attention import restore_attention, use_lshe_attention
from lshe.models import load_model
from policies import make_policy
from runners.bench import CONTROL, HF, Bench, summarize, write_outputs

ROOT = Path(__file__).resolve().parent.parent
NUMBERS = ("prefill_s", "prefill_tokens_per_s", "step_ms", "step_ms_p10", "step_ms_p90", "tokens_per_s",
           "kv_bytes", "kv_bytes_kv", "peak_bytes")  # fmt: skip


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    torch.set_num_threads(1)
    runner = Bench(policies=None, budgets=None, contexts=(96,), batches=(1, 2), steps=3, warmup=1, graph=False,
                   fused=True, control=True, reserve_gib=0.0)  # fmt: skip
    model, _ = load_model("tiny-llama", attn_implementation="lshe")
    policies = {name: make_policy(name) for name in ("full", "lshe", "h2o", "random")}
    rows = runner.run(
        model, policies, [0.3, 0.5], cache={"sink": 4, "recent": 10, "prefill": "window", "window": 32}
    )
    out = tmp_path_factory.mktemp("bench")
    summary = summarize(rows)
    write_outputs(rows, {"summary": summary}, out)
    return runner, rows, summary, out


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
    expected = {
        "lshe_overhead@0.3",
        "h2o_overhead@0.5",
        "lshe_vs_full_kv_bytes@0.3",
        "h2o_vs_full_prefill_s@0.3",
    }
    assert expected <= set(summary["ctx96_b1"])


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
    assert s["h2o_overhead@0.3"] == pytest.approx(1.3)
    assert s["lshe_vs_full_tokens_per_s@0.3"] == pytest.approx(2.5)
    assert s["lshe_vs_full_kv_bytes@0.3"] == pytest.approx(0.303)
    assert s["h2o_vs_full_prefill_s@0.3"] == pytest.approx(2.0)


def cli(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    cmd = [sys.executable, str(ROOT / "run.py"), "runner=bench", "model=tiny-llama", "device=cpu", "threads=1",
           "runner.contexts=[64]", "runner.steps=2", "runner.warmup=1", f"hydra.run.dir={tmp_path}", *args]  # fmt: skip
    return subprocess.run(cmd, cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("runner.policies=[lshe,snapkv]", "runner.policies: no policy config 'snapkv'"),
        ("runner.steps=0", "runner.steps must be an integer >= 1"),
        ("runner.contexts=[0]", "runner.contexts must be an integer >= 1"),
        ("runner.batches=[1,most]", "runner.batches must be an integer >= 1"),
        ("runner.budgets=[30]", "runner.budgets must be fractions in \\(0, 1\\]"),
        ("runner.graph=true", "runner.graph=true needs device=cuda"),
        ("runner.compile=true runner.warmup=0", "runner.compile=true needs runner.warmup >= 1"),
    ],
)
def test_bad_settings_exit_with_one_line_naming_the_setting(tmp_path, override, message):
    done = cli(tmp_path, *override.split())
    assert done.returncode != 0 and re.search(message, done.stderr), done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not (tmp_path / "metrics.json").exists()


def test_run_py_runner_bench_writes_results_and_a_wandb_run(tmp_path):
    done = cli(tmp_path, "runner.budgets=[0.5]", "runner.policies=[full,lshe]")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n_rows"] == 3  # full, lshe and lshe's control
    assert metrics["measurements"]["lshe@0.5/ctx64_b1"]["step_ms"] > 0
    assert "lshe_overhead@0.5" in metrics["summary"]["ctx64_b1"]
    for name in ("bench.csv", "bench.json", "bench.png", "config.yaml"):
        assert (tmp_path / name).is_file(), name
        if name != "config.yaml":
            assert name in metrics["files"]  # checksummed with the job's results
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline W&B run was written"


def test_a_users_policy_from_their_own_folder_benchmarks_with_no_code_change(tmp_path):
    """policy=<theirs> from a searchpath folder: the job's policy is measured beside its static control."""
    root = tmp_path / "mine"
    (root / "conf" / "policy").mkdir(parents=True)
    (root / "my_policy.py").write_text(
        "from policies.base import EvictionPolicy\n\n\n"
        "class KeepLargeKeys(EvictionPolicy):\n"
        "    name = 'keep_large'\n\n"
        "    def score(self, view):\n"
        "        return view.keys.float().norm(dim=-1)\n"
    )
    (root / "conf" / "policy" / "keep_large.yaml").write_text("_target_: my_policy.KeepLargeKeys\n")
    out = tmp_path / "run"
    out.mkdir()
    done = cli(out, "policy=keep_large", "budget=0.5", f"hydra.searchpath=[file://{root / 'conf'}]",
               env={"PYTHONPATH": str(root)})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "bench.csv")))
    assert [(r["policy"], r["paired_with"]) for r in rows] == [("keep_large", ""), (CONTROL, "keep_large")]
    assert float(rows[0]["overhead"]) > 0


def tiny_runner(**settings) -> Bench:
    base = dict(policies=None, budgets=None, contexts=(32,), batches=(1,), steps=2, warmup=1, graph=False,
                fused=True, control=True, reserve_gib=0.0)  # fmt: skip
    return Bench(**{**base, **settings})


def test_the_bench_default_decodes_uncompiled(bench):
    _, rows, _, _ = bench
    assert all(r["compiled"] is False for r in rows)


def test_runner_compile_true_compiles_every_decoder_and_says_so():
    """The real `lshe.fast_decode.Decoder(compile=True)` (inductor on the CPU) on tiny-llama."""
    torch.set_num_threads(1)
    model, _ = load_model("tiny-llama", attn_implementation="lshe")
    policies = {name: make_policy(name) for name in ("full", "lshe")}
    rows = tiny_runner(compile=True).run(model, policies, [0.5])
    assert [(r["policy"], r["compiled"]) for r in rows] == [("full", True), ("lshe", True), (CONTROL, True)]
    assert all(r["step_ms"] > 0 for r in rows)


def test_hf_static_compile_decodes_the_tokens_generate_decodes():
    """The hf_baseline path (SDPA, StaticCache prefilled in chunks as a large batch is, torch.compile,
    inductor on the CPU) continues the prompt with the tokens plain greedy ``generate`` (dynamic cache,
    eager) produces."""
    from runners.bench import _hf_prefill

    torch.set_num_threads(1)
    model, _ = load_model("tiny-llama", attn_implementation="lshe")
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(3))
    runner = tiny_runner(hf_baseline=True)
    runner.device = model.device
    restore_attention(model)
    try:
        reference = model.generate(ids, do_sample=False, max_new_tokens=6, min_new_tokens=6)[0, 32:]
        cache, tokens, prefill_s = _hf_prefill(model, ids.repeat(2, 1), 32 + 8, model.device, chunk=12)
        _, graphed, last = runner._hf_decode(model, cache, tokens, 32, warmup=3)  # 3 + 2 steps
    finally:
        use_lshe_attention(model)
    assert tokens[:, 0].tolist() == [reference[0].item()] * 2
    assert last[:, 0].tolist() == [reference[5].item()] * 2
    assert prefill_s > 0 and graphed is False  # no CUDA graphs on the CPU


def test_runner_hf_baseline_adds_one_hf_row_per_context_and_batch(tmp_path):
    torch.set_num_threads(1)
    model, _ = load_model("tiny-llama", attn_implementation="lshe")
    rows = tiny_runner(hf_baseline=True, batches=(1, 2)).run(model, {"full": make_policy("full")}, [0.5])
    assert model.config._attn_implementation == "lshe"
    hf = [r for r in rows if r["policy"] == HF]
    assert [r["batch"] for r in hf] == [1, 2]
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for r in hf:
        slots = 32 + 3 + 2 + 4  # context + max(warmup, 3) + steps + 4
        assert r["slots"] == slots and (r["budget"], r["compiled"], r["overhead"]) == (1.0, True, None)
        per_row = (
            2
            * config.num_hidden_layers
            * config.num_key_value_heads
            * head_dim
            * slots
            * model.dtype.itemsize
        )
        assert r["kv_bytes"] == r["kv_bytes_kv"] == r["batch"] * per_row
        for key in NUMBERS:
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    assert hf[0]["prefill_s"] == hf[1]["prefill_s"]  # the batch-1 prefill, as for every row
    summary = summarize(rows)
    for batch in (1, 2):
        full = next(r for r in rows if (r["policy"], r["batch"]) == ("full", batch))
        hf_row = next(r for r in hf if r["batch"] == batch)
        ratio = summary[f"ctx32_b{batch}"][f"full_vs_{HF}_step@1.0"]
        assert ratio == pytest.approx(full["step_ms"] / hf_row["step_ms"])
    write_outputs(rows, {"summary": summary}, tmp_path)  # the plot takes the HF row
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    table = list(csv.DictReader(open(tmp_path / "bench.csv")))
    assert [(r["policy"], r["compiled"]) for r in table if r["policy"] == HF] == [(HF, "True")] * 2


def test_run_py_takes_runner_compile_and_runner_hf_baseline(tmp_path):
    inductor = tmp_path / "inductor"
    (inductor / "ab").mkdir(parents=True)
    (inductor / "ab" / "kernel.best_config").write_text("{}")  # a choice tuned by an earlier run
    done = cli(
        tmp_path, "runner.policies=[full]", "runner.compile=true", "runner.hf_baseline=true", env={"TORCHINDUCTOR_CACHE_DIR": str(inductor)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    assert [(r["policy"], r["compiled"]) for r in rows] == [("full", "True"), (HF, "True")]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["summary"]["ctx64_b1"][f"full_vs_{HF}_step@1.0"] > 0
    environment = json.loads((tmp_path / "bench.json").read_text())["environment"]
    assert environment["products"] == "gemv"  # runner.products=null: lshe.compiled.PRODUCTS
    assert environment["inductor_before"] == {"cache_dir": str(inductor), "tuned_configs": 1}
    assert environment["inductor"]["cache_dir"] == str(inductor)
    assert environment["inductor"]["tuned_configs"] >= 1  # the CPU tunes no block sizes


def test_inductor_tuning_counts_the_tuned_configs_in_inductors_cache(tmp_path, monkeypatch):
    from runners import measure

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    assert measure.inductor_tuning() == {"cache_dir": str(tmp_path), "tuned_configs": 0}
    for name in ("a/x.best_config", "a/b/y.best_config", "a/x.py", "c/z.best_config.tmp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    assert measure.inductor_tuning() == {"cache_dir": str(tmp_path), "tuned_configs": 2}


def test_hf_rows_come_after_every_lshe_row_on_the_same_prompts(monkeypatch):
    """HF's baseline resets dynamo; measured between contexts it made the compiled lshe decoders compile
    again, and one context's lshe rows came out slower. So `run` measures every lshe row first, then
    HF's, on the same prompt ids."""
    torch.set_num_threads(1)
    model, _ = load_model("tiny-llama", attn_implementation="lshe")
    calls = []
    monkeypatch.setattr(
        Bench, "measure", lambda self, m, label, p, b, ids, batches: calls.append(("lshe", ids)) or []
    )
    monkeypatch.setattr(Bench, "measure_hf", lambda self, m, ids, batches: calls.append(("hf", ids)) or [])
    tiny_runner(hf_baseline=True, contexts=(24, 32)).run(model, {"lshe": make_policy("lshe")}, [0.5])
    assert [(who, ids.shape[1]) for who, ids in calls] == [("lshe", 24), ("lshe", 32), ("hf", 24), ("hf", 32)]
    assert torch.equal(calls[0][1], calls[2][1]) and torch.equal(calls[1][1], calls[3][1])


def test_gpu_state_reads_nvidia_smi_and_is_none_without_it(tmp_path):
    """The clocks recorded with a GPU run come from nvidia-smi for the run's device; without a CUDA
    device, without nvidia-smi, or when it fails, the state is None (never a guess)."""
    from runners import measure

    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\n"
        '[ "$1" = "--id=3" ] || exit 9\n'
        'echo "1980 MHz, 1980 MHz, 3201 MHz, 41, 212.37 W, 0x0000000000000004"\n'
    )
    fake.chmod(0o755)
    state = measure.gpu_state(torch.device("cuda", 3), nvidia_smi=str(fake))
    assert state == {"clocks.sm": "1980 MHz", "clocks.max.sm": "1980 MHz", "clocks.mem": "3201 MHz",
                     "temperature.gpu": "41", "power.draw": "212.37 W",
                     "clocks_throttle_reasons.active": "0x0000000000000004"}  # fmt: skip
    assert measure.gpu_state(torch.device("cuda", 2), nvidia_smi=str(fake)) is None  # it failed
    assert measure.gpu_state(torch.device("cuda", 3), nvidia_smi=str(tmp_path / "absent")) is None
    assert measure.gpu_state(torch.device("cpu"), nvidia_smi=str(fake)) is None
