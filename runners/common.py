"""What every runner shares around its work: the job's folder and names, the device, the logger, saving.

A runner is any callable ``runner(cfg) -> metrics`` built from ``conf/runner/<name>.yaml`` by
``_target_`` (`runners.evaluate.Evaluate`, `runners.bench.Bench`, or a user's own). `run.py` checks the
config, takes the job's lock and skips finished jobs before it calls the runner; the runner ends with
`finish`, which writes the results (always) and then hands them to the logger (a logger failure is a
warning, never a lost result).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from runners import results
from runners.components import build
from runners.config import ConfigError  # noqa: F401  (re-exported: runners raise it)

log = logging.getLogger("lshe")
FAILED = "failed.json"  # in a job's folder: this job of a sweep stopped with a one-line error


def output_dir() -> Path:
    """This job's output folder (Hydra's ``hydra.runtime.output_dir``)."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


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


def overridden(key: str) -> bool:
    """Whether this job's command line (or its sweep) set ``key`` (``cache.prefill=...``, ``+key=...``)."""
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in job_overrides())


def group_choices_of_job() -> dict[str, str]:
    """The config-group choices of this job (``{"policy": "lshe_key", "task": "passkey", ...}``)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        choices = HydraConfig.get().runtime.choices
    except ValueError:
        return {}
    return {k: str(v) for k, v in choices.items() if not k.startswith("hydra") and v is not None}


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


@contextlib.contextmanager
def job_logger(cfg: DictConfig, job_type: str) -> Iterator[object]:
    """The logger ``cfg.logger`` builds, entered for the job: one run per job, grouped by sweep."""
    from hydra.core.hydra_config import HydraConfig

    group = None
    if is_multirun():
        group = sweep_group(HydraConfig.get().sweep.dir)
    logger = build(
        "logger",
        cfg.logger,
        None,
        output_dir=str(output_dir()),
        run_config={**plain(cfg), "choices": group_choices_of_job()},
        name=",".join(job_overrides()) or None,
        sweep_group=group,
        job_type=job_type,
    )
    with logger:
        yield logger


def finish(cfg: DictConfig, metrics: dict, predictions: list[dict], logger, extra_files=()) -> Path:
    """Write the job's results (config, predictions, extra files, metrics.json last), then log them."""
    out = output_dir()
    metrics.setdefault("output_dir", str(out))
    metrics.setdefault("config_hash", results.config_hash(cfg))
    metrics.setdefault("overrides", job_overrides())
    metrics.setdefault("choices", group_choices_of_job())
    metrics.setdefault("versions", results.versions())
    path = results.save(out, cfg, metrics, predictions, extra_files=extra_files)
    logger.log_results(metrics, predictions)
    return path


def mark_failed(err: BaseException) -> None:
    """Leave `FAILED` (the one-line error) in the job's folder: a sweep's failed job returns instead of
    raising (no traceback), and `runners.sweep.SweepReport` fails the sweep at its end from these files."""
    try:
        path = output_dir() / FAILED
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"error": str(err)}) + "\n")
    except OSError as why:  # a full or read-only disk: the error line above is all there is
        log.warning("warning: could not record the failure in %s: %s", FAILED, why)


def clear_failed() -> None:
    """Remove a `FAILED` marker an earlier run of this job left (a rerun of a failed sweep job)."""
    with contextlib.suppress(ValueError, OSError):  # ValueError: not under Hydra
        (output_dir() / FAILED).unlink(missing_ok=True)


def release() -> None:
    """Give cached GPU memory back between jobs of one process (the basic launcher runs a whole sweep in
    one); the job's objects are freed by reference counting when the runner returns (no cycles)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class OutputCheck(Callback):
    """Hydra callback: refuse, in one line, an output folder that cannot be written, before Hydra itself
    creates it (which would end in a traceback). Checks the nearest existing parent; creates nothing."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.sweep.dir)

    @staticmethod
    def _check(folder: str) -> None:
        import sys

        path = Path(folder).absolute()
        existing = next(p for p in [path, *path.parents] if p.exists())
        if not existing.is_dir():
            reason = f"{existing} is not a folder"
        elif not os.access(existing, os.W_OK | os.X_OK):
            reason = f"{existing} is not writable"
        else:
            return
        print(f"error: cannot write results to {path}: {reason}", file=sys.stderr, flush=True)
        sys.exit(1)
