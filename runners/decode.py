"""Decoding a policy over a task's prompts, and the full-cache reference: one home for every runner.

`Workload` is what decoding needs (model, tokenizer, prompts, cache settings). `run_policy` runs a
policy over all prompts in left-padded batches, one fresh `EvictingCache` per batch:

* generation tasks: greedy ``generate`` up to the task's ``max_new_tokens`` (stopping at EOS);
* perplexity tasks: one teacher-forced forward pass with ``prefill=sequential``, so the cache evicts
  as the text streams in; the output is the NLL of every scored token.

Prompt protocols (``cache.protocol``): ``joint`` (default) prefills each whole prompt in one forward
call, so the prefill strategy compresses context and question together (``window`` probes with the
question's queries) and the budget is a fraction of prompt + max_new_tokens. ``kvpress`` does what
kvpress's pipeline does: it prefills the context alone (the cache's prefill strategy, and a budget
that is a fraction of the context's tokens, like kvpress's ``1 - compression_ratio``), then appends
the question and generates, with room for both (`lshe.cache.EvictingCache.extend`): nothing is
evicted after the context, and the question is never compressed.

`full_reference` runs the ``full`` policy once for a workload and stores the outputs on disk, keyed by
a fingerprint of everything that determines them (model weights and config, tokenizer, the exact
prompts, generation settings, batch size, device type, library versions). A stored reference is used
only if its fingerprint and checksum verify (`runners.results.load_json`); otherwise it is recomputed
with a one-line note.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runners import results
from runners.measure import PeakMemory, Stopwatch, forward_laps

log = logging.getLogger("lshe")


@dataclass
class Workload:
    """A model, a task's prompts, and the cache settings a policy is run with."""

    model: object
    tokenizer: object
    device: str
    task: object
    examples: list
    prompts: list[list[int]]  # token ids per example
    chat: bool  # prompts use the chat template
    cache: dict  # EvictingCache settings besides policy and budget: sink, recent, prefill, window
    batch_size: int = 1
    fast: bool = False  # greedy generation through lshe.fast_decode instead of generate (same tokens)
    graph: bool = False  # with ``fast`` on CUDA: decode steps replayed from a CUDA graph
    # with ``fast``: decode steps through compiled decoder layers (a `lshe.compiled.CompiledLayers`)
    compile: Any = False
    protocol: str = "joint"  # joint: the prompt prefilled at once | kvpress: context, then question
    contexts: list[int] | None = None  # kvpress: the context's tokens at the start of each prompt

    @property
    def max_new_tokens(self) -> int:
        return self.task.max_new_tokens if self.task.kind == "generate" else 0


def encode_prompts(task, tokenizer, examples, model_name: str) -> tuple[list[list[int]], bool]:
    """Token ids of every example: the chat template (+ answer prefix) or plain text (+ " " + prefix)."""
    chat = bool(task.chat_template and task.kind == "generate")
    if chat and not tokenizer.chat_template:
        log.warning("note: %s has no chat template; %s prompts are plain text", model_name, task.name)
        chat = False
    prompts = []
    for example in examples:
        if task.kind == "perplexity":
            prompts.append(tokenizer(example.prompt)["input_ids"])
        else:
            text = prompt_text(task, tokenizer, example, chat)
            prompts.append(tokenizer(text, add_special_tokens=not chat)["input_ids"])
    return prompts, chat


def prompt_text(task, tokenizer, example, chat: bool) -> str:
    """The text a generation prompt is encoded from: the chat template around the example's prompt plus
    the answer prefix (special tokens are in the template), or the plain prompt + " " + prefix."""
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": example.prompt}], add_generation_prompt=True, tokenize=False
        )
        return text + task.answer_prefix
    return example.prompt + (" " + task.answer_prefix if task.answer_prefix else "")


def context_tokens(task, tokenizer, examples, prompts: list[list[int]], chat: bool) -> list[int]:
    """For the kvpress protocol: how many of each prompt's tokens (`encode_prompts`) are the context,
    the rest being the question (+ chat template end and answer prefix). Split on the tokenizer's
    offsets, so that context + question are exactly the joint prompt's tokens (a token that straddles
    the boundary belongs to the context). ValueError for an example without a question."""
    counts = []
    for example, ids in zip(examples, prompts, strict=True):
        if not getattr(example, "question", ""):
            raise ValueError(
                f"cache.protocol=kvpress needs examples with a question; task {task.name} has none "
                "(use cache.protocol=joint)"
            )
        text = prompt_text(task, tokenizer, example, chat)
        end = text.index(example.prompt) + len(example.context) if chat else len(example.context)
        encoded = tokenizer(text, add_special_tokens=not chat, return_offsets_mapping=True)
        if encoded["input_ids"] != ids:
            raise ValueError(f"example {example.id}: re-encoding the prompt gave other tokens")
        # special tokens (BOS) have the empty span (0, 0) and belong to the context
        n = sum(1 for start, stop in encoded["offset_mapping"] if start < end or stop == 0 == start)
        if not 0 < n < len(ids):
            raise ValueError(f"example {example.id}: the question is empty after tokenization")
        counts.append(n)
    return counts


def new_cache(work: Workload, policy, budget, diagnostics=None, max_new_tokens: int | None = None):
    """A fresh cache for one batch (observed by ``diagnostics`` when given); ``max_new_tokens`` defaults
    to the task's (the kvpress protocol passes 0: its budget is a fraction of the context alone)."""
    from lshe.cache import EvictingCache

    new = work.max_new_tokens if max_new_tokens is None else max_new_tokens
    kwargs = dict(budget=budget, max_new_tokens=new, **work.cache)
    return diagnostics.cache(policy, **kwargs) if diagnostics is not None else EvictingCache(policy, **kwargs)


def run_policy(work: Workload, policy, budget, desc: str, diagnostics=None) -> tuple[list[dict], list[dict]]:
    """Run ``policy`` over every prompt. Returns per-example outputs and per-batch measurements."""
    import torch
    from tqdm.auto import tqdm

    step = _perplexity_batch if work.task.kind == "perplexity" else _generate_batch
    outputs: list[dict] = []
    batches: list[dict] = []
    n = len(work.prompts)
    with (
        tqdm(total=n, desc=desc, unit="ex", file=sys.stderr, dynamic_ncols=True) as bar,
        torch.inference_mode(),
    ):
        for start, stop in batch_ranges(work):
            began = time.perf_counter()
            prompts = work.prompts[start:stop]
            if work.protocol == "kvpress":
                cache = new_cache(work, policy, budget, diagnostics, max_new_tokens=0)
                rows, measured = _kvpress_batch(work, cache, prompts, work.contexts[start:stop])
            else:
                cache = new_cache(work, policy, budget, diagnostics)
                ids, mask = _pad(work, prompts)
                rows, measured = step(work, cache, ids, mask, prompts)
            nbytes = cache.nbytes()
            measured.update(
                rows=len(prompts),
                slots=cache.slots(),
                kv_bytes=nbytes["total"],
                kv_bytes_detail={k: v for k, v in nbytes.items() if k != "total"},
                wall_s=time.perf_counter() - began,  # the rows are on the host: the device is done
            )
            outputs.extend(rows)
            batches.append(measured)
            bar.update(len(prompts))
    return outputs, batches


def batch_ranges(work: Workload) -> list[tuple[int, int]]:
    """(start, stop) of each batch: ``batch_size`` consecutive prompts; under the kvpress protocol a
    batch also ends where the question length changes (the question is appended to every row of a
    batch at once, and only left padding is supported)."""
    n, size = len(work.prompts), work.batch_size
    if work.protocol != "kvpress":
        return [(start, min(start + size, n)) for start in range(0, n, size)]
    questions = [len(p) - c for p, c in zip(work.prompts, work.contexts, strict=True)]
    ranges, start = [], 0
    for i in range(1, n + 1):
        if i == n or i - start == size or questions[i] != questions[start]:
            ranges.append((start, i))
            start = i
    return ranges


def _kvpress_batch(work: Workload, cache, prompts: list[list[int]], contexts: list[int]):
    """kvpress's protocol: prefill (and compress) the contexts alone, give the cache room for the
    question and answer (`EvictingCache.extend`: nothing is evicted after the context), then generate
    from the whole prompt: ``generate`` feeds only the question tokens, the context being cached.
    Always through ``generate`` (the fast decoder starts from an empty cache); the reported prefill
    time is the context's plus the question's."""
    import dataclasses

    import torch

    ids, mask = _pad(work, [p[:c] for p, c in zip(prompts, contexts, strict=True)])
    question = torch.tensor([p[c:] for p, c in zip(prompts, contexts, strict=True)], device=ids.device)
    with forward_laps(work.model, work.device) as watch:
        work.model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
    cache.extend(question.shape[1] + work.max_new_tokens)
    full_ids = torch.cat([ids, question], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(question)], dim=1)
    rows, measured = _generate_batch(
        dataclasses.replace(work, fast=False), cache, full_ids, full_mask, prompts
    )
    measured["prefill_s"] += watch.laps_ms()[0] / 1e3
    return rows, measured


def _pad(work: Workload, prompts: list[list[int]]):
    enc = work.tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
    return enc["input_ids"].to(work.device), enc["attention_mask"].to(work.device)


def _generate_batch(work: Workload, cache, ids, mask, prompts) -> tuple[list[dict], dict]:
    """Greedy generation of one batch: `lshe.fast_decode.greedy_generate` when ``work.fast``, else
    ``generate`` (same tokens); prefill and decode timed on the device."""
    config = work.model.generation_config
    eos = config.eos_token_id
    eos = list(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if work.fast:
        from lshe.fast_decode import greedy_generate

        watch = Stopwatch(work.device)
        watch.mark()
        new = greedy_generate(work.model, cache, ids, mask, work.task.max_new_tokens, eos,
                              config.pad_token_id, graph=work.graph, watch=watch,
                              compile=work.compile)  # fmt: skip
        watch.mark()
        laps = watch.laps_ms()
        prefill_ms, decode_ms, steps = laps[0], laps[1], new.shape[1] - 1
    else:
        with forward_laps(work.model, work.device) as watch:
            out = work.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=work.task.max_new_tokens, do_sample=False,
                cache=cache,
            )  # fmt: skip
        new, laps = out[:, ids.shape[1] :], watch.laps_ms()
        prefill_ms, decode_ms, steps = laps[0], sum(laps[1:]), len(laps) - 1
    rows = []
    for i, tokens in enumerate(new.tolist()):
        n = next((j + 1 for j, t in enumerate(tokens) if t in eos), len(tokens))
        rows.append(
            {
                "prediction": work.tokenizer.decode(tokens[:n], skip_special_tokens=True).strip(),
                "prompt_tokens": len(prompts[i]),
                "generated_tokens": n,
            }
        )
    # every step after the prefill decodes one token for every row of the batch
    return rows, {
        "prefill_s": prefill_ms / 1e3,
        "decode_s": decode_ms / 1e3,
        "decode_tokens": steps * len(prompts),
    }


def _perplexity_batch(work: Workload, cache, ids, mask, prompts) -> tuple[list[dict], dict]:
    import torch

    with forward_laps(work.model, work.device) as watch:
        logits = work.model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True).logits
    seconds = watch.laps_ms()[0] / 1e3
    scored = (mask[:, 1:] * mask[:, :-1]).bool()
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none"
    ).masked_fill(~scored, 0.0)
    rows = []
    for i in range(len(prompts)):
        tokens, total = int(scored[i].sum()), float(nll[i].sum())
        rows.append(
            {
                "nll": total,
                "tokens": tokens,
                "prompt_tokens": len(prompts[i]),
                "perplexity": math.exp(total / max(tokens, 1)),
            }
        )
    return rows, {"prefill_s": seconds, "decode_s": seconds, "decode_tokens": int(scored.sum())}


def summarize_batches(batches: list[dict]) -> dict:
    """Per-sequence cache size and slots, mean prefill time per batch, decode throughput, examples per
    second; the ``_warm`` ones leave the first batch out (it pays a process's one-time costs: CUDA and
    cuBLAS start-up, Triton compilation, ``torch.compile``), None with a single batch."""
    rows = sum(b["rows"] for b in batches)
    decode_s = sum(b["decode_s"] for b in batches)
    decode_tokens = sum(b["decode_tokens"] for b in batches)
    wall = sum(b["wall_s"] for b in batches) if all("wall_s" in b for b in batches) else None
    warm = batches[1:]
    warm_wall = sum(b["wall_s"] for b in warm) if warm and wall else None
    return {
        "kv_slots": sum(b["slots"] * b["rows"] for b in batches) / rows,
        "kv_cache_bytes": sum(b["kv_bytes"] for b in batches) / rows,
        "kv_cache_bytes_detail": {
            k: sum(b["kv_bytes_detail"][k] for b in batches) / rows for k in batches[0]["kv_bytes_detail"]
        },
        "prefill_s": sum(b["prefill_s"] for b in batches) / len(batches),
        "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else None,
        # the whole run of the batches (prefill, decode, tokens to the host); None for a reference
        # stored before this was measured
        "policy_wall_s": wall,
        "examples_per_s": rows / wall if wall else None,
        "prefill_s_warm": sum(b["prefill_s"] for b in warm) / len(warm) if warm else None,
        "examples_per_s_warm": sum(b["rows"] for b in warm) / warm_wall if warm_wall else None,
    }


# ---- the full-cache reference ------------------------------------------------------------------------
REFERENCE_KEYS = ("outputs", "batches", "wall_s", "peak_memory_bytes")


def model_fingerprint(model, seed: int) -> dict:
    """What determines a model's outputs: its config, and its weight files' content when it has a folder
    (else the seed of its random initialisation)."""
    import torch
    import transformers

    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    folder = getattr(model, "weights_dir", None)
    weights = results.weights_fingerprint(folder) if folder and Path(folder).is_dir() else {"seed": seed}
    return {
        "config": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
        "weights": weights,
        "dtype": str(model.dtype),
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
    }


def reference_fingerprint(work: Workload, seed: int) -> dict:
    tok = work.tokenizer
    tokenizer = {"class": type(tok).__name__, "vocab": len(tok), "chat_template": tok.chat_template or ""}
    return {
        "model": model_fingerprint(work.model, seed),
        "tokenizer": hashlib.sha256(json.dumps(tokenizer, sort_keys=True).encode()).hexdigest(),
        "prompts": hashlib.sha256(json.dumps(work.prompts).encode()).hexdigest(),
        "kind": work.task.kind,
        "max_new_tokens": work.max_new_tokens,
        "batch_size": work.batch_size,
        "device": work.device.split(":")[0],
        "format": 4,  # 4: an unpadded batch prefills through causal SDPA (e0308e9), not a masked one
    }


def reference_path(work: Workload, seed: int, root: str | Path | None, model_name: str) -> Path:
    """Where the reference of this workload is stored (the name carries its fingerprint's digest)."""
    from lshe.assets import cache_dir

    fingerprint = reference_fingerprint(work, seed)
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:20]
    folder = Path(root).expanduser() if root else cache_dir() / "references"
    model = re.sub(r"[^\w.-]+", "_", model_name)
    return folder / f"{work.task.name}-{model}-{digest}.json"


def full_reference(work: Workload, seed: int, root: str | Path | None, model_name: str) -> dict:
    """The full-cache outputs and measurements for this workload: verified from disk, or computed once.

    A lock file serialises concurrent jobs (joblib, SLURM) that need the same reference: the first
    computes it, the others wait and read it.
    """
    from policies.full import FullPolicy

    fingerprint = reference_fingerprint(work, seed)
    path = reference_path(work, seed, root, model_name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file where a folder should be, no permission: one line naming the key
        cause = err.strerror or type(err).__name__
        raise results.ResultsError(
            err.errno, f"{cause} (reference_dir={root}: the full-cache references' folder)", str(path.parent)
        ) from None
    with results.file_lock(path):
        stored = results.load_json(path, fingerprint)
        if stored is not None and all(k in stored for k in REFERENCE_KEYS):
            if len(stored["outputs"]) == len(work.prompts):
                return {**stored, "reused": True}
            log.warning(
                "note: reference %s holds %d outputs for %d prompts: recomputing",
                path,
                len(stored["outputs"]),
                len(work.prompts),
            )
        start = time.perf_counter()
        memory = PeakMemory(work.device)
        memory.reset()
        outputs, batches = run_policy(work, FullPolicy(), 1.0, "full-cache reference")
        stored = {
            "outputs": outputs,
            "batches": batches,
            "wall_s": time.perf_counter() - start,
            "peak_memory_bytes": memory.read(),
        }
        results.store_json(path, stored, fingerprint)
        return {**stored, "reused": False}
