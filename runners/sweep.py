"""Sweep reports: ``summary.csv``, ``summary.md`` and ``score_vs_budget.png`` at a sweep's root.

`SweepReport` is a Hydra callback (``hydra.callbacks`` in conf/config.yaml): after every job of a
multirun it refreshes the report, so an interrupted or partly failed sweep still has one, and it
writes the final one when the sweep ends. The report is built from the ``metrics.json`` files found
under the sweep folder, so it also covers jobs skipped because they had finished before. Only jobs
whose results verify (`runners.results.check_job`: metrics.json checksum and the sha256 of every file
of the job) are reported; a damaged one is left out with a one-line note on the ``lshe`` logger.
Swept numbers are shown rounded to 12 significant digits (``budget=0.30000000000000004`` as 0.3).
By hand: ``python -m runners.sweep outputs/multirun/<date>/<time>``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from runners.results import (
    METRICS,
    atomic_write_bytes,
    atomic_write_text,
    check_job,
    clean_temp_files,
    file_lock,
)

log = logging.getLogger("lshe")

SUMMARY = "summary.csv"
TABLES = "summary.md"
PLOT = "score_vs_budget.png"

COLUMNS = [
    "job",
    "task",
    "metric",
    "higher_is_better",
    "model",
    "policy",
    "budget",
    "proj_dim",
    "seed",
    "score",
    "score_full",
    "agreement_exact_match",
    "agreement_rouge_l",
    "kv_slots",
    "kv_cache_bytes",
    "kv_cache_bytes_full",
    "kv_cache_fraction",
    "prefill_s",
    "decode_tokens_per_s",
    "peak_memory_bytes",
    "n_examples",
    "wall_s",
    "label",
]
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
    varying = sorted({k for s in settings for k in s if len({str(t.get(k)) for t in settings}) > 1})
    rows = []
    for (path, metrics), setting in zip(found, settings, strict=True):
        row = {key: metrics.get(key) for key in COLUMNS}
        row["job"] = _job_name(path, sweep_dir)
        row["budget"] = _tidy(row["budget"])
        extra = [f"{k}={setting[k]}" for k in varying if k in setting]
        row["label"] = ", ".join([str(metrics.get("policy")), *extra])
        rows.append(row)
    rows.sort(key=lambda r: (str(r["task"]), str(r["label"]), _number(r["budget"])))
    return rows


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
    if not isinstance(value, (int, float)):
        return ""
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def markdown(rows: list[dict]) -> str:
    """Score tables, one per task: a line per policy (and varied setting), a column per budget,
    the full-cache score of the same examples last. Generation tasks get a second table: ROUGE-L
    of each output against the full-cache output."""
    parts = []
    for task in sorted({str(r["task"]) for r in rows}):
        task_rows = [r for r in rows if str(r["task"]) == task]
        budgets = sorted({_number(r["budget"]) for r in task_rows})
        first = task_rows[0]
        full = [r["score_full"] for r in task_rows if isinstance(r.get("score_full"), (int, float))]
        full_cell = _cell(sum(full) / len(full)) if full else ""
        direction = "higher is better" if first.get("higher_is_better") is not False else "lower is better"
        n = sorted({r.get("n_examples") for r in task_rows}, key=str)
        tables = [("score", f"{first.get('metric')}, {direction}")]
        if any(isinstance(r.get("agreement_rouge_l"), (int, float)) for r in task_rows):
            tables.append(("agreement_rouge_l", "ROUGE-L of each output against the full-cache output"))
        for key, what in tables:
            parts.append(f"**{task}** ({first.get('model')}, {', '.join(map(str, n))} examples): {what}\n")
            parts.append("| policy | " + " | ".join(_header(b) for b in budgets) + " | full cache |")
            parts.append("| --- |" + " ---: |" * (len(budgets) + 1))
            for label in sorted({r["label"] for r in task_rows}):
                by_budget = {_number(r["budget"]): r.get(key) for r in task_rows if r["label"] == label}
                cells = [_cell(by_budget.get(b)) for b in budgets]
                parts.append(
                    f"| {label} | " + " | ".join(cells) + f" | {full_cell if key == 'score' else '1'} |"
                )
            parts.append("")
    return "\n".join(parts)


def plot(rows: list[dict], path: Path) -> Path:
    """Score against budget, one panel per task, one line per policy (and varied setting); PNG.

    The full-cache score of each task is drawn as a dashed horizontal line.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = sorted({str(r["task"]) for r in rows})
    fig = Figure(figsize=(5.5 * len(tasks), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks, strict=True):
        task_rows = [r for r in rows if str(r["task"]) == task]
        full = [r["score_full"] for r in task_rows if isinstance(r.get("score_full"), (int, float))]
        if full:
            ax.axhline(sum(full) / len(full), color="black", linestyle="--", linewidth=1, label="full cache")
        for label in sorted({r["label"] for r in task_rows}):
            points = sorted(
                (_number(r["budget"]), r["score"])
                for r in task_rows
                if r["label"] == label and isinstance(r["score"], (int, float))
            )
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=label)
        metric = task_rows[0].get("metric") or "score"
        higher = task_rows[0].get("higher_is_better") is not False
        values = [r["score"] for r in task_rows if isinstance(r["score"], (int, float))] + full
        if higher and values and all(0.0 <= v <= 1.0 for v in values):
            ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{task} ({task_rows[0].get('model')})")
        ax.set_xlabel("budget (fraction of the cache kept)")
        ax.set_ylabel(metric if higher else f"{metric} (lower is better)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return atomic_write_bytes(path, buffer.getvalue())


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

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        written = write_report(config.hydra.sweep.dir)
        if written is None:
            print(f"sweep: no finished job under {config.hydra.sweep.dir}", file=sys.stderr)
        else:
            summary, figure = written
            print(f"sweep report: {summary}\n              {figure}")


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
