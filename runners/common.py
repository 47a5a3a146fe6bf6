"""What every runner needs before it runs: checked config values, the policy, the model, the output folder.

Bad input is reported as a `ConfigError` whose message names the config key and what it allows;
`run.py` prints it as one line and exits non-zero before anything is written.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PROJ_DIM_RANGE = (1, 1024)
RUNNERS_DIR = Path(__file__).resolve().parent
CONF_DIR = RUNNERS_DIR.parent / "conf"

# Attention implementations a user may ask for. The evicting cache always attends through "lshe" (fused
# SDPA, plus explicit weights only for policies that need them), so the others are mapped onto it.
ATTN_IMPLEMENTATIONS = ("lshe", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
_GIVES_WEIGHTS = ("lshe", "eager")
_DEVICE = re.compile(r"^(cpu|cuda|cuda:\d+|auto)$")


class ConfigError(ValueError):
    """Bad input: the message names the key and what is allowed."""


def group_choices(group: str) -> list[str]:
    """The config names available in ``conf/<group>/`` (for error messages)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_int(key: str, value, low: int, high: int | None = None, allow_none: bool = False) -> None:
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


def validate(cfg: DictConfig) -> None:
    """Check the top-level keys every run understands; raise `ConfigError` naming the bad key."""
    from lshe.cache import PREFILL_STRATEGIES, validate_budget

    try:
        validate_budget(cfg.budget)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_int("proj_dim", cfg.proj_dim, *PROJ_DIM_RANGE)
    check_int("seed", cfg.seed, 0)
    check_int("limit", cfg.limit, 1, allow_none=True)
    check_int("batch_size", cfg.batch_size, 1)
    check_int("threads", cfg.get("threads"), 1, allow_none=True)
    check_int("cache.sink", cfg.cache.sink, 0)
    check_int("cache.recent", cfg.cache.recent, 0)
    check_int("cache.window", cfg.cache.window, 1)
    if cfg.cache.prefill not in PREFILL_STRATEGIES:
        raise ConfigError(
            f"cache.prefill must be one of {list(PREFILL_STRATEGIES)}, got {cfg.cache.prefill!r}"
        )
    if not isinstance(cfg.device, str) or not _DEVICE.match(cfg.device):
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {cfg.device!r}")
    if not isinstance(cfg.get("diagnostics", False), bool):
        raise ConfigError(f"diagnostics must be true or false, got {cfg.diagnostics!r}")


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available else 'cpu'; a CUDA device on a machine without CUDA is a ConfigError."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but CUDA is not available here; use device=cpu or device=auto")
    return device


def set_threads(cfg: DictConfig) -> None:
    if cfg.get("threads"):
        import torch

        torch.set_num_threads(int(cfg.threads))


def policy_label(cfg: DictConfig, policy) -> str:
    """The policy's config name (``lshe_key``, an external ``theirs``), else the policy's ``name``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        choice = HydraConfig.get().runtime.choices.get("policy")
        if choice:
            return str(choice)
    except ValueError:  # not running under Hydra
        pass
    return str(policy.name)


def build_policy(cfg: DictConfig):
    """Instantiate ``cfg.policy`` (its ``_target_`` class); errors become ConfigErrors naming ``policy``."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from policies.base import EvictionPolicy

    if "_target_" not in cfg.policy:
        raise ConfigError("policy needs a _target_: the import path of an EvictionPolicy subclass")
    try:
        policy = instantiate(cfg.policy)
    except InstantiationException as err:
        cause = err.__cause__ or err
        message = str(cause) if isinstance(cause, (ValueError, TypeError)) else str(err)
        if isinstance(cause, ImportError) or "Error locating target" in str(err):
            message = (
                f"cannot import policy._target_={cfg.policy._target_!r}: {err}. A policy outside this "
                "repo must be importable: put its folder on PYTHONPATH (see README, 'New policies')"
            )
        raise ConfigError(f"policy: {message}") from None
    if not isinstance(policy, EvictionPolicy):
        raise ConfigError(
            f"policy._target_={cfg.policy._target_!r} built a {type(policy).__name__}, "
            "which is not an EvictionPolicy (policies.base.EvictionPolicy)"
        )
    return policy


def attention_for(cfg: DictConfig, policy) -> str:
    """The attention implementation to load the model with, for this policy (always ``"lshe"``).

    A policy that needs attention weights with an implementation that cannot give them is refused;
    any other implementation is switched to ``"lshe"`` with a note on stderr.
    """
    asked = cfg.model.get("attn_implementation", "lshe")
    if asked not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(
            f"model.attn_implementation must be one of {list(ATTN_IMPLEMENTATIONS)}, got {asked!r}"
        )
    if asked == "lshe":
        return asked
    if policy.needs_attention and asked not in _GIVES_WEIGHTS:
        raise ConfigError(
            f"policy {policy.name!r} needs attention weights, which model.attn_implementation={asked} cannot "
            "give; use model.attn_implementation=lshe (the default: fused SDPA, explicit weights only where "
            "the cache needs them) or eager"
        )
    why = (
        "computes the attention weights this policy needs, as eager does"
        if policy.needs_attention
        else "is the hook the evicting cache needs; it attends with fused SDPA"
    )
    print(
        f"note: using model.attn_implementation=lshe instead of {asked}: 'lshe' {why}",
        file=sys.stderr,
        flush=True,
    )
    return "lshe"


def load_model(cfg: DictConfig, attn_implementation: str, device: str):
    """`lshe.models.load_model` from ``cfg.model``; bad names become ConfigErrors listing the choices."""
    from lshe import models

    try:
        return models.load_model(
            name=cfg.model.name,
            dtype=cfg.model.get("dtype", "float32"),
            device=device,
            attn_implementation=attn_implementation,
            trust_remote_code=bool(cfg.model.get("trust_remote_code", False)),
            seed=cfg.seed,
        )
    except ValueError as err:
        raise ConfigError(f"model: {err} (config files: {group_choices('model')})") from None
    except OSError as err:
        raise ConfigError(
            f"model.name={cfg.model.name!r} could not be loaded ({type(err).__name__}: {err}); use one of "
            f"{list(models.MODEL_NAMES)}, a local model directory, or a reachable hub id"
        ) from None


def output_dir() -> Path:
    """This job's output folder (Hydra's ``hydra.runtime.output_dir``)."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def sweep_dir() -> Path:
    """The sweep's root folder (``hydra.sweep.dir``)."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().sweep.dir)


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def job_overrides() -> list[str]:
    """The command-line overrides of this job (``policy=lshe``, ``budget=0.3``, ...), [] outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def sweep_group(sweep_dir: str | Path) -> str:
    """A short name for a sweep folder: its path below ``outputs/multirun/`` when it lies there."""
    path = Path(sweep_dir).resolve()
    root = Path(os.environ.get("LSHE_ROOT", ".")).resolve() / "outputs" / "multirun"
    try:
        return str(path.relative_to(root))
    except ValueError:
        return path.name


def plain(cfg: DictConfig) -> dict:
    """The resolved config as plain Python containers (no Hydra node)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
