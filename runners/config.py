"""The typed config: schemas registered in Hydra's ConfigStore, and the range checks run before torch.

Hydra merges every YAML onto its schema when it composes, so a value of the wrong type (``seed=abc``,
``cache.sink=1.5``) or an unknown key (``cache.sinc=3``) is refused by Hydra itself with the key's
name. `validate` then checks ranges and choices, still before torch or transformers are imported,
so a bad value costs well under a second. Checks that need the component's code (a policy's own
arguments, a task's sizes) run where the component is built, with the same one-line `ConfigError`.

Booleans take YAML's spellings (``true/false``, ``yes/no``, ``on/off``): ``model.trust_remote_code=no``
is False. Anything else (``maybe``, ``2``) is an error.

Budgets: ``budget`` is always a fraction in (0, 1] of each sequence's prompt + max_new_tokens; an
absolute number of slots is ``slots=N`` (N > 1), which then replaces the fraction. ``budget=30`` is
refused with a suggestion (``budget=0.3`` or ``slots=30``). The Python API (`EvictingCache`) keeps
taking both kinds in its one ``budget`` argument.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
PREFILL_STRATEGIES = ("streaming", "window", "sequential")  # = lshe.cache.PREFILL_STRATEGIES (no torch here)
PROTOCOLS = ("joint", "kvpress")  # the whole prompt prefilled at once | context compressed, question appended
DTYPES = ("float32", "bfloat16", "float16")
WANDB_MODES = ("offline", "online", "disabled")
PROJ_DIM_RANGE = (1, 1024)
PRODUCTS = ("inductor", "gemv")  # = lshe.compiled's products (no torch here)
ATTN_IMPLEMENTATIONS = ("lshe", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
_DEVICE = re.compile(r"^(cpu|cuda|cuda:\d+|auto)$")


class ConfigError(ValueError):
    """Bad input: the message names the key and what is allowed."""


# ---- schemas ---------------------------------------------------------------------------------------
# The schemas give types; the values live once, in the YAML files (conf/), so fields are MISSING here.
@dataclass
class CacheConfig:
    """`lshe.cache.EvictingCache`'s settings besides the policy and the budget."""

    sink: int = MISSING
    recent: int = MISSING
    prefill: str = MISSING
    window: int = MISSING
    protocol: str = MISSING


@dataclass
class Config:
    """The primary config (conf/config.yaml). Components are built from their groups by ``_target_``."""

    model: Any = MISSING
    policy: Any = MISSING
    task: Any = MISSING
    runner: Any = MISSING
    logger: Any = MISSING
    budget: float = MISSING
    slots: int | None = MISSING
    proj_dim: int = MISSING
    seed: int = MISSING
    limit: int | None = MISSING
    device: str = MISSING
    batch_size: int = MISSING
    threads: int | None = MISSING
    diagnostics: bool = MISSING
    skip_done: bool = MISSING
    reference_dir: str | None = MISSING
    cache: CacheConfig = field(default_factory=CacheConfig)


@dataclass
class ModelConfig:
    """A model factory (``lshe.models.load_model`` or a user's): returns (model, tokenizer)."""

    _target_: str = MISSING
    name: str = MISSING
    dtype: str = MISSING
    attn_implementation: str = MISSING
    trust_remote_code: bool = MISSING


@dataclass
class RandomModelConfig:
    """Random weights in a real model's shape (`lshe.models.random_model`), with a byte tokenizer."""

    _target_: str = MISSING
    name: str = MISSING
    config: dict = MISSING
    dtype: str = MISSING
    attn_implementation: str = MISSING


@dataclass
class EvaluateConfig:
    _target_: str = MISSING
    fast_decode: Any = MISSING  # "auto", true or false
    graph: bool = MISSING
    compile: bool = MISSING
    products: str | None = MISSING  # "inductor", "gemv" or None (lshe.compiled.PRODUCTS)


@dataclass
class BenchConfig:
    """`runners.bench.Bench` (conf/runner/bench.yaml holds the values and says what each means)."""

    _target_: str = MISSING
    policies: list[str] | None = MISSING
    budgets: list[float] | None = MISSING
    contexts: list[int] = MISSING
    batches: list[Any] = MISSING
    steps: int = MISSING
    warmup: int = MISSING
    graph: bool = MISSING
    fused: bool = MISSING
    control: bool = MISSING
    reserve_gib: float = MISSING
    compile: bool = MISSING
    products: str | None = MISSING  # "inductor", "gemv" or None (lshe.compiled.PRODUCTS)
    hf_baseline: bool = MISSING


@dataclass
class WandbConfig:
    _target_: str = MISSING
    project: str = MISSING
    entity: str | None = MISSING
    mode: str = MISSING
    group: str | None = MISSING
    tags: list[str] = MISSING
    log_predictions: bool = MISSING


@dataclass
class NullLoggerConfig:
    _target_: str = MISSING


def register() -> None:
    """Put the schemas in the ConfigStore (run.py and tests call this before composing)."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    cs.store(group="model", name="schema_pretrained", node=ModelConfig)
    cs.store(group="model", name="schema_random", node=RandomModelConfig)
    cs.store(group="runner", name="schema_evaluate", node=EvaluateConfig)
    cs.store(group="runner", name="schema_bench", node=BenchConfig)
    cs.store(group="logger", name="schema_wandb", node=WandbConfig)
    cs.store(group="logger", name="schema_none", node=NullLoggerConfig)


register()


# ---- range checks ----------------------------------------------------------------------------------
def group_choices(group: str) -> list[str]:
    """The config names available in ``conf/<group>/`` (for error messages)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_int(key: str, value, low: int, high: int | None = None, allow_none: bool = False) -> None:
    """Raise `ConfigError` unless ``value`` is an integer in [low, high] (or None when allowed)."""
    if value is None and allow_none:
        return
    allowed = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
    if allow_none:
        allowed += " or null"
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        raise ConfigError(f"{key} must be {allowed}, got {value!r}")


def check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")


def check_budget(budget, slots) -> None:
    """``budget`` a fraction in (0, 1]; ``slots`` null or an integer > 1 (then it replaces budget)."""
    if slots is not None:
        check_int("slots", slots, 2)
        return
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
        hints = []
        if isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget > 1:
            if 5 <= budget <= 100:  # below 5 the percent reading is a budget too small to keep a prompt
                hints.append(f"budget={budget / 100:g} ({budget:g}% of the cache)")
            if budget == int(budget):
                hints.append(f"slots={int(budget)} (an absolute number of cache slots)")
        hint = f": did you mean {' or '.join(hints)}?" if hints else ""
        raise ConfigError(
            f"budget must be a fraction in (0, 1] of prompt + max_new_tokens, got {budget!r}{hint}"
        )


def cache_budget(cfg: DictConfig) -> float | int:
    """What `EvictingCache` takes as its budget: ``slots`` (int) when set, else the fraction."""
    return int(cfg.slots) if cfg.get("slots") is not None else float(cfg.budget)


def validate(cfg: DictConfig) -> None:
    """Check the ranges of everything the schemas type; raise `ConfigError` naming the first bad key."""
    _check_declared(cfg)
    check_budget(cfg.budget, cfg.get("slots"))
    check_int("proj_dim", cfg.proj_dim, *PROJ_DIM_RANGE)
    check_int("seed", cfg.seed, 0)
    check_int("limit", cfg.limit, 1, allow_none=True)
    check_int("batch_size", cfg.batch_size, 1)
    check_int("threads", cfg.get("threads"), 1, allow_none=True)
    check_int("cache.sink", cfg.cache.sink, 0)
    check_int("cache.recent", cfg.cache.recent, 0)
    check_int("cache.window", cfg.cache.window, 1)
    check_choice("cache.prefill", cfg.cache.prefill, PREFILL_STRATEGIES)
    check_choice("cache.protocol", cfg.cache.protocol, PROTOCOLS)
    if cfg.get("slots") is not None and cfg.slots <= cfg.cache.sink + cfg.cache.recent:
        raise ConfigError(
            f"slots={cfg.slots} must be larger than cache.sink + cache.recent = {cfg.cache.sink + cfg.cache.recent}"
        )
    if not isinstance(cfg.device, str) or not _DEVICE.match(cfg.device):
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {cfg.device!r}")
    for group in ("model", "policy", "task", "runner", "logger"):
        node = cfg.get(group)
        if not isinstance(node, DictConfig) or not isinstance(node.get("_target_"), str):
            raise ConfigError(f"{group} needs a _target_: the import path of what builds it (see README)")
    _validate_model(cfg.model)
    _validate_logger(cfg.logger)
    if cfg.runner._target_ == "runners.bench.Bench":
        _validate_bench(cfg.runner)
    if cfg.runner._target_ in ("runners.bench.Bench", "runners.evaluate.Evaluate"):
        _validate_products(cfg.runner)
    if cfg.runner._target_ == "runners.evaluate.Evaluate" and cfg.runner.get("fast_decode") not in (
        "auto",
        True,
        False,
    ):
        raise ConfigError(f"runner.fast_decode must be auto, true or false, got {cfg.runner.fast_decode!r}")


def _check_declared(cfg: DictConfig) -> None:
    """Refuse top-level and ``cache.*`` keys the schema does not declare: Hydra lets ``+key=value`` add any
    key, which nothing would read (``+budgte=0.3``). The component groups' keys are their own (checked
    by their constructors)."""
    for keys, schema, where in (
        (cfg, Config, "the top-level keys"),
        (cfg.cache, CacheConfig, "the cache keys"),
    ):
        declared = [f.name for f in fields(schema)]
        for key in keys:
            if key not in declared and not (schema is Config and key == "hydra"):
                name = key if schema is Config else f"cache.{key}"
                raise ConfigError(f"unknown key {name!r} (added with +): {where} are {declared}")


def _validate_model(model: DictConfig) -> None:
    if "dtype" in model:
        check_choice("model.dtype", model.dtype, DTYPES)
    if "attn_implementation" in model:
        check_choice("model.attn_implementation", model.attn_implementation, ATTN_IMPLEMENTATIONS)
    if "trust_remote_code" in model and not isinstance(model.trust_remote_code, bool):
        raise ConfigError(f"model.trust_remote_code must be true or false, got {model.trust_remote_code!r}")


def _validate_logger(logger: DictConfig) -> None:
    if "mode" in logger:
        check_choice("logger.mode", logger.mode, WANDB_MODES)


def _validate_products(runner: DictConfig) -> None:
    if runner.get("products") is None:  # the compiled layers' default
        return
    check_choice("runner.products", runner.products, PRODUCTS)
    if not runner.get("compile"):
        raise ConfigError(
            f"runner.products={runner.products} chooses how the compiled decoder layers compute their "
            "products: it needs runner.compile=true"
        )


def _validate_bench(runner: DictConfig) -> None:
    if runner.policies is not None and len(runner.policies) == 0:
        raise ConfigError("runner.policies must name at least one policy config (or be null)")
    for budget in runner.budgets or []:
        if not 0.0 < budget <= 1.0:
            raise ConfigError(f"runner.budgets must be fractions in (0, 1], got {budget!r}")
    if not runner.contexts:
        raise ConfigError("runner.contexts must list at least one context length")
    for context in runner.contexts:
        check_int("runner.contexts", context, 1)
    for batch in runner.batches:
        if batch != "max":
            check_int("runner.batches", batch, 1)
    sizes = sorted(b for b in runner.batches if b != "max")  # a bench grows one prefill to each batch
    for smaller, larger in zip(sizes, sizes[1:], strict=False):
        if larger % smaller:
            raise ConfigError(
                f"runner.batches must each be a multiple of the one before (sorted, 'max' aside), "
                f"got {list(runner.batches)}: {larger} is not a multiple of {smaller}"
            )
    check_int("runner.steps", runner.steps, 1)
    check_int("runner.warmup", runner.warmup, 0)
    if runner.compile and runner.warmup < 1:
        raise ConfigError(
            "runner.compile=true needs runner.warmup >= 1 (compilation runs in an untimed step)"
        )
    if runner.reserve_gib < 0:
        raise ConfigError(f"runner.reserve_gib must be >= 0, got {runner.reserve_gib!r}")
