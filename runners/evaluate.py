"""The evaluation runner (``runner=evaluate``): one policy, one budget, one task -> score, speed, memory.

For each batch of examples a fresh `EvictingCache` is built for the policy and budget; then

* generation tasks: the prompt (the task's chat template or plain text, plus its answer prefix) is
  left-padded into a batch and generated greedily; the prediction is scored by the task;
* perplexity tasks: one teacher-forced forward pass with ``cache.prefill=sequential``, so the cache
  evicts as the text streams in (StreamingLLM-style); the score is ``exp(mean NLL per token)``.

The same examples are also run once with the full cache (no eviction), and that reference is cached
on disk (``reference_dir``, keyed by model, task settings and the exact prompts, seed, batch size and
device), so a sweep computes it once. It gives ``score_full``, the agreement of every output with the
full-cache output (exact match, ROUGE-L), the summarization target, and ``kv_cache_bytes_full``.
A ``full`` policy job reuses the reference instead of recomputing it.

Timing hooks on the model time each forward call: the first call of a generate is the prefill, the
rest are decode steps. Results go to the job's output folder (`runners.results`) and to the logger.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import math
import re
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from runners import common, results
from runners.common import ConfigError
from runners.wandb_logger import make_logger

logging.getLogger("absl").setLevel(logging.WARNING)  # rouge_score logs at INFO on first use


# ------------------------------------------------------------------------------------------ job setup
@dataclass
class Job:
    """Everything one evaluation needs, checked before anything runs or is written."""

    cfg: DictConfig
    label: str  # the policy's config name
    policy: object
    task: object
    model: object
    tokenizer: object
    device: str
    examples: list
    prompts: list[list[int]]  # token ids per example
    chat: bool  # prompts use the chat template
    prefill: str  # effective cache.prefill (sequential for perplexity)
    extra: dict = field(default_factory=dict)


def prepare(cfg: DictConfig) -> Job:
    """Check the config, build policy, task, model and prompts. Raises `ConfigError` on bad input."""
    common.validate(cfg)
    common.set_threads(cfg)
    device = common.resolve_device(cfg.device)
    policy = common.build_policy(cfg)
    label = common.policy_label(cfg, policy)
    task = make_task(cfg)
    attn = common.attention_for(cfg, policy)
    model, tokenizer = common.load_model(cfg, attn, device)
    try:
        examples = task.examples(tokenizer)
    except ValueError as err:
        raise ConfigError(f"task: {err}") from None
    if cfg.limit is not None:
        examples = examples[: cfg.limit]
    chat = bool(task.chat_template and task.kind == "generate")
    if chat and not tokenizer.chat_template:
        print(
            f"note: {cfg.model.name} has no chat template; {task.name} prompts are plain text",
            file=sys.stderr,
        )
        chat = False
    prompts = [encode_prompt(task, tokenizer, example, chat) for example in examples]
    prefill = "sequential" if task.kind == "perplexity" else cfg.cache.prefill
    job = Job(cfg, label, policy, task, model, tokenizer, device, examples, prompts, chat, prefill)
    check_budget(job)
    return job


def make_task(cfg: DictConfig):
    """The task ``cfg.task`` describes; ``null`` values leave the task class's default in place."""
    from lshe.tasks import TASKS
    from lshe.tasks import make_task as build

    params = {k: v for k, v in common.plain(cfg.task).items() if v is not None}
    name = params.pop("name", None)
    if name not in TASKS:
        raise ConfigError(f"task.name must be one of {sorted(TASKS)}, got {name!r}")
    try:
        return build(name, **params)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"task: {err}") from None


def task_settings(task) -> dict:
    """The settings a task holds (its public attributes of plain types), for the results."""
    plain_types = (int, float, str, bool, type(None))
    settings = {}
    for key, value in vars(task).items():
        if key.startswith("_"):
            continue
        if isinstance(value, (list, tuple)) and all(isinstance(v, plain_types) for v in value):
            settings[key] = list(value)
        elif isinstance(value, plain_types):
            settings[key] = value
    return settings


def encode_prompt(task, tokenizer, example, chat: bool) -> list[int]:
    """Token ids of one example: the chat template (+ answer prefix) or plain text (+ " " + prefix)."""
    if task.kind == "perplexity":
        return tokenizer(example.prompt)["input_ids"]
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": example.prompt}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(text + task.answer_prefix, add_special_tokens=False)["input_ids"]
    text = example.prompt + (" " + task.answer_prefix if task.answer_prefix else "")
    return tokenizer(text)["input_ids"]


def check_budget(job: Job) -> None:
    """Refuse budgets the cache would reject mid-run, and prompts longer than the model's positions."""
    cfg, task = job.cfg, job.task
    new = task.max_new_tokens if task.kind == "generate" else 0
    try:
        make_cache(job, job.policy, new)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    lengths = [len(p) for p in job.prompts]
    if not lengths:
        raise ConfigError(f"task {task.name} produced no examples")
    limit = getattr(job.model.config, "max_position_embeddings", None)
    if limit and max(lengths) + new > limit:
        raise ConfigError(
            f"task: the longest prompt ({max(lengths)} tokens) + max_new_tokens ({new}) exceeds the "
            f"{limit} positions of {cfg.model.name}; lower the task's context length"
        )
    if job.policy.evicts and isinstance(cfg.budget, float) and cfg.budget < 1.0:
        shortest = min(lengths)
        slots = math.ceil(cfg.budget * (shortest + new))
        floor = cfg.cache.sink + cfg.cache.recent
        if slots <= floor:
            raise ConfigError(
                f"budget={cfg.budget} gives {slots} slots for the shortest prompt ({shortest} tokens + "
                f"{new} new); it must be larger than cache.sink + cache.recent = {floor}: raise budget "
                "or lower cache.sink / cache.recent"
            )


def make_cache(job: Job, policy, max_new_tokens: int):
    from lshe.cache import EvictingCache

    c = job.cfg.cache
    return EvictingCache(
        policy,
        budget=job.cfg.budget,
        sink=c.sink,
        recent=c.recent,
        prefill=job.prefill,
        window=c.window,
        max_new_tokens=max_new_tokens,
    )


# ------------------------------------------------------------------------------------------ measuring
class StepTimer:
    """Times every forward call of the model (device-synchronised): the first is the prefill."""

    def __init__(self, model, device: str) -> None:
        import torch

        self.model = model
        self.cuda = device.startswith("cuda")
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        self.start: float | None = None
        self.ends: list[float] = []
        self.handles = []

    def __enter__(self) -> StepTimer:
        self.handles = [
            self.model.register_forward_pre_hook(self._before),
            self.model.register_forward_hook(self._after),
        ]
        return self

    def __exit__(self, *exc) -> bool:
        for handle in self.handles:
            handle.remove()
        return False

    def _before(self, *args) -> None:
        if self.start is None:
            self.sync()
            self.start = time.perf_counter()

    def _after(self, *args) -> None:
        self.sync()
        self.ends.append(time.perf_counter())

    @property
    def prefill_s(self) -> float:
        return self.ends[0] - self.start

    @property
    def decode_steps(self) -> int:
        return len(self.ends) - 1

    @property
    def decode_s(self) -> float:
        return self.ends[-1] - self.ends[0]


class PeakMemory:
    """Peak memory of this job: CUDA ``max_memory_allocated``, else the process's peak RSS.

    On Linux the RSS peak (VmHWM) is reset at `reset` through ``/proc/self/clear_refs``; elsewhere it is
    the peak of the whole process so far (``getrusage``), which in a multi-job process includes earlier jobs.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.source = "cuda_max_memory_allocated" if device.startswith("cuda") else "process_peak_rss"

    def reset(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")

    def read(self) -> int:
        import torch

        if self.device.startswith("cuda"):
            return int(torch.cuda.max_memory_allocated(self.device))
        with contextlib.suppress(OSError):
            match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
            if match:
                return int(match.group(1)) * 1024
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


# ------------------------------------------------------------------------------------------ running
def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _pad(tokenizer, prompts: list[list[int]], device: str):
    enc = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ex", file=sys.stderr, dynamic_ncols=True)


def run_policy(job: Job, policy, desc: str, diagnostics=None) -> tuple[list[dict], list[dict]]:
    """Run ``policy`` over all examples. Returns per-example outputs and per-batch measurements."""
    import torch

    if job.task.kind == "perplexity":
        step = _perplexity_batch
    else:
        step = _generate_batch
    outputs: list[dict] = []
    batches: list[dict] = []
    with _progress(len(job.prompts), desc) as bar, torch.inference_mode():
        for start, stop in _batches(len(job.prompts), job.cfg.batch_size):
            cache = make_cache(job, policy, job.task.max_new_tokens if job.task.kind == "generate" else 0)
            observer = None
            if diagnostics is not None:
                observer = diagnostics.__class__()
                cache.observer = observer
            rows, measured = step(job, cache, job.prompts[start:stop])
            if observer is not None:
                diagnostics.merge(observer)
            nbytes = cache.nbytes()
            measured.update(
                rows=stop - start,
                slots=cache.slots(),
                kv_bytes=nbytes["total"],
                kv_bytes_detail={k: v for k, v in nbytes.items() if k != "total"},
            )
            outputs.extend(rows)
            batches.append(measured)
            del cache
            bar.update(stop - start)
    return outputs, batches


def _generate_batch(job: Job, cache, prompts: list[list[int]]) -> tuple[list[dict], dict]:
    ids, mask = _pad(job.tokenizer, prompts, job.device)
    with StepTimer(job.model, job.device) as timer:
        out = job.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=job.task.max_new_tokens,
            do_sample=False,
            cache=cache,
        )
    new = out[:, ids.shape[1] :]
    eos = job.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    rows = []
    for i, tokens in enumerate(new.tolist()):
        n = next((j + 1 for j, t in enumerate(tokens) if t in eos), len(tokens))
        rows.append(
            {
                "prediction": job.tokenizer.decode(tokens[:n], skip_special_tokens=True).strip(),
                "prompt_tokens": len(prompts[i]),
                "generated_tokens": n,
            }
        )
    steps = timer.decode_steps
    measured = {
        "prefill_s": timer.prefill_s,
        "decode_s": timer.decode_s if steps > 0 else 0.0,
        "decode_tokens": steps * len(prompts),
    }
    return rows, measured


def _perplexity_batch(job: Job, cache, prompts: list[list[int]]) -> tuple[list[dict], dict]:
    import torch

    ids, mask = _pad(job.tokenizer, prompts, job.device)
    with StepTimer(job.model, job.device) as timer:
        logits = job.model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True).logits
    targets = ids[:, 1:]
    scored = (mask[:, 1:] * mask[:, :-1]).bool()
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, reduction="none"
    ).masked_fill(~scored, 0.0)
    rows = []
    for i in range(len(prompts)):
        tokens = int(scored[i].sum())
        total = float(nll[i].sum())
        rows.append(
            {
                "nll": total,
                "tokens": tokens,
                "prompt_tokens": len(prompts[i]),
                "perplexity": math.exp(total / max(tokens, 1)),
            }
        )
    elapsed = timer.prefill_s
    measured = {"prefill_s": elapsed, "decode_s": elapsed, "decode_tokens": int(scored.sum())}
    return rows, measured


# ------------------------------------------------------------------------------------------ reference
def reference_path(job: Job) -> Path:
    """Where the full-cache reference of these exact prompts and settings is cached."""
    from lshe.assets import cache_dir

    cfg = job.cfg
    key = {
        "model": {k: v for k, v in common.plain(cfg.model).items() if k != "attn_implementation"},
        "seed": cfg.seed,
        "kind": job.task.kind,
        "max_new_tokens": job.task.max_new_tokens,
        "batch_size": cfg.batch_size,
        "device": job.device.split(":")[0],
        "prompts": hashlib.sha256(json.dumps(job.prompts).encode()).hexdigest(),
        "format": 2,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    root = Path(cfg.reference_dir).expanduser() if cfg.get("reference_dir") else cache_dir() / "references"
    model = re.sub(r"[^\w.-]+", "_", str(cfg.model.name))
    return root / f"{job.task.name}-{model}-{digest}.json"


def full_reference(job: Job) -> dict:
    """The full-cache outputs and measurements for these prompts: loaded from disk or computed once.

    A lock file serialises concurrent jobs (joblib, SLURM) that need the same reference: the first
    computes it, the others wait and read it.
    """
    import fcntl

    from policies.full import FullPolicy

    path = reference_path(job)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if path.is_file():
                with contextlib.suppress(json.JSONDecodeError, OSError):
                    stored = json.loads(path.read_text())
                    if len(stored.get("outputs", [])) == len(job.prompts):
                        stored["reused"] = True
                        return stored
            start = time.perf_counter()
            memory = PeakMemory(job.device)
            memory.reset()
            outputs, batches = run_policy(job, FullPolicy(), "full-cache reference")
            stored = {
                "outputs": outputs,
                "batches": batches,
                "wall_s": time.perf_counter() - start,
                "peak_memory_bytes": memory.read(),
            }
            results.atomic_write_text(path, json.dumps(stored))
            stored["reused"] = False
            return stored
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------ scoring
def score_outputs(job: Job, outputs: list[dict], reference: list[dict]) -> tuple[list[dict], dict]:
    """Per-example prediction rows and the task score (plus agreement with the full cache)."""
    from lshe.metrics import agreement

    task = job.task
    rows = []
    if task.kind == "perplexity":
        for example, out, ref in zip(job.examples, outputs, reference, strict=True):
            rows.append(
                {
                    "id": example.id,
                    "prediction": "",
                    "target": "",
                    "score": out["perplexity"],
                    "score_full": ref["perplexity"],
                    "nll": out["nll"],
                    "tokens": out["tokens"],
                    "prompt_tokens": out["prompt_tokens"],
                    "meta": example.meta,
                }
            )
        return rows, {
            "score": _perplexity(outputs),
            "score_full": _perplexity(reference),
            "scored_tokens": sum(o["tokens"] for o in outputs),
        }

    agree_exact, agree_rouge, scores, scores_full = [], [], [], []
    for example, out, ref in zip(job.examples, outputs, reference, strict=True):
        if task.name == "summarize":  # no reference summaries offline: the full-cache output is the target
            example.target = ref["prediction"]
        score = float(task.score(out["prediction"], example))
        score_full = float(task.score(ref["prediction"], example))
        agree = agreement(out["prediction"], ref["prediction"])
        scores.append(score)
        scores_full.append(score_full)
        agree_exact.append(agree["exact_match"])
        agree_rouge.append(agree["rouge_l"])
        rows.append(
            {
                "id": example.id,
                "prediction": out["prediction"],
                "target": example.target,
                "score": score,
                "full_prediction": ref["prediction"],
                "score_full": score_full,
                "agreement_exact_match": agree["exact_match"],
                "agreement_rouge_l": agree["rouge_l"],
                "prompt_tokens": out["prompt_tokens"],
                "generated_tokens": out["generated_tokens"],
                "meta": example.meta,
            }
        )
    n = len(rows)
    return rows, {
        "score": sum(scores) / n,
        "score_full": sum(scores_full) / n,
        "agreement_exact_match": sum(agree_exact) / n,
        "agreement_rouge_l": sum(agree_rouge) / n,
        "generated_tokens": sum(o["generated_tokens"] for o in outputs) / n,
    }


def _perplexity(outputs: list[dict]) -> float:
    tokens = sum(o["tokens"] for o in outputs)
    return math.exp(sum(o["nll"] for o in outputs) / max(tokens, 1))


def summarize_batches(batches: list[dict]) -> dict:
    """Per-sequence cache size and slots, mean prefill time per batch, decode throughput."""
    rows = sum(b["rows"] for b in batches)
    decode_s = sum(b["decode_s"] for b in batches)
    decode_tokens = sum(b["decode_tokens"] for b in batches)
    detail_keys = batches[0]["kv_bytes_detail"].keys()
    return {
        "kv_slots": sum(b["slots"] * b["rows"] for b in batches) / rows,
        "kv_cache_bytes": sum(b["kv_bytes"] for b in batches) / rows,
        "kv_cache_bytes_detail": {
            k: sum(b["kv_bytes_detail"][k] for b in batches) / rows for k in detail_keys
        },
        "prefill_s": sum(b["prefill_s"] for b in batches) / len(batches),
        "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else None,
    }


# ------------------------------------------------------------------------------------------ the job
def evaluate(job: Job, output_dir: Path) -> tuple[dict, list[dict]]:
    """Run the job's policy (and the cached full-cache reference); return (metrics, predictions)."""
    cfg = job.cfg
    started = time.perf_counter()
    reference = full_reference(job)
    memory = PeakMemory(job.device)
    memory.reset()
    diagnostics = None
    if cfg.get("diagnostics", False):
        from lshe.diagnostics import EvictionDiagnostics

        diagnostics = EvictionDiagnostics()
    reused = not job.policy.evicts and diagnostics is None
    if reused:  # a non-evicting policy is the full cache: its outputs are the reference's
        outputs, batches = reference["outputs"], reference["batches"]
    else:
        outputs, batches = run_policy(job, job.policy, f"{job.label} budget={cfg.budget}", diagnostics)
    predictions, scores = score_outputs(job, outputs, reference["outputs"])
    measured = summarize_batches(batches)
    full = summarize_batches(reference["batches"])

    metrics = {
        "score": scores["score"],
        "metric": job.task.metric,
        "higher_is_better": job.task.kind != "perplexity",
        "score_full": scores["score_full"],
        **{k: v for k, v in scores.items() if k not in ("score", "score_full")},
        "task": job.task.name,
        "model": str(cfg.model.name),
        "policy": job.label,
        "policy_params": job.policy.describe(),
        "budget": cfg.budget,
        "proj_dim": cfg.proj_dim,
        "seed": cfg.seed,
        "n_examples": len(job.examples),
        "batch_size": cfg.batch_size,
        "device": job.device,
        "cache": {
            "sink": cfg.cache.sink,
            "recent": cfg.cache.recent,
            "prefill": job.prefill,
            "window": cfg.cache.window,
        },
        "kv_slots": measured["kv_slots"],
        "kv_slots_full": full["kv_slots"],
        "kv_cache_bytes": measured["kv_cache_bytes"],
        "kv_cache_bytes_full": full["kv_cache_bytes"],
        "kv_cache_fraction": measured["kv_cache_bytes"] / full["kv_cache_bytes"],
        "kv_cache_bytes_detail": measured["kv_cache_bytes_detail"],
        "prefill_s": measured["prefill_s"],
        "decode_tokens_per_s": measured["decode_tokens_per_s"],
        # a job that reused the reference's outputs reports the memory of the run that made them
        "peak_memory_bytes": reference["peak_memory_bytes"] if reused else memory.read(),
        "peak_memory_source": memory.source,
        "wall_s": time.perf_counter() - started,
        "reference_reused": bool(reference.get("reused")),
        "outputs_from_reference": reused,
    }
    if diagnostics is not None:
        metrics.update(diagnostics.summary())
    from lshe.models import model_info

    metrics.update(
        task_params={**task_settings(job.task), **job.task.describe()},
        model_info=model_info(job.model),
        overrides=common.job_overrides(),
        config_hash=results.config_hash(cfg),
        output_dir=str(output_dir),
        versions=results.versions(),
    )
    if job.task.name == "niah":
        from lshe.tasks import niah_heatmap

        metrics["niah_heatmap"] = str(
            niah_heatmap(
                predictions, output_dir / "niah_heatmap.png", title=f"NIAH, {job.label}, budget {cfg.budget}"
            )
        )
    return metrics, predictions


def report(metrics: dict, output_dir: Path) -> str:
    """The short result table printed at the end of a run."""

    def size(n: float) -> str:
        for unit in ("B", "KiB", "MiB", "GiB"):
            if abs(n) < 1024 or unit == "GiB":
                return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
            n /= 1024
        return str(n)

    tps = metrics["decode_tokens_per_s"]
    lines = [
        f"task {metrics['task']} | model {metrics['model']} | policy {metrics['policy']} | "
        f"budget {metrics['budget']} | {metrics['n_examples']} examples",
        f"  score ({metrics['metric']})".ljust(24)
        + f"{metrics['score']:.4g}   full cache: {metrics['score_full']:.4g}",
    ]
    if "agreement_rouge_l" in metrics:
        lines.append(
            "  agreement with full".ljust(24)
            + f"exact {metrics['agreement_exact_match']:.3f}   rouge-l {metrics['agreement_rouge_l']:.3f}"
        )
    lines += [
        "  kv cache / sequence".ljust(24)
        + f"{size(metrics['kv_cache_bytes'])} of {size(metrics['kv_cache_bytes_full'])} full "
        f"({metrics['kv_cache_fraction']:.1%}), {metrics['kv_slots']:.0f} slots",
        "  prefill / batch".ljust(24) + f"{metrics['prefill_s']:.3f} s",
        "  decode".ljust(24) + (f"{tps:.1f} tokens/s" if tps else "n/a"),
        "  peak memory".ljust(24) + f"{size(metrics['peak_memory_bytes'])} ({metrics['peak_memory_source']})",
        "  results".ljust(24) + str(output_dir),
    ]
    return "\n".join(lines)


def release(job: Job | None) -> None:
    """Free the model between jobs of one process (the basic launcher runs a whole sweep in one)."""
    if job is None:
        return
    job.model = job.tokenizer = job.policy = None
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(cfg: DictConfig) -> dict:
    """Evaluate ``cfg.policy`` at ``cfg.budget`` on ``cfg.task``; write results; return the metrics."""
    output_dir = common.output_dir()
    job = prepare(cfg)
    try:
        multirun = common.is_multirun()
        name = ",".join(common.job_overrides()) or None
        group = common.sweep_group(common.sweep_dir()) if multirun else None
        with make_logger(cfg, output_dir, name=name, group=group, job_type="evaluate") as logger:
            metrics, predictions = evaluate(job, output_dir)
            results.save(output_dir, cfg, metrics, predictions)
            logger.log_results(metrics, predictions)
        print(report(metrics, output_dir), flush=True)
        return metrics
    finally:
        release(job)
