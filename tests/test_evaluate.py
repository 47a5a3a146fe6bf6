"""The evaluation runner in process, on tiny-llama: metrics, full-cache reference, task kinds, prompts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from runners import components, results
from runners.config import ConfigError
from runners.decode import encode_prompts, new_cache, reference_fingerprint, reference_path, summarize_batches
from runners.evaluate import evaluate, prepare
from runners.measure import forward_laps

torch.set_num_threads(1)

CONF = Path(__file__).resolve().parent.parent / "conf"
TINY = ["model=tiny-llama", "logger=none", "limit=2", "device=cpu"]
PASSKEY = ["task=passkey", "task.context_tokens=300", "task.max_new_tokens=5"]

# The metrics.json schema documented in the README.
SCHEMA = {
    "score": float,
    "metric": str,
    "higher_is_better": bool,
    "score_full": float,
    "task": str,
    "model": str,
    "policy": str,
    "policy_params": dict,
    "budget": float,
    "proj_dim": int,
    "seed": int,
    "n_examples": int,
    "batch_size": int,
    "device": str,
    "cache": dict,
    "kv_slots": float,
    "kv_slots_full": float,
    "kv_cache_bytes": float,
    "kv_cache_bytes_full": float,
    "kv_cache_fraction": float,
    "kv_cache_bytes_detail": dict,
    "prefill_s": float,
    "decode_tokens_per_s": float,
    "peak_memory_bytes": int,
    "peak_memory_source": str,
    "wall_s": float,
    "task_params": dict,
    "model_info": dict,
}


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("references")


def make_cfg(refs: Path, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[*TINY, f"reference_dir={refs}", *overrides])


def run(refs: Path, tmp_path: Path, *overrides: str) -> tuple[dict, list[dict]]:
    job = prepare(make_cfg(refs, *overrides))
    metrics, predictions = evaluate(job, tmp_path)
    json.dumps(metrics)  # JSON-serialisable as written
    return metrics, predictions


def test_generation_metrics_follow_the_schema(refs, tmp_path):
    metrics, predictions = run(refs, tmp_path, *PASSKEY, "policy=lshe", "budget=0.3")
    for key, kind in SCHEMA.items():
        assert isinstance(metrics[key], kind), (key, metrics[key])
    assert 0.0 <= metrics["score"] <= 1.0 and metrics["metric"] == "accuracy"
    assert (metrics["policy"], metrics["budget"], metrics["proj_dim"], metrics["n_examples"]) == (
        "lshe",
        0.3,
        16,
        2,
    )
    # bytes actually held, codes included, against the no-eviction cache of the same sequences
    assert metrics["kv_cache_bytes_detail"]["features"] > 0
    assert 0.25 < metrics["kv_cache_fraction"] < 0.4
    assert metrics["kv_cache_bytes"] < metrics["kv_cache_bytes_full"]
    assert metrics["kv_slots"] == math.ceil(0.3 * (predictions[0]["prompt_tokens"] + 5))
    assert (
        metrics["prefill_s"] > 0 and metrics["decode_tokens_per_s"] > 0 and metrics["peak_memory_bytes"] > 0
    )
    assert metrics["cache"] == {"sink": 4, "recent": 10, "prefill": "window", "window": 32}
    assert 0.0 <= metrics["agreement_exact_match"] <= 1.0 and 0.0 <= metrics["agreement_rouge_l"] <= 1.0
    assert len(predictions) == 2
    for row in predictions:
        assert {"id", "prediction", "target", "score", "full_prediction", "agreement_rouge_l"} <= set(row)
        assert row["generated_tokens"] <= 5 and row["target"].isdigit()


def test_full_cache_reference_is_computed_once_and_reused(refs, tmp_path):
    first, _ = run(refs, tmp_path, *PASSKEY, "task.max_new_tokens=6", "policy=streaming", "budget=0.3")
    cfg = make_cfg(refs, *PASSKEY, "task.max_new_tokens=6", "policy=h2o", "budget=0.5")
    job = prepare(cfg)
    path = reference_path(job.work, cfg.seed, refs, "tiny-llama")
    assert path.is_file() and not first["reference_reused"]
    stamp = path.stat().st_mtime_ns
    second, _ = evaluate(job, tmp_path)
    assert second["reference_reused"] and path.stat().st_mtime_ns == stamp
    assert second["score_full"] == first["score_full"]
    assert second["kv_cache_bytes_full"] == first["kv_cache_bytes_full"]
    # the full policy is the reference itself
    full, predictions = run(refs, tmp_path, *PASSKEY, "task.max_new_tokens=6", "policy=full")
    assert full["outputs_from_reference"] and full["score"] == full["score_full"]
    assert full["agreement_exact_match"] == 1.0 and full["kv_cache_bytes"] == full["kv_cache_bytes_full"]
    assert all(row["prediction"] == row["full_prediction"] for row in predictions)
    stored = results.load_json(path, reference_fingerprint(job.work, cfg.seed))
    assert full["peak_memory_bytes"] == stored["peak_memory_bytes"] > 0
    # other prompts (another seed) have their own reference
    other = prepare(make_cfg(refs, *PASSKEY, "task.max_new_tokens=6", "seed=1"))
    assert reference_path(other.work, 1, refs, "tiny-llama") != path


def test_perplexity_evicts_while_the_text_streams_in(refs, tmp_path):
    task = ["task=perplexity", "task.context_tokens=200"]
    metrics, predictions = run(refs, tmp_path, *task, "policy=lshe", "budget=0.3")
    assert metrics["cache"]["prefill"] == "sequential"
    assert metrics["metric"] == "perplexity" and metrics["higher_is_better"] is False
    assert 1.0 < metrics["score"] < 1e6 and math.isfinite(metrics["score_full"])
    assert metrics["score"] != metrics["score_full"]  # eviction changed the predictions
    assert 0.25 < metrics["kv_cache_fraction"] < 0.4
    assert "agreement_rouge_l" not in metrics
    tokens = sum(row["tokens"] for row in predictions)
    nll = sum(row["nll"] for row in predictions)
    assert metrics["score"] == pytest.approx(math.exp(nll / tokens))
    assert all(row["tokens"] == row["prompt_tokens"] - 1 for row in predictions)


def test_summarize_is_scored_against_the_full_cache_summary(refs, tmp_path):
    task = ["task=summarize", "task.context_tokens=200", "task.max_new_tokens=8"]
    metrics, predictions = run(refs, tmp_path, *task, "policy=knorm", "budget=0.3")
    assert metrics["score_full"] == 1.0 and metrics["metric"] == "rouge_l_vs_full"
    assert all(row["target"] == row["full_prediction"] for row in predictions)
    assert metrics["score"] == pytest.approx(metrics["agreement_rouge_l"])


def test_niah_run_draws_its_heatmap(refs, tmp_path):
    task = ["task=niah", "task.context_lengths=[300]", "task.depths=[0.0,1.0]", "task.max_new_tokens=4"]
    metrics, _ = run(refs, tmp_path, *task, "policy=random", "budget=0.5")
    png = tmp_path / "niah_heatmap.png"
    assert metrics["niah_heatmap"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_batches_are_left_padded_and_counted(refs, tmp_path):
    task = ["task=gsm_symbolic", "task.max_new_tokens=3", "limit=3", "batch_size=2"]
    metrics, predictions = run(refs, tmp_path, *task, "policy=tova", "budget=0.5")
    assert metrics["n_examples"] == 3 and len(predictions) == 3
    lengths = {row["prompt_tokens"] for row in predictions}
    assert len(lengths) > 1  # prompts of different lengths shared a batch
    assert all(row["generated_tokens"] <= 3 for row in predictions)


def test_prompts_use_the_chat_template_or_plain_text_with_the_answer_prefix(refs):
    job = prepare(make_cfg(refs, *PASSKEY)).work
    text = job.tokenizer.decode(job.prompts[0])
    assert not job.chat and text.endswith("What is the pass key? The pass key is")
    gsm = prepare(make_cfg(refs, "task=gsm_symbolic", "task.answer_prefix=Let us think.")).work
    text = gsm.tokenizer.decode(gsm.prompts[0])
    assert gsm.chat and text.startswith("<|im_start|>user\n")
    assert text.endswith("<|im_start|>assistant\nLet us think.")
    gsm.task.chat_template = False
    plain = gsm.tokenizer.decode(
        encode_prompts(gsm.task, gsm.tokenizer, gsm.examples[:1], "tiny-llama")[0][0]
    )
    assert plain == gsm.examples[0].prompt + " Let us think."


def test_forward_laps_separate_prefill_from_decode_steps(refs):
    job = prepare(make_cfg(refs, *PASSKEY, "policy=lshe"))
    ids = torch.tensor([job.work.prompts[0]])
    with forward_laps(job.work.model, "cpu") as watch, torch.inference_mode():
        job.work.model.generate(
            input_ids=ids, max_new_tokens=5, do_sample=False, cache=new_cache(job.work, job.policy, 0.5)
        )
    laps = watch.laps_ms()
    assert len(laps) == 5 and all(lap > 0 for lap in laps)  # the prefill, then 4 decode steps


def test_diagnostics_are_passed_through_to_the_metrics(refs, tmp_path):
    metrics, _ = run(refs, tmp_path, *PASSKEY, "policy=lshe", "budget=0.3", "diagnostics=true")
    assert 0.0 <= metrics["diag_lost_attention_mass"] <= 1.0
    assert metrics["diag_hamming_logit_corr"] is not None


def test_attention_implementation_is_switched_or_refused(refs, caplog):
    def attention(cfg):
        return components.attention_for(cfg, [components.build_policy(cfg.policy)])

    lshe = make_cfg(refs, "policy=lshe", "model.attn_implementation=sdpa")
    with caplog.at_level("WARNING", logger="lshe"):
        assert attention(lshe) == "lshe"
    assert "instead of sdpa" in caplog.text
    h2o_eager = make_cfg(refs, "policy=h2o", "model.attn_implementation=eager")
    assert attention(h2o_eager) == "lshe"
    h2o_sdpa = make_cfg(refs, "policy=tova", "model.attn_implementation=flash_attention_2")
    with pytest.raises(ConfigError, match="needs attention weights.*model.attn_implementation"):
        attention(h2o_sdpa)
    unknown = make_cfg(refs, "model.attn_implementation=magic")
    with pytest.raises(ConfigError, match=r"model.attn_implementation must be one of \['lshe'"):
        prepare(unknown)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["budget=0.02"], "budget=0.02 gives .* slots .* cache.sink \\+ cache.recent"),
        (["budget=10"], "budget must be a fraction in \\(0, 1\\].*slots=10"),
        (["slots=10"], "slots=10 must be larger than cache.sink \\+ cache.recent = 14"),
        (["task.context_tokens=10"], "task: passkey: context_tokens must be"),
        (["batch_size=0"], "batch_size must be an integer >= 1"),
        (["+task.colour=red"], "task: .*colour"),
    ],
)
def test_bad_values_are_refused_before_anything_runs(refs, overrides, message):
    with pytest.raises(ConfigError, match=message):
        prepare(make_cfg(refs, *PASSKEY, *overrides))


def test_reference_follows_the_weights_of_a_model_folder(refs, tmp_path):
    """A model folder whose weights changed after a run gets a new full-cache reference, never the old one."""
    from safetensors.torch import load_file, save_file

    from lshe.models import load_model

    folder = tmp_path / "model"
    model, tokenizer = load_model("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    args = [*PASSKEY, f"model.name={folder}", "policy=full"]
    first, _ = run(refs, tmp_path, *args)
    again, _ = run(refs, tmp_path, *args)
    assert not first["reference_reused"] and again["reference_reused"]
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    tensors = {name: t * 2 if name.endswith("q_proj.weight") else t for name, t in tensors.items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    changed, predictions = run(refs, tmp_path, *args)
    assert not changed["reference_reused"]  # recomputed on the new weights
    assert changed["score_full"] == changed["score"]


def test_the_fast_decoder_gives_the_predictions_of_generate(refs, tmp_path):
    """runner.fast_decode=true (lshe.fast_decode, the GPU default) and =false (generate): same predictions,
    batched rows with per-row stops included."""
    task = ["task=gsm_symbolic", "task.max_new_tokens=6", "limit=3", "batch_size=2"]
    fast, fast_rows = run(refs, tmp_path, *task, "policy=lshe", "budget=0.5", "runner.fast_decode=true")
    slow, slow_rows = run(refs, tmp_path, *task, "policy=lshe", "budget=0.5", "runner.fast_decode=false")
    assert fast["decoder"] == "lshe.fast_decode" and slow["decoder"] == "generate"
    assert [r["prediction"] for r in fast_rows] == [r["prediction"] for r in slow_rows]
    assert [r["generated_tokens"] for r in fast_rows] == [r["generated_tokens"] for r in slow_rows]
    assert fast["score"] == slow["score"] and fast["decode_tokens_per_s"] > 0
    assert fast["examples_per_s"] == pytest.approx(3 / fast["policy_wall_s"]) and slow["examples_per_s"] > 0
    # the second batch (1 row) alone: its seconds are part of the whole run's
    assert 1 / fast["examples_per_s_warm"] < fast["policy_wall_s"] and fast["prefill_s_warm"] > 0


def test_warm_speeds_leave_the_first_batch_out():
    batch = {
        "slots": 10,
        "kv_bytes": 100,
        "kv_bytes_detail": {"keys": 50},
        "decode_s": 1.0,
        "decode_tokens": 4,
    }
    batches = [
        {**batch, "rows": 2, "prefill_s": 9.0, "wall_s": 12.0},  # cold: compiles, starts CUDA
        {**batch, "rows": 2, "prefill_s": 1.0, "wall_s": 2.0},
        {**batch, "rows": 1, "prefill_s": 2.0, "wall_s": 3.0},
    ]
    summary = summarize_batches(batches)
    assert summary["examples_per_s"] == pytest.approx(5 / 17)
    assert summary["examples_per_s_warm"] == pytest.approx(3 / 5)
    assert summary["prefill_s"] == pytest.approx(4.0) and summary["prefill_s_warm"] == pytest.approx(1.5)
    single = summarize_batches(batches[:1])
    assert single["examples_per_s_warm"] is None and single["prefill_s_warm"] is None


@pytest.mark.parametrize("products", ["inductor", "gemv"])
def test_the_compiled_fast_decoder_gives_the_predictions_of_generate(refs, tmp_path, products):
    """runner.compile=true (decoder layers through torch.compile, here inductor's CPU backend; with
    runner.products=gemv the layers' Linears through lshe.one_row_products, F.linear on the CPU) and
    plain generate: same predictions on the same batched rows."""
    task = [
        "task=gsm_symbolic",
        "task.max_new_tokens=6",
        "limit=3",
        "batch_size=2",
        "policy=lshe",
        "budget=0.5",
    ]
    fast = ["runner.fast_decode=true", "runner.compile=true", f"runner.products={products}"]
    compiled, rows = run(refs, tmp_path, *task, *fast)
    slow, slow_rows = run(refs, tmp_path, *task, "runner.fast_decode=false")
    assert compiled["decoder"] == f"lshe.fast_decode + compile ({products} products)"
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in slow_rows]
    assert [r["generated_tokens"] for r in rows] == [r["generated_tokens"] for r in slow_rows]


def test_compile_without_the_fast_decoder_is_refused(refs, tmp_path):
    with pytest.raises(ConfigError, match="runner.compile=true .* runner.fast_decode=true"):
        run(refs, tmp_path, *PASSKEY, "policy=full", "runner.fast_decode=false", "runner.compile=true")
