"""kvpress's prompt protocol: the context compressed alone, the question appended uncompressed."""

from __future__ import annotations

import math

import pytest
import torch
from test_evaluate import PASSKEY, make_cfg, run

from runners.config import ConfigError
from runners.decode import _kvpress_batch, batch_ranges, new_cache
from runners.evaluate import prepare

torch.set_num_threads(1)
KVPRESS = "cache.protocol=kvpress"


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    return tmp_path_factory.mktemp("references")


def test_tasks_split_context_and_question_and_the_tokens_split_at_the_boundary(refs):
    job = prepare(make_cfg(refs, *PASSKEY, KVPRESS, "limit=3"))
    work = job.work
    for example, ids, n in zip(work.examples, work.prompts, work.contexts, strict=True):
        assert example.context + example.question == example.prompt
        assert example.question == "\n\nWhat is the pass key?"
        question_text = work.tokenizer.decode(ids[n:])
        assert "What is the pass key?" in question_text and "grass" not in question_text
        assert "pass key is" in question_text  # the answer prefix belongs to the question part
    for task in ("niah", "ruler_vt", "ruler_cwe", "summarize"):
        cfg = make_cfg(refs, f"task={task}", KVPRESS, "limit=1")
        examples = prepare(cfg).work.examples
        assert examples[0].question and examples[0].context + examples[0].question == examples[0].prompt


@pytest.mark.parametrize(("batch_size", "prefill"), [(1, "window"), (2, "window"), (2, "sequential")])
def test_kvpress_at_budget_one_gives_the_full_cache_tokens(refs, tmp_path, batch_size, prefill):
    # the prompt split into two forward calls (context, then question) gives the one-call tokens
    metrics, predictions = run(
        refs, tmp_path, *PASSKEY, "policy=lshe", "budget=1.0", KVPRESS, "limit=3", f"batch_size={batch_size}",
        f"cache.prefill={prefill}",
    )  # fmt: skip
    assert metrics["protocol"] == "kvpress"
    assert [p["prediction"] for p in predictions] == [p["full_prediction"] for p in predictions]
    assert metrics["agreement_exact_match"] == 1.0 and metrics["score"] == metrics["score_full"]


def test_kvpress_never_evicts_the_question_or_the_answer(refs):
    job = prepare(make_cfg(refs, *PASSKEY, KVPRESS, "policy=lshe", "budget=0.3", "limit=2", "batch_size=2"))
    work = job.work
    prompts, contexts = work.prompts, work.contexts
    cache = new_cache(work, job.policy, 0.3, max_new_tokens=0)
    with torch.inference_mode():
        _kvpress_batch(work, cache, prompts, contexts)
    longest = max(contexts)
    fed_after_context = cache.get_seq_length() - longest  # question + every token generated and fed back
    for layer in cache.layers:
        kept = layer.valid.sum(-1)  # (B, H)
        for row, n in enumerate(contexts):
            assert torch.all(kept[row] == math.ceil(0.3 * n) + fed_after_context)


def test_with_eviction_the_two_protocols_differ(refs, tmp_path):
    joint, _ = run(refs, tmp_path, *PASSKEY, "policy=lshe", "budget=0.3", "limit=1")
    kvpress, _ = run(refs, tmp_path, *PASSKEY, "policy=lshe", "budget=0.3", "limit=1", KVPRESS)
    work = prepare(make_cfg(refs, *PASSKEY, KVPRESS, "limit=1")).work
    context, prompt = work.contexts[0], len(work.prompts[0])
    assert joint["kv_slots"] == math.ceil(0.3 * (prompt + 5))
    assert kvpress["kv_slots"] == math.ceil(0.3 * context) + (prompt - context) + 5
    assert joint["kv_slots"] != kvpress["kv_slots"]


def test_kvpress_batches_end_where_the_question_length_changes(refs):
    work = prepare(make_cfg(refs, *PASSKEY, KVPRESS, "limit=3", "batch_size=2")).work
    work.contexts = [len(work.prompts[0]) - 5, len(work.prompts[1]) - 6, len(work.prompts[2]) - 6]
    assert batch_ranges(work) == [(0, 1), (1, 3)]


def test_kvpress_refuses_a_task_without_a_question(refs):
    with pytest.raises(ConfigError, match="cache.protocol=kvpress"):
        prepare(make_cfg(refs, "task=perplexity", "task.context_tokens=200", KVPRESS))
    with pytest.raises(Exception, match="cache.protocol"):
        make_cfg(refs, "cache.protocol=other") and prepare(make_cfg(refs, "cache.protocol=other"))
