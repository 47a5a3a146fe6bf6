"""Speed and memory benchmark (``runner=bench``): policies x budgets x context lengths x batch sizes.

The policies are the job's ``policy=`` (default) or ``runner.policies``, a list of policy config names
(built-ins or a user's on the searchpath: a user's policy benchmarks with no code change); the model is
the job's ``model=`` (e.g. ``model=llama-3.1-8b-shape`` for random weights in a real shape). For every
context length the prompt is random token ids. Each measured cache is prefilled at batch 1 (timed), its
rows are repeated to each batch size (`EvictingCache.repeat_rows`: decode cost does not depend on what
the rows hold), and greedy decode steps are timed one by one (`runners.measure.Stopwatch`): ``warmup``
untimed steps, then ``steps`` timed ones. Reported per cache:

* ``prefill_s``: the batch-1 prefill of ``context`` tokens (model forward, eviction, cache build);
* ``step_ms``: the median decode step (p10 and p90 beside it) and ``tokens_per_s`` = batch / step;
* ``kv_bytes``: what the cache holds (keys, values, policy features, bookkeeping);
* ``peak_bytes``: `runners.measure.PeakMemory` over the prefill and the decode (weights included; an
  evicting policy's control is resident at the same time);
* ``floor_ms`` (CUDA): weights and kept KV bytes read once at the measured copy bandwidth.

The **static control** (`policies.static.StaticControl`) has the slots of the policy beside it, writes
round-robin and never scores or protects anything. Every evicting policy is decoded *interleaved* with
its own control, one step each in turn, so ``overhead = step_ms / control_step_ms`` compares two caches
under the same machine conditions. The full cache has no control: it is the reference for speed-ups.
``compile=true`` decodes every cache with compiled decoder layers (``compiled`` column);
``hf_baseline=true`` adds per context and batch one ``hf_static_compile`` row, Hugging Face's fastest
greedy decode of the same model and ids (`Bench.measure_hf`), and step ratios against it.
Outputs: ``bench.csv``, ``bench.json`` (settings, environment, rows, headline ratios), ``bench.png``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass

from omegaconf import DictConfig

from runners import common, components, measure, results
from runners.config import cache_budget
from runners.plots import bench_plot

log = logging.getLogger("lshe")
CONTROL = "static"  # the label of the static-cache control in results
# the label of Hugging Face's StaticCache + torch.compile decode (runner.hf_baseline)
HF = "hf_static_compile"
HF_PREFILL_TOKENS = 8192  # batch x positions per forward call of an HF batch's (untimed) prefill
HF_MIN_WARMUP = 3  # untimed HF steps at least: compilation, then the CUDA-graph trees' warm-up and recording
CSV_COLUMNS = (
    "policy", "budget", "context", "batch", "graph", "compiled", "fused", "slots", "prefill_s",
    "prefill_tokens_per_s", "step_ms", "step_ms_p10", "step_ms_p90", "tokens_per_s", "control_step_ms",
    "overhead",
    "kv_bytes", "kv_bytes_kv", "kv_bytes_features", "kv_bytes_bookkeeping", "peak_bytes", "floor_ms",
    "floor_ratio", "paired_with",
)  # fmt: skip


@dataclass
class Subject:
    """A prefilled cache under test and what was measured about it so far."""

    label: str
    policy: object
    budget: float | int
    cache: object
    tokens: object
    positions: object
    prefill_s: float
    graphed: bool = False
    compiled: bool = False


class Bench:
    """``runner=bench``; its arguments are conf/runner/bench.yaml's keys (the one home of their defaults)."""

    def __init__(self, *, policies, budgets, contexts, batches, steps, warmup, graph, fused, control,
                 reserve_gib, compile=False, products=None, hf_baseline=False) -> None:  # fmt: skip
        self.policy_names = list(policies) if policies else None
        self.budgets = list(budgets) if budgets else None
        self.contexts, self.batches = list(contexts), list(batches)
        self.steps, self.warmup, self.graph, self.fused = steps, warmup, graph, fused
        self.control, self.reserve_gib = control, reserve_gib
        self.compile, self.products, self.hf_baseline = compile, products, hf_baseline

    def __call__(self, cfg: DictConfig) -> dict:
        import torch

        common.set_threads(cfg)
        device = torch.device(common.resolve_device(cfg.device))
        if self.graph and device.type != "cuda":
            raise common.ConfigError("runner.graph=true needs device=cuda (CUDA graphs)")
        if self.policy_names:
            policies = {n: components.build_policy(components.policy_config(n)) for n in self.policy_names}
        else:
            policy = components.build_policy(cfg.policy)
            policies = {components.policy_label(policy): policy}
        budgets = self.budgets or [cache_budget(cfg)]
        attn = components.attention_for(cfg, policies.values())
        model, _ = components.build_model(cfg, attn, str(device))
        # refused here if no decoder layers are found; products None is lshe.compiled.PRODUCTS
        compiled = components.compiled_layers(model, self.products) if self.compile else None
        cache = {k: cfg.cache[k] for k in ("sink", "recent", "prefill", "window")}
        with common.job_logger(cfg, job_type="bench") as logger:
            state_before = measure.gpu_state(device)
            tuning_before = measure.inductor_tuning() if self.compile else None
            rows = self.run(model, policies, budgets, cfg.seed, cache)
            tuning = (
                {
                    "products": compiled.products,
                    "inductor_before": tuning_before,
                    "inductor": measure.inductor_tuning(),
                }
                if self.compile
                else {}
            )
            metrics = {
                "summary": summarize(rows),
                "n_rows": len(rows),
                "environment": {**measure.environment(device), "gpu_state_before": state_before, **tuning},
                "floor": self.floor,
                "measurements": measurements(rows),
            }
            files = write_outputs(rows, metrics, common.output_dir())
            common.finish(cfg, metrics, rows, logger, extra_files=files)
        log.info(
            "bench: %d measurements in %s (bench.csv, bench.json, bench.png)", len(rows), common.output_dir()
        )
        return metrics

    # ---- measuring -------------------------------------------------------------------------------
    def run(
        self, model, policies: dict, budgets: list, seed: int = 0, cache: dict | None = None
    ) -> list[dict]:
        """Measure every (context, policy, budget, batch) on ``model``'s device; one row per measured cache.
        ``policies`` maps labels to policies; ``cache`` holds EvictingCache's sink/recent/prefill/window."""
        import torch

        self.device, self.cache = model.device, dict(cache or {})
        self.floor = {}
        if self.device.type == "cuda":
            self.floor = {
                "weight_bytes": measure.weight_bytes_per_step(model),
                "gbps": measure.hbm_gbps(self.device),
            }

        vocab = model.get_input_embeddings().weight.shape[0]
        generator = torch.Generator().manual_seed(seed)
        warm = torch.randint(0, vocab, (1, 64), generator=generator).to(self.device)
        for label, policy in policies.items():  # load kernels, compile Triton, outside every timing
            self._decode(model, [self._prefill(model, label, policy, 0.5, warm, 1)], steps=1, warmup=1)
        rows: list[dict] = []
        prompts = []  # (ids, batches) per context
        for context in self.contexts:
            ids = torch.randint(0, vocab, (1, context), generator=generator).to(self.device)
            batches = sorted(self.max_batch(model, context) if b == "max" else b for b in self.batches)
            prompts.append((ids, batches))
            self._prefill(
                model, CONTROL, _control(), 0.5, ids, 1
            )  # kernels are chosen per shape on first use
            for label, policy in policies.items():
                for budget in [1.0] if not policy.evicts else budgets:
                    rows += self.measure(model, label, policy, budget, ids, batches)
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
        # HF's rows last: each resets dynamo, after which the compiled lshe decoders would compile
        # again; runs with HF between contexts had one context 5-20% slower for every lshe row
        # (docs/measurement-log.md, note 19). This way every lshe row shares one compilation.
        for ids, batches in prompts if self.hf_baseline else ():
            rows += self.measure_hf(model, ids, batches)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return rows

    def measure(self, model, label, policy, budget, ids, batches) -> list[dict]:
        """Prefill the policy (and its control) at batch 1, then decode at every batch size."""
        memory = measure.PeakMemory(self.device)
        memory.reset()
        subjects = [self._prefill(model, label, policy, budget, ids, len(batches))]
        if self.control and policy.evicts:
            subjects.append(self._prefill(model, CONTROL, _control(), budget, ids, len(batches)))
        rows = []
        for batch in batches:
            for s in subjects:
                _grow(s, batch)
            times = self._decode(model, subjects, self.steps, self.warmup)
            peak = memory.read()
            found = [self._row(s, ids.shape[1], batch, t, peak) for s, t in zip(subjects, times, strict=True)]
            if len(found) == 2:
                found[1]["paired_with"] = label
                found[0]["control_step_ms"] = found[1]["step_ms"]
                found[0]["overhead"] = found[0]["step_ms"] / found[1]["step_ms"]
            rows += found
            log.info("%s", describe(found[0]))
        return rows

    def _prefill(self, model, label, policy, budget, ids, n_batches) -> Subject:
        """Build and prefill (timed) a cache; ``max_new_tokens`` covers every step decoded afterwards, so
        the full cache never grows (a CUDA graph could not follow a reallocation)."""
        import torch

        from lshe.cache import EvictingCache

        settings = {**self.cache, "prefill": "streaming"} if label == CONTROL else self.cache
        new = (self.warmup + self.steps + 2) * n_batches + 2
        cache = EvictingCache(policy, budget=budget if policy.evicts else 1.0, max_new_tokens=new,
                              fused=self.fused, **settings)  # fmt: skip
        watch = measure.Stopwatch(self.device)
        with torch.inference_mode():
            watch.mark()
            logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits
            watch.mark()
        tokens = logits[:, -1:].argmax(-1)
        return Subject(label, policy, budget if policy.evicts else 1.0, cache, tokens,
                       torch.full_like(tokens, ids.shape[1]), watch.laps_ms()[0] / 1e3)  # fmt: skip

    def _decode(self, model, subjects: list[Subject], steps: int, warmup: int) -> list[list[float]]:
        """Interleaved decode steps (one step each in turn); per subject its timed steps in ms."""
        from lshe.fast_decode import Decoder

        graph = self.graph
        compile = components.compiled_layers(model, self.products) if self.compile else False
        try:
            decoders = [
                Decoder(model, s.cache, s.tokens, s.positions, graph=graph, compile=compile) for s in subjects
            ]
        except RuntimeError as err:  # e.g. a policy this torch cannot capture in a graph
            if not graph:
                raise
            log.warning("bench: CUDA-graph capture failed (%s); measuring eagerly", err)
            decoders = [
                Decoder(model, s.cache, s.tokens, s.positions, graph=False, compile=compile) for s in subjects
            ]
        watches = [measure.Stopwatch(self.device) for _ in subjects]
        for step in range(warmup + steps):
            for decoder, watch in zip(decoders, watches, strict=True):
                decoder.step() if step < warmup else watch.time(decoder.step)
        times = [watch.pairs_ms() for watch in watches]
        for s, d in zip(subjects, decoders, strict=True):  # ready for the next batch size
            s.graphed, s.tokens, s.positions = d.graph is not None, d.tokens, d.positions
            s.compiled = getattr(d, "compiled", None) is not None
            d.close()
        return times

    def _row(self, s: Subject, context: int, batch: int, times: list[float], peak: int) -> dict:
        sizes = s.cache.nbytes()
        step = measure.median(times)
        floor = (
            measure.floor_ms(self.floor["weight_bytes"], sizes["total"], self.floor["gbps"])
            if self.floor
            else None
        )
        return {
            "policy": s.label, "budget": s.budget, "context": context, "batch": batch, "graph": s.graphed,
            "compiled": s.compiled, "fused": self.fused, "slots": s.cache.slots(), "prefill_s": s.prefill_s,
            "prefill_tokens_per_s": context / s.prefill_s, "step_ms": step,
            "step_ms_p10": measure.percentile(times, 0.1), "step_ms_p90": measure.percentile(times, 0.9),
            "tokens_per_s": batch / (step / 1e3), "control_step_ms": None, "overhead": None,
            "kv_bytes": sizes["total"], "kv_bytes_kv": sizes["kv"], "kv_bytes_features": sizes["features"],
            "kv_bytes_bookkeeping": sizes["bookkeeping"], "peak_bytes": peak, "floor_ms": floor,
            "floor_ratio": None if floor is None else step / floor, "paired_with": None,
        }  # fmt: skip

    # ---- Hugging Face's fastest decode path, measured beside ours (runner.hf_baseline) -------------
    def measure_hf(self, model, ids, batches: list[int]) -> list[dict]:
        """One ``hf_static_compile`` row per batch: the same model and prompt ids decoded the way
        transformers documents its fastest greedy path: SDPA attention (`lshe.attention.restore_attention`:
        SDPA for a model loaded with ``"lshe"``, as the runner loads it), a `transformers.StaticCache`,
        eager prefill, then ``torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)`` per
        decode step (``mode="default"`` on the CPU: no CUDA graphs there). ``max(warmup, 3)`` untimed
        steps hold the compilation and the CUDA-graph recording; ``steps`` timed ones follow.

        ``prefill_s`` is the batch-1 prefill (as for every other row); a larger batch is prefilled
        untimed from the repeated ids, in chunks of ``HF_PREFILL_TOKENS`` batch x positions. Dynamo's
        caches are reset before each batch so every (context, batch) gets the shape-specialised graph a
        user decoding only that shape would get; `run` measures these rows after every ``lshe`` row. ``graph`` is True only when inductor recorded CUDA graphs
        without skipping any."""
        import torch

        from lshe.attention import restore_attention, use_lshe_attention

        warmup = max(self.warmup, HF_MIN_WARMUP)
        length = ids.shape[1] + warmup + self.steps + 4
        rows = []
        restore_attention(model)
        try:
            memory = measure.PeakMemory(self.device)
            memory.reset()
            first = _hf_prefill(model, ids, length, self.device)  # (cache, tokens, seconds) at batch 1
            prefill_s = first[2]
            for batch in batches:
                if batch == 1 and first is not None:
                    cache, tokens = first[0], first[1]
                else:
                    memory.reset()
                    chunk = max(1, HF_PREFILL_TOKENS // batch)
                    cache, tokens, _ = _hf_prefill(model, ids.repeat(batch, 1), length, self.device, chunk)
                first = None  # decoded into from here on (or not needed)
                times, graphed, _ = self._hf_decode(model, cache, tokens, ids.shape[1], warmup)
                rows.append(
                    self._hf_row(cache, ids.shape[1], batch, times, prefill_s, graphed, memory.read())
                )
                log.info("%s", describe(rows[-1]))
                del cache, tokens
        finally:
            use_lshe_attention(model)
            torch._dynamo.reset()  # drop the HF graphs (and their CUDA-graph memory pools)
        return rows

    def _hf_decode(self, model, cache, tokens, context: int, warmup: int) -> tuple[list[float], bool, object]:
        """Greedy steps through the compiled forward: the timed steps in ms, whether CUDA graphs ran, and
        the (B, 1) tokens the last step produced."""
        import torch
        from torch._dynamo.utils import counters

        cuda = self.device.type == "cuda"
        mode = "reduce-overhead" if cuda else "default"
        # A fresh start for this shape, as a user decoding only it would have. Without it the graphs of
        # code shared with earlier compilations (transformers' deprecation wrapper around every forward,
        # also the compiled lshe decoder layers') count towards dynamo's recompile limit.
        torch._dynamo.reset()
        forward = torch.compile(model.forward, mode=mode, fullgraph=True)
        tokens = tokens.clone()
        positions = torch.full_like(tokens, context)
        skips = counters["inductor"]["cudagraph_skips"]

        def step() -> None:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are dead
            logits = forward(input_ids=tokens, position_ids=positions, cache=cache, use_cache=True,
                             logits_to_keep=1).logits  # fmt: skip
            tokens.copy_(logits[:, -1:].argmax(-1))
            positions.add_(1)

        watch = measure.Stopwatch(self.device)
        with torch.no_grad():  # as generate (a StaticCache built under inference_mode refuses compile)
            for i in range(warmup + self.steps):
                step() if i < warmup else watch.time(step)
        graphed = cuda
        if graphed and counters["inductor"]["cudagraph_skips"] != skips:
            log.warning("bench: %s: inductor skipped CUDA graphs (see torch's log); graph=False", HF)
            graphed = False
        return watch.pairs_ms(), graphed, tokens

    def _hf_row(self, cache, context, batch, times, prefill_s, graphed, peak) -> dict:
        kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        step = measure.median(times)
        floor = measure.floor_ms(self.floor["weight_bytes"], kv, self.floor["gbps"]) if self.floor else None
        return {
            "policy": HF, "budget": 1.0, "context": context, "batch": batch, "graph": graphed,
            "compiled": True, "fused": False, "slots": cache.layers[0].max_cache_len, "prefill_s": prefill_s,
            "prefill_tokens_per_s": context / prefill_s, "step_ms": step,
            "step_ms_p10": measure.percentile(times, 0.1), "step_ms_p90": measure.percentile(times, 0.9),
            "tokens_per_s": batch / (step / 1e3), "control_step_ms": None, "overhead": None,
            "kv_bytes": kv, "kv_bytes_kv": kv, "kv_bytes_features": 0, "kv_bytes_bookkeeping": 0,
            "peak_bytes": peak, "floor_ms": floor, "floor_ratio": None if floor is None else step / floor,
            "paired_with": None,
        }  # fmt: skip

    def max_batch(self, model, context: int) -> int:
        """The largest batch whose full cache (context + decode steps) fits in free GPU memory less the
        reserve (for ``batches: [max]``); 1 on the CPU."""
        import torch

        if self.device.type != "cuda":
            return 1
        config = model.config.get_text_config()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        tokens = context + (self.warmup + self.steps + 2) * len(self.batches) + 2
        per_row = 2 * config.num_hidden_layers * kv_heads * head_dim * tokens * model.dtype.itemsize
        torch.cuda.empty_cache()  # blocks cached by earlier measurements count as free
        free, _ = torch.cuda.mem_get_info(self.device)
        return max(1, int((free - self.reserve_gib * 2**30) // per_row))


def _hf_prefill(model, ids, length: int, device, chunk: int | None = None) -> tuple:
    """A `transformers.StaticCache` of ``length`` tokens prefilled (eagerly, timed) with ``ids``: the
    cache, the (B, 1) next tokens and the prefill in seconds. ``chunk``: at most that many positions per
    forward call (the repeated-ids prefill of a large batch at 32k would not fit in one call's
    activations); None: one call, as `Bench._prefill`."""
    import torch
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=length)
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand(ids.shape[0], -1)
    chunk = chunk or ids.shape[1]
    watch = measure.Stopwatch(device)
    with torch.no_grad():
        watch.mark()
        for start in range(0, ids.shape[1], chunk):
            part = slice(start, start + chunk)
            logits = model(input_ids=ids[:, part], position_ids=positions[:, part], cache=cache,
                           use_cache=True, logits_to_keep=1).logits  # fmt: skip
        watch.mark()
    return cache, logits[:, -1:].argmax(-1), watch.laps_ms()[0] / 1e3


def _control():
    from policies.static import StaticControl

    return StaticControl()


def _grow(subject: Subject, batch: int) -> None:
    """Repeat the subject's rows up to ``batch`` (a multiple of its current batch)."""
    current = subject.tokens.shape[0]
    if batch == current:
        return
    if batch % current:
        raise common.ConfigError(
            f"runner.batches must be multiples of each other, got {current} then {batch}"
        )
    subject.cache.repeat_rows(batch // current)
    subject.tokens = subject.tokens.repeat_interleave(batch // current, dim=0)
    subject.positions = subject.positions.repeat_interleave(batch // current, dim=0)


def describe(row: dict) -> str:
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


# ---- headline ratios and outputs -------------------------------------------------------------------
def summarize(rows: list[dict]) -> dict:
    """Per (context, batch): every policy's overhead over its control per budget, and ``<policy>_vs_full``
    ratios of decode tokens/s, KV bytes and prefill time (at budget 0.3 when measured, else the
    smallest), and with an ``hf_static_compile`` row every policy's ``<policy>_vs_hf_static_compile_step@
    <budget>`` = its step_ms / HF's (below 1: faster than HF's best); keyed ``ctx<context>_b<batch>``."""
    out: dict[str, dict] = {}
    measured = [r for r in rows if r["paired_with"] is None]
    for context, batch in sorted({(r["context"], r["batch"]) for r in rows}):
        here = [r for r in measured if (r["context"], r["batch"]) == (context, batch)]
        full = next(
            (r for r in here if r["overhead"] is None and r["budget"] == 1.0 and r["policy"] == "full"), None
        )
        entry: dict[str, float] = {}
        for r in here:
            if r["overhead"] is not None:
                entry[f"{r['policy']}_overhead@{r['budget']}"] = r["overhead"]
        for policy in sorted({r["policy"] for r in here if r["overhead"] is not None}):
            budgets = sorted(r["budget"] for r in here if r["policy"] == policy)
            ref = 0.3 if 0.3 in budgets else budgets[0]
            r = next(r for r in here if (r["policy"], r["budget"]) == (policy, ref))
            if full:
                entry[f"{policy}_vs_full_tokens_per_s@{ref}"] = r["tokens_per_s"] / full["tokens_per_s"]
                entry[f"{policy}_vs_full_kv_bytes@{ref}"] = r["kv_bytes"] / full["kv_bytes"]
                entry[f"{policy}_vs_full_prefill_s@{ref}"] = r["prefill_s"] / full["prefill_s"]
        hf = next((r for r in here if r["policy"] == HF), None)
        for r in here if hf else []:
            if r is not hf:
                entry[f"{r['policy']}_vs_{HF}_step@{r['budget']}"] = r["step_ms"] / hf["step_ms"]
        out[f"ctx{context}_b{batch}"] = entry
    return out


def measurements(rows: list[dict]) -> dict[str, dict]:
    """The rows keyed ``<policy>@<budget>/ctx<context>_b<batch>`` (controls ``static[<policy>]``), numbers only."""
    out = {}
    for r in rows:
        label = r["policy"] if r["paired_with"] is None else f"{CONTROL}[{r['paired_with']}]"
        out[f"{label}@{r['budget']}/ctx{r['context']}_b{r['batch']}"] = {
            k: r[k] for k in ("prefill_s", "step_ms", "tokens_per_s", "overhead", "kv_bytes", "peak_bytes")
            if r[k] is not None
        }  # fmt: skip
    return out


def write_outputs(rows: list[dict], metrics: dict, out_dir) -> list[str]:
    """bench.csv, bench.json and bench.png in ``out_dir``; returns their paths."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    paths = [out_dir / "bench.csv", out_dir / "bench.json", out_dir / "bench.png"]
    results.atomic_write_text(paths[0], buffer.getvalue())
    results.atomic_write_text(paths[1], json.dumps({**metrics, "rows": rows}, indent=2, default=str) + "\n")
    bench_plot(rows, paths[2])
    return [str(p) for p in paths]
