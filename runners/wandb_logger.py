"""Experiment tracking: one Weights & Biases run per job, grouped by sweep, offline unless asked otherwise.

Loggers are built from ``conf/logger/*.yaml`` by ``_target_`` and used as a context manager around a
job (`runners.common.job_logger`)::

    with job_logger(cfg, job_type="evaluate") as logger:
        ...
        logger.log_results(metrics, predictions)

A logger receives ``output_dir``, ``run_config`` (the resolved config plus the config-group
``choices``), ``name``, ``sweep_group`` and ``job_type`` besides its YAML keys; a user's own logger
is any class with that constructor, ``__enter__``/``__exit__`` and ``log_results``.

W&B never costs a result: a failure at ``wandb.init`` or while logging is a one-line warning, and the
job's files are written before anything is logged. The run is finished when the block exits (exit
code 1 through an exception), so a failing job closes its run and the next job of the same process
starts a clean one. Offline runs are written under ``<output_dir>/wandb/offline-run-*``; upload them
later with ``wandb sync <that folder>``.

What a run holds: the config flattened with dots, the config-group choices included
(``choices.policy=lshe_key``, ``choices.task=passkey``), so runs can be filtered by them; every number
of metrics.json as a summary metric (no history) plus its task/model/policy/device/protocol as text;
the predictions as a ``wandb.Table``; and the job's files (metrics.json, predictions.jsonl,
config.yaml, figures) as an artifact of type ``job-results``. At the end of a multirun,
`runners.sweep.SweepReport` adds one run of ``job_type=sweep`` (`log_sweep`) with the summary table,
the figures and an artifact of type ``sweep-report``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

log = logging.getLogger("lshe")


class NullLogger:
    """``logger=none``: logs nothing."""

    def __init__(self, **_) -> None:
        return None

    def __enter__(self) -> NullLogger:
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def log_results(self, metrics: dict, predictions: list[dict]) -> None:
        return None


class WandbLogger:
    """One W&B run: the flat config with the group choices, the metrics as summary, the predictions table."""

    def __init__(
        self,
        output_dir: str | Path,
        run_config: dict,
        name: str | None = None,
        sweep_group: str | None = None,
        job_type: str | None = None,
        *,
        project: str,
        entity: str | None,
        mode: str,
        group: str | None,
        tags: list[str] | tuple,
        log_predictions: bool,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.run_config = run_config
        self.name, self.job_type = name, job_type
        self.group = group or sweep_group
        self.project, self.entity, self.mode = project, entity, mode
        self.tags = list(tags)
        self.log_predictions = log_predictions
        self.run = None

    def __enter__(self) -> WandbLogger:
        try:
            import wandb

            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=self.project,
                entity=self.entity,
                mode=self.mode,
                dir=str(self.output_dir),
                name=self.name,
                group=self.group,
                job_type=self.job_type,
                tags=self.tags,
                config=_flatten(self.run_config, sep="."),
                reinit="finish_previous",
                settings=wandb.Settings(console="off", silent=True),
            )
        except Exception as err:  # W&B is a convenience: the job goes on and saves its results
            log.warning(
                "warning: W&B could not start (%s: %s); results are saved locally only",
                type(err).__name__,
                _first_line(err),
            )
            self.run = None
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.run is not None:
            try:
                self.run.finish(exit_code=1 if exc_type is not None else 0)
            except Exception as err:  # never hide the job's own error behind a logging error
                log.warning("warning: could not finish the W&B run: %s", _first_line(err))
            self.run = None
        return False

    def log_results(self, metrics: dict, predictions: list[dict]) -> None:
        if self.run is None:
            return
        try:
            import wandb

            numbers = {
                key: value
                for key, value in _flatten(_split_intervals(metrics)).items()
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            }
            self.run.summary.update(numbers)
            for key in ("task", "model", "policy", "metric", "device", "protocol"):  # filterable text
                if isinstance(metrics.get(key), str):
                    self.run.summary[key] = metrics[key]
            self.log_files(f"results-{self.run.id}", "job-results")
            if self.log_predictions and predictions:
                columns = ["id", "prediction", "target", "score"]
                extra = [k for k in ("full_prediction", "agreement_rouge_l") if k in predictions[0]]
                table = wandb.Table(columns=columns + extra)
                for row in predictions:
                    table.add_data(*[_cell(row.get(c)) for c in columns + extra])
                self.run.log({"predictions": table})
        except Exception as err:
            log.warning(
                "warning: W&B logging failed (%s: %s); the results are in %s",
                type(err).__name__,
                _first_line(err),
                self.output_dir,
            )

    def log_files(self, name: str, kind: str) -> None:
        """The job's result files (metrics.json, predictions.jsonl, config.yaml, figures) as one artifact."""
        import wandb

        files = [
            path
            for pattern in ("metrics.json", "predictions.jsonl", "config.yaml", "*.png", "summary.*")
            for path in sorted(self.output_dir.glob(pattern))
            if path.is_file()
        ]
        if not files:
            return
        artifact = wandb.Artifact(name=_artifact_name(name), type=kind)
        for path in files:
            artifact.add_file(str(path), name=path.name)
        self.run.log_artifact(artifact)


def log_sweep(sweep_dir: str | Path, logger_cfg: dict, group: str) -> None:
    """One W&B run for a whole sweep (``job_type=sweep``, grouped with its jobs): the summary table as a
    ``wandb.Table``, the figures as images, and summary.csv, summary.md and the figures as an artifact.
    Never raises: a failure is a one-line warning (the sweep's files are already written)."""
    sweep_dir = Path(sweep_dir)
    settings = {
        k: logger_cfg.get(k) for k in ("project", "entity", "mode", "group", "tags", "log_predictions")
    }
    settings["tags"] = list(settings["tags"] or [])
    settings["log_predictions"] = bool(settings["log_predictions"])
    try:
        import csv

        import wandb

        with WandbLogger(
            sweep_dir, {"sweep_dir": str(sweep_dir)}, name=f"sweep {group}", sweep_group=group,
            job_type="sweep", **settings,
        ) as logger:  # fmt: skip
            if logger.run is None:
                return
            summary = sweep_dir / "summary.csv"
            if summary.is_file():
                with open(summary, newline="") as f:
                    rows = list(csv.DictReader(f))
                if rows:
                    table = wandb.Table(columns=list(rows[0]))
                    for row in rows:
                        table.add_data(*row.values())
                    logger.run.log({"summary": table})
                logger.run.summary["jobs"] = len(rows)
            images = {p.stem: wandb.Image(str(p)) for p in sorted(sweep_dir.glob("*.png"))}
            if images:
                logger.run.log(images)
            logger.log_files(f"sweep-{group}", "sweep-report")
    except Exception as err:
        log.warning("warning: the sweep's W&B run failed (%s: %s); the report is in %s",
                    type(err).__name__, _first_line(err), sweep_dir)  # fmt: skip


def _split_intervals(d: dict) -> dict:
    """``score_ci: [low, high]`` -> ``score_ci_low``, ``score_ci_high`` (at any depth), so intervals are
    summary numbers too."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out[key] = _split_intervals(value)
        elif str(key).endswith("_ci") and isinstance(value, (list, tuple)) and len(value) == 2:
            out[f"{key}_low"], out[f"{key}_high"] = value
        else:
            out[key] = value
    return out


def _artifact_name(name: str) -> str:
    """W&B artifact names allow letters, digits, '-', '_' and '.'."""
    import re

    return re.sub(r"[^\w.-]+", "-", name).strip("-")[:120] or "results"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _cell(value):
    return value if isinstance(value, (int, float, str)) or value is None else str(value)


def _flatten(d: dict, prefix: str = "", sep: str = "/") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}{sep}", sep))
        else:
            out[name] = value
    return out
