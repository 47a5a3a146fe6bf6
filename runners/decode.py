"""Decoding a policy over a task's prompts, and the full-cache reference: one home for every runner.

`Workload` is what decoding needs (model, tokenizer, prompts, cache settings). `run_policy` runs a
policy over all prompts in left-padded batches, one fresh `EvictingCache` per batch:

* generation tasks: greedy ``generate`` up to the task's ``max_new_tokens`` (stopping at EOS);
* perplexity tasks: one teacher-forced forward pass with ``prefill=sequential``, so the cache evicts
  as the text streams in; the output is the NLL of every scored token.

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
        elif chat:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": example.prompt}], add_generation_prompt=True, tokenize=False
            )
            prompts.append(tokenizer(text + task.answer_prefix, add_special_tokens=False)["input_ids"])
        else:
            text = example.prompt + (" " + task.answer_prefix if task.answer_prefix else "")
            prompts.append(tokenizer(text)["input_ids"])
    return prompts, chat


def new_cache(work: Workload, policy, budget, diagnostics=None):
    """A fresh cache for one batch (observed by ``diagnostics`` when given)."""
    from lshe.cache import EvictingCache

    kwargs = dict(budget=budget, max_new_tokens=work.max_new_tokens, **work.cache)
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
        for start in range(0, n, work.batch_size):
            prompts = work.prompts[start : start + work.batch_size]
            cache = new_cache(work, policy, budget, diagnostics)
            ids, mask = _pad(work, prompts)
            rows, measured = step(work, cache, ids, mask, prompts)
            nbytes = cache.nbytes()
            measured.update(
                rows=len(prompts),
                slots=cache.slots(),
                kv_bytes=nbytes["total"],
                kv_bytes_detail={k: v for k, v in nbytes.items() if k != "total"},
            )
            outputs.extend(rows)
            batches.append(measured)
            bar.update(len(prompts))
    return outputs, batches


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
                              config.pad_token_id, graph=work.graph, watch=watch)  # fmt: skip
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
    """Per-sequence cache size and slots, mean prefill time per batch, decode throughput."""
    rows = sum(b["rows"] for b in batches)
    decode_s = sum(b["decode_s"] for b in batches)
    decode_tokens = sum(b["decode_tokens"] for b in batches)
    return {
        "kv_slots": sum(b["slots"] * b["rows"] for b in batches) / rows,
        "kv_cache_bytes": sum(b["kv_bytes"] for b in batches) / rows,
        "kv_cache_bytes_detail": {
            k: sum(b["kv_bytes_detail"][k] for b in batches) / rows for k in batches[0]["kv_bytes_detail"]
        },
        "prefill_s": sum(b["prefill_s"] for b in batches) / len(batches),
        "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else None,
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
        "format": 3,
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
    path.parent.mkdir(parents=True, exist_ok=True)
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
