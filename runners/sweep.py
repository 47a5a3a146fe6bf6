"""Sweep reports: ``summary.csv``, ``summary.md`` and the figures at a sweep's root.

`SweepReport` is a Hydra callback (``hydra.callbacks`` in conf/config.yaml): after every job of a
multirun it refreshes the report, so an interrupted or partly failed sweep still has one, and it
writes the final one when the sweep ends (and, with ``logger=wandb``, one sweep-level W&B run holding
the table and figures). The report is built from the ``metrics.json`` files found under the sweep
folder, so it also covers jobs skipped because they had finished before. Only jobs whose results
verify (`runners.results.check_job`: metrics.json checksum and the sha256 of every file of the job)
are reported; a damaged one is left out with a one-line note on the ``lshe`` logger.

Every score carries its 95% interval (``*_ci_low`` / ``*_ci_high`` columns, ``[low, high]`` in the
tables, error bars in the figures) and the paired comparison with the full cache on the same examples
(``paired_*`` columns; a ``*`` in the tables where p < 0.05). Jobs written before intervals existed
have empty interval cells. Swept numbers are shown rounded to 12 significant digits
(``budget=0.30000000000000004`` as 0.3), in tables, labels and (through the ``lshe_tidy`` resolver of
``hydra.sweep.subdir``) folder names. Figures: `runners.plots`.
By hand: ``python -m runners.sweep outputs/multirun/<date>/<time>``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from runners import plots
from runners.common import FAILED
from runners.results import (
    METRICS,
    atomic_write_text,
    check_job,
    clean_temp_files,
    file_lock,
)

log = logging.getLogger("lshe")

SUMMARY = "summary.csv"
TABLES = "summary.md"
PLOT = "score_vs_budget.png"
AGREEMENT_PLOT = "agreement_vs_budget.png"  # generation tasks: ROUGE-L against the full-cache output

COLUMNS = [
    "job",
    "task",
    "metric",
    "higher_is_better",
    "model",
    "device",
    "protocol",
    "policy",
    "budget",
    "proj_dim",
    "seed",
    "score",
    "score_ci_low",
    "score_ci_high",
    "score_full",
    "score_full_ci_low",
    "score_full_ci_high",
    "paired_test",
    "paired_diff",
    "paired_diff_ci_low",
    "paired_diff_ci_high",
    "paired_p_value",
    "agreement_exact_match",
    "agreement_exact_match_ci_low",
    "agreement_exact_match_ci_high",
    "agreement_rouge_l",
    "agreement_rouge_l_ci_low",
    "agreement_rouge_l_ci_high",
    "kv_slots",
    "kv_cache_bytes",
    "kv_cache_bytes_full",
    "kv_cache_fraction",
    "prefill_s",
    "decode_tokens_per_s",
    "examples_per_s",
    "examples_per_s_warm",
    "peak_memory_bytes",
    "n_examples",
    "interval_seed",
    "n_boot",
    "wall_s",
    "label",
]
INTERVALS = ("score", "score_full", "agreement_exact_match", "agreement_rouge_l")
# Overrides that never make a separate line in the plot (the x axis, the subplot, bookkeeping).
_NOT_IN_LABEL = ("budget", "task", "experiment", "skip_done", "logger", "threads", "device", "reference_dir")


def collect(sweep_dir: str | Path) -> list[dict]:
    """One row per finished job (a ``metrics.json`` below ``sweep_dir`` whose results verify and hold
    a score), sorted by task, label, budget. Damaged jobs are left out with a note; never raises for them."""
    sweep_dir = Path(sweep_dir)
    found = []
    for path in sorted(sweep_dir.rglob(METRICS)):
        if ".submitit" in path.parts or "wandb" in path.parts:
            continue
        metrics, why = check_job(path.parent)
        if why is not None:
            log.warning("sweep report: leaving out %s: %s", _job_name(path, sweep_dir), why)
        elif "score" in metrics:  # jobs of other runners (bench) have no score
            found.append((path, metrics))
    settings = [_settings(metrics) for _, metrics in found]
    tasks = [str(metrics.get("task")) for _, metrics in found]
    varying = {}  # per task: the overrides that differ between its jobs (the other tasks' do not count)
    for task in set(tasks):
        mine = [s for s, t in zip(settings, tasks, strict=True) if t == task]
        varying[task] = sorted({k for s in mine for k in s if len({str(t.get(k)) for t in mine}) > 1})
    rows = []
    for (path, metrics), setting, task in zip(found, settings, tasks, strict=True):
        row = {key: metrics.get(key) for key in COLUMNS}
        row.update(_interval_columns(metrics))
        row["protocol"] = metrics.get("protocol") or "joint"
        row["job"] = _job_name(path, sweep_dir)
        row["budget"] = _tidy(row["budget"])
        extra = [f"{k}={setting[k]}" for k in varying[task] if k in setting]
        row["label"] = ", ".join([str(metrics.get("policy")), *extra])
        rows.append(row)
    rows.sort(key=lambda r: (str(r["task"]), str(r["label"]), _number(r["budget"])))
    return rows


def _interval_columns(metrics: dict) -> dict:
    """The flat interval and paired-test columns of one job (empty where its metrics have none)."""
    out: dict = {}
    for key in INTERVALS:
        ci = metrics.get(f"{key}_ci")
        ok = isinstance(ci, list) and len(ci) == 2
        out[f"{key}_ci_low"], out[f"{key}_ci_high"] = (ci[0], ci[1]) if ok else (None, None)
    paired = metrics.get("paired_vs_full") or {}
    diff_ci = paired.get("diff_ci") or [None, None]
    out.update(
        paired_test=paired.get("test"),
        paired_diff=paired.get("diff"),
        paired_diff_ci_low=diff_ci[0],
        paired_diff_ci_high=diff_ci[1],
        paired_p_value=paired.get("p_value"),
    )
    settings = metrics.get("intervals") or {}
    out["interval_seed"], out["n_boot"] = settings.get("seed"), settings.get("n_boot")
    return out


def tidy_dirname(dirname: str) -> str:
    """Hydra's ``override_dirname`` with swept floats rounded: ``budget=0.30000000000000004,policy=lshe``
    -> ``budget=0.3,policy=lshe`` (the ``lshe_tidy`` resolver of ``hydra.sweep.subdir``)."""
    parts = []
    for item in str(dirname).split(","):
        key, sep, value = item.partition("=")
        parts.append(f"{key}{sep}{_tidy(value)}" if sep else item)
    return ",".join(parts)


def _job_name(path: Path, sweep_dir: Path) -> str:
    return str(path.parent.relative_to(sweep_dir)) if path.parent != sweep_dir else "."


def _tidy(value):
    """A swept number without float noise: 0.30000000000000004 -> 0.3 (12 significant digits).

    Floats (and strings that spell a float with a point or exponent) are rounded; ints, other strings
    and other values are returned unchanged."""
    if isinstance(value, bool) or isinstance(value, int):
        return value
    if isinstance(value, float):
        return float(f"{value:.12g}") if math.isfinite(value) else value
    if isinstance(value, str) and any(c in value for c in ".eE"):
        try:
            number = float(value)
        except ValueError:
            return value
        return f"{number:.12g}" if math.isfinite(number) else value
    return value


def _settings(metrics: dict) -> dict:
    """A job's overrides that may distinguish plot lines: all but policy, budget, task and bookkeeping."""
    out = {}
    overrides = metrics.get("overrides")
    for override in overrides if isinstance(overrides, list) else []:
        if not isinstance(override, str):
            continue
        key, _, value = override.lstrip("+~").partition("=")
        if key == "policy" or key in _NOT_IN_LABEL or key.startswith("hydra."):
            continue
        out[key] = _tidy(value)
    return out


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("inf")


def write_summary(rows: list[dict], path: Path) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})
    return atomic_write_text(path, buffer.getvalue())


def _header(budget: float) -> str:
    return f"{budget:.12g}"


def _cell(value) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return ""
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def _cell_ci(row: dict | None, key: str) -> str:
    """``0.5 [0.24, 0.76]`` (the value and its 95% interval), ``*`` after a score that differs from the
    full cache's at p < 0.05; just the value when the job has no interval."""
    if row is None:
        return ""
    text = _cell(row.get(key))
    low, high = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
    if text and isinstance(low, (int, float)) and isinstance(high, (int, float)):
        text += f" [{_cell(low)}, {_cell(high)}]"
    p_value = row.get("paired_p_value")
    if text and key == "score" and isinstance(p_value, (int, float)) and p_value < 0.05:
        text += " *"
    return text


def _full_cell(task_rows: list[dict]) -> str:
    """The full cache's score (and interval) on the task's examples; the interval only when every row
    agrees on it and on the number of examples (one value from different examples has no one interval)."""
    with_full = [r for r in task_rows if isinstance(r.get("score_full"), (int, float))]
    if not with_full:
        return ""
    values = {round(r["score_full"], 12) for r in with_full}
    if len(values) > 1:  # different examples (limit, protocol): no single full-cache score
        return f"{_cell(min(values))}-{_cell(max(values))}"
    agree = {
        (r.get("score_full_ci_low"), r.get("score_full_ci_high"), r.get("n_examples")) for r in with_full
    }
    return _cell_ci(with_full[0], "score_full") if len(agree) == 1 else _cell(with_full[0]["score_full"])


def markdown(rows: list[dict]) -> str:
    """Score tables, one per task: a line per policy (and varied setting), a column per budget,
    the full-cache score of the same examples last; each cell the value and its 95% interval. Generation
    tasks get a second table: ROUGE-L of each output against the full-cache output."""
    parts = []
    for task in sorted({str(r["task"]) for r in rows}):
        task_rows = [r for r in rows if str(r["task"]) == task]
        budgets = sorted({_number(r["budget"]) for r in task_rows})
        first = task_rows[0]
        full_cell = _full_cell(task_rows)
        direction = "higher is better" if first.get("higher_is_better") is not False else "lower is better"
        n = sorted({r.get("n_examples") for r in task_rows}, key=str)
        devices = sorted({str(r.get("device")) for r in task_rows if r.get("device")})
        where = f", {', '.join(devices)}" if devices else ""
        tables = [
            (
                "score",
                f"{first.get('metric')}, {direction}; [95% interval], * = differs from the full cache (p < 0.05)",
            )
        ]
        if any(isinstance(r.get("agreement_rouge_l"), (int, float)) for r in task_rows):
            tables.append(
                ("agreement_rouge_l", "ROUGE-L of each output against the full-cache output [95% interval]")
            )
        for key, what in tables:
            parts.append(
                f"**{task}** ({first.get('model')}, {', '.join(map(str, n))} examples{where}): {what}\n"
            )
            parts.append("| policy | " + " | ".join(_header(b) for b in budgets) + " | full cache |")
            parts.append("| --- |" + " ---: |" * (len(budgets) + 1))
            for label in sorted({r["label"] for r in task_rows}, key=plots.label_order):
                by_budget = {_number(r["budget"]): r for r in task_rows if r["label"] == label}
                cells = [_cell_ci(by_budget.get(b), key) for b in budgets]
                parts.append(
                    f"| {label} | " + " | ".join(cells) + f" | {full_cell if key == 'score' else '1'} |"
                )
            parts.append("")
    return "\n".join(parts)


def plot(rows: list[dict], path: Path, key: str = "score") -> Path:
    """Score (or ``key``) against budget, one panel per task (`runners.plots.budget_figure`); PNG."""
    return plots.save(plots.budget_figure(rows, key), path, dpi=130)


def write_report(sweep_dir: str | Path) -> tuple[Path, Path] | None:
    """Write ``summary.csv``, ``summary.md`` (Markdown tables) and ``score_vs_budget.png`` at
    ``sweep_dir``; returns the CSV and PNG paths, None when no job has finished.

    Writers of one sweep's report (two sweeps into one folder) take turns through a lock, which also
    removes the temporary files a killed writer left (`runners.results.file_lock`)."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    if not rows:
        return None
    with file_lock(sweep_dir / SUMMARY, timeout_s=120):
        clean_temp_files(sweep_dir, TABLES)
        clean_temp_files(sweep_dir, PLOT)
        atomic_write_text(sweep_dir / TABLES, markdown(rows))
        agreement = [r for r in rows if isinstance(r.get("agreement_rouge_l"), (int, float))]
        if agreement:
            clean_temp_files(sweep_dir, AGREEMENT_PLOT)
            plot(agreement, sweep_dir / AGREEMENT_PLOT, key="agreement_rouge_l")
        return write_summary(rows, sweep_dir / SUMMARY), plot(rows, sweep_dir / PLOT)


class SweepReport(Callback):
    """Hydra callback: refresh the sweep report after each job and write it at the end of the sweep."""

    def on_job_end(self, config: DictConfig, job_return=None, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        try:
            if HydraConfig.get().mode != RunMode.MULTIRUN:
                return
            write_report(config.hydra.sweep.dir)
        except Exception as err:  # a report problem must never fail a job
            log.warning("could not update the sweep report: %s", " ".join(str(err).split()))

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        """Write the final report; exit 1 naming the jobs of this sweep that stopped with an error."""
        written = write_report(config.hydra.sweep.dir)
        if written is None:
            print(f"sweep: no finished job under {config.hydra.sweep.dir}", file=sys.stderr)
        else:
            summary, figure = written
            print(f"sweep report: {summary}\n              {figure}")
            log_sweep_run(config)
        failed = failed_jobs(config.hydra.sweep.dir, since=getattr(self, "started", 0.0))
        if failed:
            print(
                f"sweep: {len(failed)} job(s) failed (the error is in each job's run.log): {', '.join(failed)}",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(1)


def failed_jobs(sweep_dir: str | Path, since: float = 0.0) -> list[str]:
    """The jobs below ``sweep_dir`` that left `runners.common.FAILED` at or after time ``since`` (this
    sweep's: a folder reused by a later sweep keeps an older failure's marker until its job reruns)."""
    sweep_dir = Path(sweep_dir)
    names = []
    for path in sorted(sweep_dir.rglob(FAILED)):
        if ".submitit" in path.parts or "wandb" in path.parts:
            continue
        try:
            if path.stat().st_mtime >= since - 1.0:  # 1 s of slack for file systems' coarse times
                names.append(_job_name(path, sweep_dir))
        except OSError:
            continue
    return names


def log_sweep_run(config: DictConfig) -> None:
    """With ``logger=wandb``: one sweep-level W&B run (`runners.wandb_logger.log_sweep`); warnings only."""
    try:
        from omegaconf import OmegaConf

        logger = config.get("logger")
        if logger is None or logger.get("_target_") != "runners.wandb_logger.WandbLogger":
            return
        from runners.common import sweep_group
        from runners.wandb_logger import log_sweep

        log_sweep(
            config.hydra.sweep.dir,
            OmegaConf.to_container(logger, resolve=True),
            sweep_group(config.hydra.sweep.dir),
        )
    except Exception as err:  # the sweep's results are written: W&B must not fail it
        log.warning("warning: no sweep-level W&B run: %s", " ".join(str(err).split()))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the notes on damaged jobs
    if len(argv) != 1:
        print("usage: python -m runners.sweep SWEEP_DIR", file=sys.stderr)
        return 2
    written = write_report(argv[0])
    if written is None:
        print(f"no metrics.json under {argv[0]}", file=sys.stderr)
        return 1
    print("\n".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
