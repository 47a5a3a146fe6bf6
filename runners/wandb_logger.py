"""Experiment tracking: one Weights & Biases run per job, grouped by sweep, offline unless asked otherwise.

Use as a context manager around the work of one job::

    with make_logger(cfg, output_dir, name="policy=lshe,budget=0.3", group="2026-11-29/17-00-00") as log:
        ...
        log.log_results(metrics, predictions)

The run is finished when the block exits, with exit code 1 when it exits through an exception, so a
failing job closes its run and the next job of the same process starts a clean one. Offline runs are
written under ``<output_dir>/wandb/offline-run-*``; upload them later with ``wandb sync <that folder>``.
``logger=none`` gives a logger that does nothing.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from runners.common import ConfigError

WANDB_MODES = ("offline", "online", "disabled")


class NullLogger:
    """``logger=none``: logs nothing."""

    def __enter__(self) -> NullLogger:
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def log_results(self, metrics: dict, predictions: list[dict]) -> None:
        return None


class WandbLogger:
    """One W&B run: the resolved config, the metrics (history and summary), the predictions as a table."""

    def __init__(
        self,
        settings: DictConfig,
        run_config: dict,
        output_dir: str | Path,
        name: str | None = None,
        group: str | None = None,
        job_type: str | None = None,
    ) -> None:
        mode = settings.get("mode", "offline")
        if mode not in WANDB_MODES:
            raise ConfigError(f"logger.mode must be one of {list(WANDB_MODES)}, got {mode!r}")
        self.settings = settings
        self.mode = mode
        self.run_config = run_config
        self.output_dir = Path(output_dir)
        self.name = name
        self.group = settings.get("group") or group
        self.job_type = job_type
        self.run = None

    def __enter__(self) -> WandbLogger:
        import wandb

        self.output_dir.mkdir(parents=True, exist_ok=True)
        tags = self.settings.get("tags") or []
        if OmegaConf.is_config(tags):
            tags = list(OmegaConf.to_container(tags))
        self.run = wandb.init(
            project=self.settings.get("project", "lshe"),
            entity=self.settings.get("entity"),
            mode=self.mode,
            dir=str(self.output_dir),
            name=self.name,
            group=self.group,
            job_type=self.job_type,
            tags=tags,
            config=self.run_config,
            reinit="finish_previous",
            settings=wandb.Settings(console="off", silent=True),
        )
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.run is not None:
            try:
                self.run.finish(exit_code=1 if exc_type is not None else 0)
            except Exception as err:  # never hide the job's own error behind a logging error
                print(f"warning: could not finish the W&B run: {err}", file=sys.stderr)
            self.run = None
        return False

    def log_results(self, metrics: dict, predictions: list[dict]) -> None:
        import wandb

        numbers = {
            key: value
            for key, value in _flatten(metrics).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        }
        self.run.log(numbers)
        self.run.summary.update(numbers)
        if self.settings.get("log_predictions", True) and predictions:
            columns = ["id", "prediction", "target", "score"]
            extra = [k for k in ("full_prediction", "agreement_rouge_l") if k in predictions[0]]
            table = wandb.Table(columns=columns + extra)
            for row in predictions:
                table.add_data(*[_cell(row.get(c)) for c in columns + extra])
            self.run.log({"predictions": table})


def _cell(value):
    return value if isinstance(value, (int, float, str)) or value is None else str(value)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


def make_logger(
    cfg: DictConfig,
    output_dir: str | Path,
    name: str | None = None,
    group: str | None = None,
    job_type: str | None = None,
) -> NullLogger | WandbLogger:
    """The logger ``cfg.logger`` asks for (``logger.name``: ``wandb`` or ``none``)."""
    kind = cfg.logger.get("name", "none")
    if kind == "none":
        return NullLogger()
    if kind == "wandb":
        run_config = OmegaConf.to_container(cfg, resolve=True)
        return WandbLogger(cfg.logger, run_config, output_dir, name=name, group=group, job_type=job_type)
    raise ConfigError(f"logger.name must be 'wandb' or 'none', got {kind!r}")
