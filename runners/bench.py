"""Speed and memory benchmark: policies x budgets x context lengths x batch sizes, against a static control.

For every context length the prompt is random token ids. Each measured cache is prefilled at batch 1
(timed), then its rows are repeated to each batch size (`EvictingCache.repeat_rows`: decode cost does
not depend on what the rows hold, and a batch-sized prefill would need its own activation memory),
and greedy decode steps are timed one by one: ``warmup`` untimed steps, then ``steps`` timed ones,
each synchronised with the device (CUDA events on GPU, a wall clock on CPU). Reported per cache:

* ``prefill_s``: the batch-1 prefill of ``context`` tokens (model forward, eviction, cache build);
* ``step_ms``: the median decode step (p10 and p90 beside it) and ``tokens_per_s`` = batch / step;
* ``kv_bytes``: what the cache holds (`EvictingCache.nbytes`: keys, values, codes, bookkeeping);
* ``peak_bytes``: GPU: ``torch.cuda.max_memory_allocated`` over the prefill and the decode (weights
  included; for an evicting policy this includes its control, which is resident at the same time);
  CPU: the process's resident set size after decoding.

The **static control** (`EvictingCache(static_control=True)`) has the slots of the policy beside it,
writes round-robin and never scores or protects anything. Every evicting policy is decoded
*interleaved* with its own control, one step each in turn, in the same process, so that
``overhead = step_ms / control_step_ms`` compares two caches under the same machine conditions (this
matters on a shared CPU). The full cache has no control: it is the reference for speed-ups.

Entry points: ``python run.py runner=bench ...`` (Hydra, `main`), or without Hydra
``python -m runners.bench --help`` (`cli`), which the GPU runs use. Outputs: ``bench.csv``,
``bench.json`` (settings, rows, headline ratios) and ``bench.png``. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lshe.cache import EvictingCache
from lshe.fast_decode import Decoder
from policies import POLICIES, make_policy

# Llama-3.1-8B's shape, for random-weight timing runs (`BenchSettings.shape`).
SHAPES: dict[str, dict] = {
    "llama-3.1-8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=14336,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
    ),
}
CONTROL = "static"  # the label of the static-cache control in results
CSV_COLUMNS = (
    "policy", "budget", "context", "batch", "graph", "fused", "slots", "prefill_s", "prefill_tokens_per_s",
    "step_ms", "step_ms_p10", "step_ms_p90", "tokens_per_s", "control_step_ms", "overhead",
    "kv_bytes", "kv_bytes_kv", "kv_bytes_features", "kv_bytes_bookkeeping", "peak_bytes", "floor_ms",
    "floor_ratio",
)  # fmt: skip


@dataclass
class BenchSettings:
    """What to measure. ``batches`` entries are integers or ``"max"``: the largest batch whose full
    cache (context + decode steps) fits in the free GPU memory less ``reserve_gib``."""

    model: str = "tiny-llama"
    dtype: str = "float32"
    device: str = "cpu"
    shape: str | None = None  # a key of SHAPES: random weights of that shape instead of ``model``
    policies: Sequence[str] = ("full", "lshe", "h2o", "random")
    budgets: Sequence[float] = (0.5,)
    contexts: Sequence[int] = (256,)
    batches: Sequence[int | str] = (1,)
    steps: int = 16
    warmup: int = 3
    graph: bool = False
    fused: bool = True
    control: bool = True
    proj_dim: int = 16
    seed: int = 0
    sink: int = 4
    recent: int = 10
    prefill: str = "window"
    window: int = 32
    reserve_gib: float = 10.0
    extra: dict = field(default_factory=dict)  # free-form notes recorded with the results

    def check(self) -> None:
        """Raise ValueError naming the first bad setting."""
        if not self.policies:
            raise ValueError("policies must name at least one policy")
        for name in self.policies:
            if name not in POLICIES:
                raise ValueError(f"policies: {name!r} is not one of {sorted(POLICIES)}")
        for key in ("steps", "warmup", "proj_dim"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "warmup" else 1):
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if not self.contexts or any(not isinstance(c, int) or c < 1 for c in self.contexts):
            raise ValueError(f"contexts must be positive integers, got {list(self.contexts)!r}")
        for b in self.batches:
            if not (b == "max" or (isinstance(b, int) and not isinstance(b, bool) and b >= 1)):
                raise ValueError(f"batches must be integers >= 1 or 'max', got {b!r}")
        if self.shape is not None and self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {sorted(SHAPES)} or null, got {self.shape!r}")
        if self.graph and not self.device.startswith("cuda"):
            raise ValueError("graph=true needs device=cuda (CUDA graphs)")


# ---- the model -----------------------------------------------------------------------------------
def build_model(settings: BenchSettings):
    """The model under test, with the ``"lshe"`` attention implementation, in eval mode."""
    from lshe.models import DTYPES, load_model

    if settings.shape is None:
        model, _ = load_model(
            settings.model, settings.dtype, settings.device, attn_implementation="lshe", seed=settings.seed
        )
        return model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[settings.shape], attn_implementation="lshe")
    with torch.random.fork_rng(devices=[]), torch.device(settings.device):
        torch.manual_seed(settings.seed)
        default = torch.get_default_dtype()
        torch.set_default_dtype(DTYPES[settings.dtype])
        try:
            model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default)
    model.config.name_or_path = f"random-{settings.shape}"
    return model.eval()


# ---- timing --------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer:
    """Per-step times of one decoder: CUDA events on GPU (read once at the end), a wall clock on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.seconds: list[float] = []

    def time(self, fn: Callable[[], None]) -> None:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            self.events.append((start, end))
        else:
            t0 = time.perf_counter()
            fn()
            self.seconds.append(time.perf_counter() - t0)

    def milliseconds(self) -> list[float]:
        if self.device.type == "cuda":
            _sync(self.device)
            return [start.elapsed_time(end) for start, end in self.events]
        return [s * 1e3 for s in self.seconds]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# ---- one cache under test ------------------------------------------------------------------------
@dataclass
class _Subject:
    """A prefilled cache and what was measured about it so far."""

    label: str
    cache: EvictingCache
    tokens: torch.Tensor
    positions: torch.Tensor
    prefill_s: float
    decoder: Decoder | None = None
    graphed: bool = False  # whether the last decode measurement replayed CUDA graphs


def _policy(settings: BenchSettings, name: str):
    kwargs = {"seed": settings.seed} if name in ("lshe", "random") else {}
    if name == "lshe":
        kwargs["proj_dim"] = settings.proj_dim
    return make_policy(name, **kwargs)


def decode_tokens(settings: BenchSettings, n_batches: int) -> int:
    """Tokens a cache decodes over all batch sizes: untimed, timed and graph-capture warm-up steps."""
    return (settings.warmup + settings.steps + 2) * n_batches + 2


def _prefill(
    model, settings: BenchSettings, label: str, budget: float, ids: torch.Tensor, n_batches: int = 1
) -> _Subject:
    """Build the cache for ``label`` (a policy name or CONTROL) and prefill ``ids`` (batch 1), timed.

    ``max_new_tokens`` covers every step decoded afterwards, so the full cache never grows (a CUDA
    graph could not follow a reallocation) and fractional budgets count them as the issue defines.
    """
    control = label == CONTROL
    cache = EvictingCache(
        _policy(settings, "lshe" if control else label),
        budget=1.0 if label == "full" else budget,
        sink=settings.sink,
        recent=settings.recent,
        prefill="streaming" if control else settings.prefill,
        window=settings.window,
        max_new_tokens=decode_tokens(settings, n_batches),
        fused=settings.fused,
        static_control=control,
    )
    device = ids.device
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits
        tokens = logits[:, -1:].argmax(-1)
    _sync(device)
    prefill_s = time.perf_counter() - start
    positions = torch.full_like(tokens, ids.shape[1])
    return _Subject(label, cache, tokens, positions, prefill_s)


def _grow(subject: _Subject, batch: int) -> None:
    """Repeat the subject's rows up to ``batch`` (a multiple of its current batch)."""
    current = subject.tokens.shape[0]
    if batch == current:
        return
    if batch % current:
        raise ValueError(
            f"batches must be multiples of each other in increasing order, got {current} then {batch}"
        )
    times = batch // current
    subject.cache.repeat_rows(times)
    subject.tokens = subject.tokens.repeat_interleave(times, dim=0)
    subject.positions = subject.positions.repeat_interleave(times, dim=0)


def _decode(
    model, subjects: list[_Subject], settings: BenchSettings, device: torch.device
) -> list[list[float]]:
    """Interleaved decode steps of ``subjects`` (one step each in turn); per subject its timed steps (ms)."""
    graph = settings.graph
    for s in subjects:
        try:
            s.decoder = Decoder(model, s.cache, s.tokens, s.positions, graph=graph)
        except RuntimeError as err:  # e.g. a policy generator this torch cannot register with a graph
            if not graph:
                raise
            print(f"bench: CUDA-graph capture failed for {s.label} ({err}); measuring the pair eagerly")
            graph = False
            for t in subjects:
                t.decoder = None
            return _decode(model, subjects, BenchSettings(**{**asdict(settings), "graph": False}), device)
    timers = [_Timer(device) for _ in subjects]
    for step in range(settings.warmup + settings.steps):
        for subject, timer in zip(subjects, timers, strict=True):
            if step < settings.warmup:
                subject.decoder.step()
            else:
                timer.time(subject.decoder.step)
    times = [timer.milliseconds() for timer in timers]
    for s in subjects:
        s.graphed = s.decoder.graph is not None
    for s in subjects:  # leave the subjects ready for the next batch size
        s.tokens, s.positions = s.decoder.tokens, s.decoder.positions
        s.decoder.close()
        s.decoder = None
    return times


def _memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import psutil

    return int(psutil.Process().memory_info().rss)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def weight_bytes_per_step(model) -> int:
    """Parameter bytes a decode step reads: every weight except the input embedding table, of which
    a step reads only one row per sequence (an untied output head is read in full)."""
    embedding = model.get_input_embeddings().weight
    tied = any(p is embedding for name, p in model.named_parameters() if "lm_head" in name)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total if tied else total - embedding.numel() * embedding.element_size()


def hbm_gbps(device: torch.device, gib: float = 2.0) -> float:
    """Device-to-device copy bandwidth, GB/s, bytes read + written (the ceiling of the floor)."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    timer = _Timer(device)
    for _ in range(10):
        timer.time(lambda: dst.copy_(src))
    return 2 * src.nbytes / (statistics.median(timer.milliseconds()) / 1e3) / 1e9


_FLOOR: dict[str, float] = {}  # {"weight_bytes", "gbps"} of the current run, set by run_bench on CUDA


def _row(subject: _Subject, settings: BenchSettings, budget, context, batch, times, peak) -> dict:
    sizes = subject.cache.nbytes()
    step = statistics.median(times)
    floor = None
    if _FLOOR:  # bytes a step must move (weights once, every kept KV byte once) over copy bandwidth
        floor = (_FLOOR["weight_bytes"] + sizes["total"]) / (_FLOOR["gbps"] * 1e9) * 1e3
    return {
        "policy": subject.label,
        "budget": 1.0 if subject.label == "full" else budget,
        "context": context,
        "batch": batch,
        "graph": subject.graphed,
        "fused": settings.fused,
        "slots": subject.cache.slots(),
        "prefill_s": subject.prefill_s,
        "prefill_tokens_per_s": context / subject.prefill_s,
        "step_ms": step,
        "step_ms_p10": _percentile(times, 0.1),
        "step_ms_p90": _percentile(times, 0.9),
        "tokens_per_s": batch / (step / 1e3),
        "control_step_ms": None,
        "overhead": None,
        "kv_bytes": sizes["total"],
        "kv_bytes_kv": sizes["kv"],
        "kv_bytes_features": sizes["features"],
        "kv_bytes_bookkeeping": sizes["bookkeeping"],
        "peak_bytes": peak,
        "floor_ms": floor,
        "floor_ratio": None if floor is None else step / floor,
    }


def max_batch(model, settings: BenchSettings, context: int) -> int:
    """The largest batch whose full cache (context + decode steps) fits in free GPU memory less the reserve."""
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = torch.finfo(model.dtype).bits // 8
    tokens = context + decode_tokens(settings, len(settings.batches))
    per_row = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * element * tokens
    gc.collect()
    torch.cuda.empty_cache()  # blocks cached by earlier measurements count as free
    free = torch.cuda.mem_get_info(torch.device(settings.device))[0] - settings.reserve_gib * 2**30
    return max(1, int(free // per_row))


def run_bench(settings: BenchSettings, model=None, log: Callable[[str], None] = print) -> list[dict]:
    """Measure every (context, policy, budget, batch); return one row per measured cache."""
    settings.check()
    device = torch.device(settings.device)
    model = model if model is not None else build_model(settings)
    vocab = model.config.get_text_config().vocab_size
    _FLOOR.clear()
    if device.type == "cuda":
        _FLOOR.update(weight_bytes=weight_bytes_per_step(model), gbps=hbm_gbps(device))
        log(
            f"bench: weights read per step {_FLOOR['weight_bytes'] / 1e9:.2f} GB, copy bandwidth {_FLOOR['gbps']:.0f} GB/s"
        )
    generator = torch.Generator().manual_seed(settings.seed)
    rows: list[dict] = []
    # Warm-up: load kernels, build handles, compile the Triton kernel, outside every timing.
    warm_ids = torch.randint(0, vocab, (1, 64), generator=generator).to(device)
    short = BenchSettings(**{**asdict(settings), "steps": 1, "warmup": 1})
    for name in [*settings.policies, *([CONTROL] if settings.control else [])]:
        _decode(model, [_prefill(model, short, name, 0.5, warm_ids)], short, device)
    gc.collect()
    for context in settings.contexts:
        ids = torch.randint(0, vocab, (1, context), generator=generator).to(device)
        batches = sorted(max_batch(model, settings, context) if b == "max" else b for b in settings.batches)
        # One untimed prefill at this length first: kernels are chosen per shape on first use, and that
        # cost would otherwise land on whichever policy is measured first.
        _prefill(model, settings, CONTROL, 0.5, ids)
        gc.collect()
        for name in settings.policies:
            for budget in [1.0] if name == "full" else list(settings.budgets):
                rows += _measure(model, settings, name, budget, ids, batches, device, log)
                gc.collect()  # a cache and its layers reference each other: free it now, not later
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def _measure(model, settings, name, budget, ids, batches, device, log) -> list[dict]:
    """Prefill ``name`` (and its control) at batch 1, then decode at every batch size; the caches are
    released on return."""
    _reset_peak(device)
    subject = _prefill(model, settings, name, budget, ids, len(batches))
    control = None
    if settings.control and name != "full":
        control = _prefill(model, settings, CONTROL, budget, ids, len(batches))
    subjects = [subject] if control is None else [subject, control]
    rows = []
    for batch in batches:
        for s in subjects:
            _grow(s, batch)
        times = _decode(model, subjects, settings, device)
        peak = _memory(device)
        context = ids.shape[1]
        row = _row(subject, settings, budget, context, batch, times[0], peak)
        rows.append(row)
        if control is not None:
            control_row = _row(control, settings, budget, context, batch, times[1], peak)
            control_row["paired_with"] = name
            row["control_step_ms"] = control_row["step_ms"]
            row["overhead"] = row["step_ms"] / control_row["step_ms"]
            rows.append(control_row)
        log(_describe(row))
    return rows


def _describe(row: dict) -> str:
    text = (
        f"{row['policy']:>7} budget={row['budget']:<4} ctx={row['context']:<6} batch={row['batch']:<4} "
        f"prefill={row['prefill_s']:.3f}s step={row['step_ms']:.3f}ms ({row['tokens_per_s']:.1f} tok/s) "
        f"kv={row['kv_bytes'] / 2**20:.1f}MiB peak={row['peak_bytes'] / 2**30:.2f}GiB"
    )
    if row["floor_ratio"] is not None:
        text += f" floor={row['floor_ms']:.2f}ms (x{row['floor_ratio']:.2f})"
    if row["overhead"] is not None:
        text += f" control={row['control_step_ms']:.3f}ms overhead={100 * (row['overhead'] - 1):+.1f}%"
    return text


# ---- headline ratios -----------------------------------------------------------------------------
def summarize(rows: list[dict]) -> dict:
    """The ratios the issue sets targets for, for every (context, batch) measured.

    ``lshe_overhead`` (step / paired control step, per budget), ``lshe_vs_full_tokens_per_s`` and
    ``lshe_vs_full_kv_bytes`` (at budget 0.3 when measured, else the smallest budget),
    ``lshe_vs_h2o_prefill`` (h2o prefill time / lshe prefill time) and ``lshe_vs_h2o_decode``
    (h2o step / lshe step), each keyed ``ctx<context>_b<batch>``.
    """

    def find(policy, context, batch, budget=None):
        for r in rows:
            if (
                (r["policy"], r["context"], r["batch"]) == (policy, context, batch)
                and (budget is None or r["budget"] == budget)
                and r.get("paired_with") is None
            ):
                return r
        return None

    out: dict[str, dict] = {}
    for context, batch in sorted({(r["context"], r["batch"]) for r in rows}):
        key = f"ctx{context}_b{batch}"
        lshe_rows = [r for r in rows if (r["policy"], r["context"], r["batch"]) == ("lshe", context, batch)]
        entry: dict[str, float] = {}
        for r in lshe_rows:
            entry[f"lshe_overhead@{r['budget']}"] = r["overhead"]
        full = find("full", context, batch)
        budgets = sorted(r["budget"] for r in lshe_rows)
        ref_budget = 0.3 if 0.3 in budgets else (budgets[0] if budgets else None)
        lshe = find("lshe", context, batch, ref_budget) if ref_budget is not None else None
        if full and lshe:
            entry[f"lshe_vs_full_tokens_per_s@{ref_budget}"] = lshe["tokens_per_s"] / full["tokens_per_s"]
            entry[f"lshe_vs_full_kv_bytes@{ref_budget}"] = lshe["kv_bytes"] / full["kv_bytes"]
        for budget in budgets:
            a, h = find("lshe", context, batch, budget), find("h2o", context, batch, budget)
            if a and h:
                entry[f"lshe_vs_h2o_prefill@{budget}"] = h["prefill_s"] / a["prefill_s"]
                entry[f"lshe_vs_h2o_decode@{budget}"] = h["step_ms"] / a["step_ms"]
        out[key] = {k: v for k, v in entry.items() if v is not None}
    return out


# ---- outputs -------------------------------------------------------------------------------------
def write_outputs(rows: list[dict], settings: BenchSettings, out_dir: str | Path, environment: dict) -> dict:
    """Write bench.csv, bench.json and bench.png into ``out_dir``; return the headline summary."""
    out_dir = Path(out_dir)
    summary = summarize(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*CSV_COLUMNS, "paired_with"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    payload = {
        "settings": asdict(settings),
        "environment": {**environment, **{f"floor_{k}": v for k, v in _FLOOR.items()}},
        "summary": summary,
        "rows": rows,
    }
    _write_text(out_dir / "bench.csv", buffer.getvalue())
    _write_text(out_dir / "bench.json", json.dumps(payload, indent=2, default=str) + "\n")
    plot(rows, out_dir / "bench.png")
    return summary


def _write_text(path: Path, text: str) -> None:
    """Atomic write through `runners.results` when its dependencies are installed, else a plain rename."""
    try:
        from runners.results import atomic_write_text
    except ImportError:  # no omegaconf (the bare GPU image): same all-or-nothing rename, done here
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        return
    atomic_write_text(path, text)


def plot(rows: list[dict], path: Path) -> None:
    """Decode tokens/s against budget, one panel per (context, batch); full and control as references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["context"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (context, batch) in zip(axes[0], panels, strict=True):
        here = [r for r in rows if (r["context"], r["batch"]) == (context, batch)]
        for policy in sorted({r["policy"] for r in here}):
            points = sorted(
                (r["budget"], r["tokens_per_s"])
                for r in here
                if r["policy"] == policy and (policy != CONTROL or r.get("paired_with") == "lshe")
            )
            if policy == "full":
                ax.axhline(points[0][1], color="black", linestyle="--", label="full")
            else:
                ax.plot(*zip(*points, strict=True), marker="o", label=policy)
        ax.set_title(f"context {context}, batch {batch}")
        ax.set_xlabel("budget (fraction kept)")
        ax.set_ylabel("decode tokens/s")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment(settings: BenchSettings) -> dict:
    """Versions and the device, recorded with the results."""
    import platform

    import transformers

    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "device": settings.device,
        "command": " ".join(sys.argv),
    }
    if settings.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(settings.device))
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


# ---- entry points --------------------------------------------------------------------------------
def settings_from_config(cfg) -> BenchSettings:
    """BenchSettings from the Hydra config: ``runner.*`` plus the top-level model, device, seed, proj_dim."""
    from runners.common import resolve_device

    runner = cfg.runner
    return BenchSettings(
        model=cfg.model.name,
        dtype=cfg.model.get("dtype", "float32"),
        device=resolve_device(cfg.device),
        shape=runner.get("shape"),
        policies=list(runner.policies),
        budgets=[float(b) for b in runner.budgets],
        contexts=[int(c) for c in runner.contexts],
        batches=[b if b == "max" else int(b) for b in runner.batches],
        steps=int(runner.steps),
        warmup=int(runner.warmup),
        graph=bool(runner.graph),
        fused=bool(runner.fused),
        control=bool(runner.control),
        proj_dim=int(cfg.proj_dim),
        seed=int(cfg.seed),
        sink=int(cfg.cache.sink),
        recent=int(cfg.cache.recent),
        prefill=str(cfg.cache.prefill),
        window=int(cfg.cache.window),
        reserve_gib=float(runner.get("reserve_gib", 10.0)),
    )


def measurements(rows: list[dict]) -> dict[str, dict]:
    """The rows keyed ``<policy>@<budget>/ctx<context>_b<batch>`` (controls: ``static[<paired>]``),
    numbers only: what W&B logs as the run's metrics."""
    out = {}
    for r in rows:
        label = r["policy"] if r.get("paired_with") is None else f"{CONTROL}[{r['paired_with']}]"
        key = f"{label}@{r['budget']}/ctx{r['context']}_b{r['batch']}"
        out[key] = {
            k: r[k]
            for k in ("prefill_s", "step_ms", "tokens_per_s", "overhead", "kv_bytes", "peak_bytes")
            if r[k] is not None
        }
    return out


def main(cfg) -> dict:
    """``python run.py runner=bench``: run the benchmark, write its outputs, log them to W&B.

    Besides bench.csv/json/png the job writes the usual config.yaml, predictions.jsonl (the rows) and,
    last, metrics.json (`runners.results.save`), so a finished benchmark is skipped like any job.
    """
    from runners import common, results
    from runners.wandb_logger import make_logger

    common.validate(cfg)
    common.set_threads(cfg)
    try:
        settings = settings_from_config(cfg)
        settings.check()
    except ValueError as err:
        raise common.ConfigError(f"runner: {err}") from None
    out = common.output_dir()
    multirun = common.is_multirun()
    name = ",".join(common.job_overrides()) or f"bench {settings.shape or settings.model}"
    group = common.sweep_group(common.sweep_dir()) if multirun else None
    with make_logger(cfg, out, name=name, group=group, job_type="bench") as logger:
        rows = run_bench(settings)
        env = environment(settings)
        summary = write_outputs(rows, settings, out, env)
        metrics = {
            "summary": summary,
            "measurements": measurements(rows),
            "n_rows": len(rows),
            "settings": asdict(settings),
            "environment": env,
            "config_hash": results.config_hash(cfg),
            "output_dir": str(out),
            "versions": results.versions(),
        }
        results.save(out, cfg, metrics, rows)
        logger.log_results(metrics, [])  # the rows are numbers, logged through `measurements`
    print(f"bench: {len(rows)} measurements in {out} (bench.csv, bench.json, bench.png)", flush=True)
    return metrics


def cli(argv: list[str] | None = None) -> dict:
    """The benchmark without Hydra: ``python -m runners.bench --help``."""
    p = argparse.ArgumentParser(prog="python -m runners.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--policies", nargs="+", default=["full", "lshe", "h2o", "random"])
    p.add_argument("--budgets", nargs="+", type=float, default=[0.5])
    p.add_argument("--contexts", nargs="+", type=int, default=[256])
    p.add_argument("--batches", nargs="+", default=["1"], help="integers or 'max'")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--graph", action="store_true", help="replay decode steps as CUDA graphs")
    p.add_argument("--no-fused", dest="fused", action="store_false", help="torch path for LSH-E on CUDA")
    p.add_argument("--no-control", dest="control", action="store_false")
    p.add_argument("--proj-dim", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefill", default="window")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reserve-gib", type=float, default=10.0)
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = BenchSettings(
        model=args.model, shape=args.shape, dtype=args.dtype, device=args.device, policies=args.policies,
        budgets=args.budgets, contexts=args.contexts,
        batches=[b if b == "max" else int(b) for b in args.batches],
        steps=args.steps, warmup=args.warmup, graph=args.graph, fused=args.fused, control=args.control,
        proj_dim=args.proj_dim, seed=args.seed, prefill=args.prefill, reserve_gib=args.reserve_gib,
    )  # fmt: skip
    rows = run_bench(settings, log=lambda line: print(line, flush=True))
    summary = write_outputs(rows, settings, args.out, environment(settings))
    print(json.dumps(summary, indent=2, default=_finite))
    return summary


def _finite(value):
    return value if not isinstance(value, float) or math.isfinite(value) else str(value)


if __name__ == "__main__":
    cli()
