"""The evaluation runner (``runner=evaluate``): one policy, one budget, one task -> score, speed, memory.

The policy is run over the task's prompts (`runners.decode.run_policy`: greedy generation, or a
teacher-forced pass for perplexity tasks, whose cache evicts as the text streams in), and so is the
full cache (`runners.decode.full_reference`, computed once per model and prompts and verified before
reuse). The full-cache outputs give ``score_full`` on the same examples, the agreement of every output
with the full-cache output (exact match, ROUGE-L), the target of tasks that have none offline
(``Task.target_from_reference``), and ``kv_cache_bytes_full``. A ``full`` job reuses the reference.
Every score gets its 95% interval and the paired comparison with the full cache (`intervals`,
`runners.scoring`, `lshe.stats`): ``score_ci``, ``score_full_ci``, ``agreement_*_ci``, ``paired_vs_full``, ``intervals``.
A task's extra files (NIAH's heatmap) come from ``Task.artefacts``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from runners import common, components
from runners.common import ConfigError
from runners.config import cache_budget, validate
from runners.decode import (
    Workload,
    context_tokens,
    encode_prompts,
    full_reference,
    run_policy,
    summarize_batches,
)
from runners.measure import PeakMemory
from runners.scoring import intervals, score_outputs

log = logging.getLogger("lshe")
logging.getLogger("absl").setLevel(logging.WARNING)  # rouge_score logs at INFO on first use


class Evaluate:
    """``runner=evaluate``: a callable that runs one job and returns its metrics. Its settings
    (``fast_decode``, ``graph``, ``compile``, ``products``) are read from ``cfg.runner`` by `prepare`."""

    def __init__(
        self, *, fast_decode: str | bool, graph: bool, compile: bool = False, products: str | None = None
    ) -> None:
        self.fast_decode, self.graph, self.compile, self.products = fast_decode, graph, compile, products

    def __call__(self, cfg: DictConfig) -> dict:
        job = prepare(cfg)
        with common.job_logger(cfg, job_type="evaluate") as logger:
            metrics, predictions = evaluate(job, common.output_dir())
            common.finish(cfg, metrics, predictions, logger, extra_files=job.artefacts)
        log.info("%s", report(metrics))
        return metrics


@dataclasses.dataclass
class Job:
    """One evaluation, built and checked before anything runs."""

    cfg: DictConfig
    work: Workload
    policy: object
    label: str  # the policy's config name
    artefacts: list[str] = dataclasses.field(default_factory=list)  # extra files written by `evaluate`


def prepare(cfg: DictConfig) -> Job:
    """Build policy, task, model and prompts from the config. Raises `ConfigError` on bad input."""
    validate(cfg)
    common.set_threads(cfg)
    device = common.resolve_device(cfg.device)
    policy = components.build_policy(cfg.policy)
    task = components.build_task(cfg.task)
    model, tokenizer = components.build_model(cfg, components.attention_for(cfg, [policy]), device)
    work = workload(cfg, task, model, tokenizer, device)
    fast = cfg.runner.get("fast_decode", False)
    work.fast = fast is True or (fast == "auto" and device.startswith("cuda"))
    # diagnostics keep a Python-side shadow cache per step, which a CUDA graph would not replay
    work.graph = (
        work.fast and device.startswith("cuda") and bool(cfg.runner.get("graph")) and not cfg.diagnostics
    )
    work.compile = bool(cfg.runner.get("compile"))
    if work.compile and not work.fast:
        raise ConfigError(
            "runner.compile=true compiles the fast decoder's steps: it needs runner.fast_decode=true "
            "(or auto on a CUDA device)"
        )
    if work.compile:  # compiled lazily at the first decode step; refused here
        work.compile = components.compiled_layers(model, cfg.runner.get("products"))
    return Job(cfg, work, policy, components.policy_label(policy))


def workload(cfg: DictConfig, task, model, tokenizer, device: str) -> Workload:
    """The task's examples as prompts, checked against the budget and the model's positions."""
    try:
        examples = task.examples(tokenizer)
    except ValueError as err:
        raise ConfigError(f"task: {err}") from None
    if cfg.limit is not None:
        examples = examples[: cfg.limit]
    if not examples:
        raise ConfigError(f"task {task.name} produced no examples")
    prompts, chat = encode_prompts(task, tokenizer, examples, str(cfg.model.get("name")))
    prefill = "sequential" if task.kind == "perplexity" else cfg.cache.prefill
    if task.kind == "perplexity" and cfg.cache.prefill != prefill and common.overridden("cache.prefill"):
        log.warning(
            "note: task=perplexity always streams its text through the decode path: cache.prefill=%s unused",
            cfg.cache.prefill,
        )
    cache = {
        "sink": cfg.cache.sink,
        "recent": cfg.cache.recent,
        "prefill": prefill,
        "window": cfg.cache.window,
    }
    work = Workload(model, tokenizer, device, task, examples, prompts, chat, cache, cfg.batch_size)
    work.protocol = cfg.cache.protocol
    if work.protocol == "kvpress":
        if task.kind == "perplexity":
            raise ConfigError(
                f"cache.protocol=kvpress needs a task with a question; {task.name} scores a text "
                "(use cache.protocol=joint)"
            )
        if cfg.diagnostics:
            raise ConfigError("diagnostics=true supports cache.protocol=joint only")
        try:
            work.contexts = context_tokens(task, tokenizer, examples, prompts, chat)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    check_lengths(cfg, work)
    return work


def check_lengths(cfg: DictConfig, work: Workload) -> None:
    """Refuse prompts longer than the model's positions, and budgets the cache would reject mid-run."""
    new = work.max_new_tokens
    lengths = [len(p) for p in work.prompts]
    limit = getattr(work.model.config, "max_position_embeddings", None)
    if limit and max(lengths) + new > limit:
        raise ConfigError(
            f"task: the longest prompt ({max(lengths)} tokens) + max_new_tokens ({new}) exceeds the "
            f"{limit} positions of {cfg.model.get('name')}; lower the task's context length"
        )
    budget = cache_budget(cfg)
    if work.protocol == "kvpress":  # the budget is a fraction of the context alone
        lengths, new = work.contexts, 0
    if isinstance(budget, float) and budget < 1.0:
        shortest = min(lengths)
        slots = -(-budget * (shortest + new) // 1)
        floor = cfg.cache.sink + cfg.cache.recent
        if slots <= floor:
            raise ConfigError(
                f"budget={budget} gives {slots:.0f} slots for the shortest prompt ({shortest} tokens + "
                f"{new} new); it must be larger than cache.sink + cache.recent = {floor}: raise budget "
                "or lower cache.sink / cache.recent"
            )


def evaluate(job: Job, output_dir: Path) -> tuple[dict, list[dict]]:
    """Run the policy (and the verified full-cache reference); return (metrics, predictions). The task's
    extra files (`Task.artefacts`) are written into ``output_dir``."""
    cfg, work, policy, label = job.cfg, job.work, job.policy, job.label
    started = time.perf_counter()
    reference = full_reference(work, cfg.seed, cfg.get("reference_dir"), str(cfg.model.get("name")))
    memory = PeakMemory(work.device)
    memory.reset()
    diagnostics = None
    if cfg.diagnostics:
        from lshe.diagnostics import EvictionDiagnostics

        diagnostics = EvictionDiagnostics()
    budget = cache_budget(cfg)
    reused = not policy.evicts and diagnostics is None
    if reused:  # a non-evicting policy is the full cache: its outputs are the reference's
        outputs, batches = reference["outputs"], reference["batches"]
    else:
        outputs, batches = run_policy(work, policy, budget, f"{label} budget={budget}", diagnostics)
    predictions, scores = score_outputs(work, outputs, reference["outputs"])
    scores.update(intervals(work.task.kind, predictions, cfg.seed, work.task.metric))
    measured, full = summarize_batches(batches), summarize_batches(reference["batches"])
    from lshe.models import model_info

    metrics = {
        **scores,
        "metric": work.task.metric,
        "higher_is_better": work.task.kind != "perplexity",
        "task": work.task.name,
        "model": str(cfg.model.get("name")),
        "policy": label,
        "policy_params": policy.describe(),
        "budget": budget,
        "slots_setting": cfg.get("slots"),
        "proj_dim": cfg.proj_dim,
        "seed": cfg.seed,
        "n_examples": len(work.examples),
        "batch_size": cfg.batch_size,
        "device": work.device,
        "decoder": decoder_name(work),
        "cache": dict(work.cache),
        "protocol": work.protocol,
        "kv_slots": measured["kv_slots"],
        "kv_slots_full": full["kv_slots"],
        "kv_cache_bytes": measured["kv_cache_bytes"],
        "kv_cache_bytes_full": full["kv_cache_bytes"],
        "kv_cache_fraction": measured["kv_cache_bytes"] / full["kv_cache_bytes"],
        "kv_cache_bytes_detail": measured["kv_cache_bytes_detail"],
        "prefill_s": measured["prefill_s"],
        "decode_tokens_per_s": measured["decode_tokens_per_s"],
        "examples_per_s": measured["examples_per_s"],
        "policy_wall_s": measured["policy_wall_s"],
        "prefill_s_warm": measured["prefill_s_warm"],
        "examples_per_s_warm": measured["examples_per_s_warm"],
        # a job that reused the reference's outputs reports the memory of the run that made them
        "peak_memory_bytes": reference["peak_memory_bytes"] if reused else memory.read(),
        "peak_memory_source": memory.source,
        "wall_s": time.perf_counter() - started,
        "reference_reused": bool(reference.get("reused")),
        "outputs_from_reference": reused,
        "task_params": {**task_settings(work.task), **work.task.describe()},
        "model_info": model_info(work.model),
    }
    if diagnostics is not None:
        metrics.update(diagnostics.summary())
    title = f"{work.task.name}, {label}, budget {budget}, {metrics['model']}"
    artefacts = work.task.artefacts(predictions, output_dir, title)
    metrics.update(artefacts)
    job.artefacts = list(artefacts.values())
    return metrics, predictions


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


def _ci(interval) -> str:
    return f" [{interval[0]:.4g}, {interval[1]:.4g}]" if interval else ""


def report(metrics: dict) -> str:
    """The short result table printed (and written to run.log) at the end of a run."""

    def size(n: float) -> str:
        for unit in ("B", "KiB", "MiB", "GiB"):
            if abs(n) < 1024 or unit == "GiB":
                return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
            n /= 1024
        return str(n)

    def row(label: str, text: str) -> str:
        return f"  {label}".ljust(25) + " " + text  # a long label still leaves a space

    tps, paired = metrics["decode_tokens_per_s"], metrics.get("paired_vs_full")
    lines = [
        f"task {metrics['task']} | model {metrics['model']} | policy {metrics['policy']} | "
        f"budget {metrics['budget']} | {metrics['n_examples']} examples",
        row(
            f"score ({metrics['metric']})",
            f"{metrics['score']:.4g}{_ci(metrics.get('score_ci'))}   full cache: "
            f"{metrics['score_full']:.4g}{_ci(metrics.get('score_full_ci'))}",
        ),
    ]
    if paired:
        test = f"diff {paired['diff']:+.4g}{_ci(paired['diff_ci'])}, p = {paired['p_value']:.3g} ({paired['test']})"
        lines.append(row("vs full cache", test))
    if "agreement_rouge_l" in metrics:
        agree = f"exact {metrics['agreement_exact_match']:.3f}   rouge-l {metrics['agreement_rouge_l']:.3f}"
        lines.append(row("agreement with full", agree))
    lines += [
        row(
            "kv cache / sequence",
            f"{size(metrics['kv_cache_bytes'])} of {size(metrics['kv_cache_bytes_full'])} full "
            f"({metrics['kv_cache_fraction']:.1%}), {metrics['kv_slots']:.0f} slots",
        ),
        row("prefill / batch", f"{metrics['prefill_s']:.3f} s"),
        row("decode", f"{tps:.1f} tokens/s" if tps else "n/a"),
        row("peak memory", f"{size(metrics['peak_memory_bytes'])} ({metrics['peak_memory_source']})"),
        row("results", str(metrics.get("output_dir"))),
    ]
    return "\n".join(lines)


def decoder_name(work: Workload) -> str:
    """What generated the tokens, as recorded in metrics.json: generate or the fast decoder (+ options)."""
    if not work.fast:
        return "generate"
    name = "lshe.fast_decode"
    if work.compile:
        name += f" + compile ({work.compile.products} products)"
    if work.graph:
        name += " + CUDA graphs"
    return name
