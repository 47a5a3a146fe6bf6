"""Turn finished sweep folders into the README's results: tables with intervals and figures, one folder.

    python scripts/readme_results.py outputs/multirun/results_smollm2 --out docs/results/smollm2-135m \
        --command "python run.py -m experiment=results_passkey logger=none hydra/launcher=joblib" ...
    python scripts/readme_results.py outputs/multirun/proj_dim_convergence \
        --out docs/results/smollm2-135m-proj-dim --command "..."

Writes into ``--out`` (the project rule: docs hold the current numbers, one folder per reported run):

* ``README.md``: where the numbers come from (sweep folder, commit, model, device, examples, jobs,
  summed job wall time, the commands given with ``--command``) and every table;
* ``summary.csv`` / ``summary.md``: the sweep report (`runners.sweep`), every job with its intervals;
* ``headline.md``: one table per budget in ``--headline-budgets``: policy x task, each cell the score
  and its 95% interval, ``*`` where it differs from the full cache (p < 0.05);
* ``<task>[-<protocol>].png``: score against budget per task (and prompt protocol), with intervals;
  ``<task>-agreement.png``: ROUGE-L against the full-cache output, for generation tasks;
* ``proj_dim.png`` / ``proj_dim.md``: when LSH-E was run at several ``proj_dim``: score against
  proj_dim per budget, the exact limits (angle, dot), random and the full cache as horizontal lines;
* ``niah-<policy>-<budget>.png``: the jobs' NIAH heatmaps (beside the full cache's) at ``--heatmap-budget``.

Only jobs whose results verify are used (`runners.sweep.collect`). Nothing is computed here that the
jobs did not record: the numbers are the jobs' metrics.json values.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from runners import plots, sweep  # noqa: E402
from runners.results import atomic_write_text  # noqa: E402

HASHING = ("lshe", "lshe_key", "lshe_norm")


def headline(rows: list[dict], budget: float) -> str:
    """Policy x task at one budget: score [95% interval], * where p < 0.05 against the full cache."""
    here = [r for r in rows if math.isclose(plots.number(r["budget"]), budget)]
    if not here:
        return ""
    columns = sorted({(str(r["task"]), str(r.get("protocol") or "joint")) for r in here})
    labels = sorted({str(r["label"]).split(",")[0] for r in here}, key=plots.label_order)
    names = [f"{t} ({p})" if any(q != "joint" for tt, q in columns if tt == t) else t for t, p in columns]
    lines = [
        f"Budget {budget:g}: score [95% interval]; * = differs from the full cache on the same examples "
        "(p < 0.05: exact McNemar for accuracy, paired bootstrap otherwise); perplexity: lower is better.\n",
        "| policy | " + " | ".join(names) + " |",
        "| --- |" + " ---: |" * len(columns),
    ]
    for label in labels:
        cells = []
        for task, protocol in columns:
            found = [
                r
                for r in here
                if str(r["task"]) == task
                and str(r.get("protocol") or "joint") == protocol
                and str(r["label"]).split(",")[0] == label
                and (
                    label not in HASHING or "proj_dim=" not in str(r["label"]) or r["proj_dim"] in (16, "16")
                )
            ]
            cells.append(sweep._cell_ci(found[0], "score") if found else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    full = []
    for task, protocol in columns:
        mine = [r for r in here if str(r["task"]) == task and str(r.get("protocol") or "joint") == protocol]
        full.append(sweep._full_cell(mine))
    lines.append("| *full cache* | " + " | ".join(full) + " |")
    return "\n".join(lines) + "\n"


def task_figures(rows: list[dict], out: Path) -> list[Path]:
    """One score figure per (task, protocol), and one agreement figure per generation task."""
    written = []
    groups = sorted({(str(r["task"]), str(r.get("protocol") or "joint")) for r in rows})
    for task, protocol in groups:
        mine = [r for r in rows if str(r["task"]) == task and str(r.get("protocol") or "joint") == protocol]
        several = len({p for t, p in groups if t == task}) > 1
        name = f"{task}-{protocol}" if several else task
        fig = plots.budget_figure([_without(r, "cache.protocol") for r in mine])
        if several:
            fig.axes[0].set_title(fig.axes[0].get_title() + f" ({protocol} protocol)", fontsize=10)
        written.append(plots.save(fig, out / f"{name}.png", dpi=150))
        if any(isinstance(r.get("agreement_rouge_l"), (int, float)) for r in mine):
            fig = plots.budget_figure([_without(r, "cache.protocol") for r in mine], key="agreement_rouge_l")
            written.append(plots.save(fig, out / f"{name}-agreement.png", dpi=150))
    return written


def _without(row: dict, key: str) -> dict:
    parts = [p.strip() for p in str(row["label"]).split(",") if not p.strip().startswith(f"{key}=")]
    return {**row, "label": ", ".join(parts)}


def proj_dim_results(rows: list[dict], out: Path) -> tuple[str, Path | None]:
    """Score against proj_dim for the hashing policies, per task and budget, with the exact limits."""
    hashed = [r for r in rows if r["policy"] in HASHING and "proj_dim=" in str(r["label"])]
    if len({r["proj_dim"] for r in hashed}) < 2:
        return "", None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = sorted({(str(r["task"]), plots.number(r["budget"])) for r in hashed})
    fig = Figure(figsize=(5.8 * len(panels), 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    tables = []
    for ax, (task, budget) in zip(axes, panels, strict=True):
        here = [r for r in rows if str(r["task"]) == task and math.isclose(plots.number(r["budget"]), budget)]
        dims = sorted({int(r["proj_dim"]) for r in hashed if r in here})
        table = [f"**{task}, budget {budget:g}**: score [95% interval] by proj_dim\n"]
        table.append("| policy | " + " | ".join(str(d) for d in dims) + " |")
        table.append("| --- |" + " ---: |" * len(dims))
        for i, policy in enumerate(p for p in HASHING if any(r["policy"] == p for r in here)):
            mine = sorted((r for r in here if r["policy"] == policy), key=lambda r: int(r["proj_dim"]))
            xs = [int(r["proj_dim"]) * (1 + 0.03 * (i - 1)) for r in mine]
            ax.errorbar(xs, [r["score"] for r in mine], yerr=plots._err(mine, "score"), capsize=2.5,
                        label=policy, **plots.line_style(policy))  # fmt: skip
            by_dim = {int(r["proj_dim"]): r for r in mine}
            table.append(
                f"| {policy} | " + " | ".join(sweep._cell_ci(by_dim.get(d), "score") for d in dims) + " |"
            )
        for policy in ("angle", "dot", "random", "full"):
            found = [r for r in here if r["policy"] == policy]
            if not found:
                continue
            r = found[0]
            kw = plots.line_style(policy)
            ax.axhline(r["score"], color=kw["color"], linestyle=":" if policy != "full" else "--", linewidth=1.4,
                       label=f"{policy} {sweep._cell(r['score'])}")  # fmt: skip
            low, high = r.get("score_ci_low"), r.get("score_ci_high")
            if isinstance(low, (int, float)) and isinstance(high, (int, float)):
                ax.axhspan(low, high, color=kw["color"], alpha=0.08, linewidth=0)
            table.append(
                f"| {policy} (no hashing) | " + " | ".join([sweep._cell_ci(r, "score")] * len(dims)) + " |"
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(dims, [str(d) for d in dims])
        ax.set_xlabel("proj_dim (hash bits per key and KV head)")
        ax.set_ylabel(str(here[0].get("metric") or "score"))
        ax.set_title(plots.title(here, f"budget {budget:g}"), fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        tables.append("\n".join(table) + "\n")
    return "\n".join(tables), plots.save(fig, out / "proj_dim.png", dpi=150)


def niah_heatmaps(rows: list[dict], sweep_dir: Path, out: Path, budget: float) -> list[Path]:
    written = []
    for r in rows:
        if str(r["task"]) != "niah" or not math.isclose(plots.number(r["budget"]), budget):
            continue
        source = sweep_dir / r["job"] / "niah_heatmap.png"
        if source.is_file():
            target = out / f"niah-{r['policy']}-{budget:g}.png"
            shutil.copyfile(source, target)
            written.append(target)
    return written


def provenance(rows: list[dict], sweep_dirs: list[Path], commands: list[str]) -> str:
    def values(key: str) -> str:
        return ", ".join(sorted({str(r.get(key)) for r in rows if r.get(key) not in (None, "")})) or "?"

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    wall = sum(plots.number(r.get("wall_s")) for r in rows if not math.isnan(plots.number(r.get("wall_s"))))
    lines = [
        f"- sweep folders: {', '.join(str(d) for d in sweep_dirs)}",
        f"- commit (when rendered): {commit}",
        f"- model: {values('model')}; device: {values('device')}; tasks: {values('task')}",
        f"- examples per job: {values('n_examples')}; jobs: {len(rows)}; summed job wall time: {wall / 60:.1f} min",
        "- intervals: 95%, Wilson for accuracy, percentile bootstrap (2000 resamples, seed = the job's "
        "seed) for perplexity, ROUGE-L and string_match_all; paired test against the full cache on the "
        "same examples: exact McNemar (accuracy), paired bootstrap (the rest)",
    ]
    if commands:
        lines.append("- commands:\n" + "\n".join(f"  - `{c}`" for c in commands))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dirs", nargs="+", type=Path, help="finished sweep folders (one report)")
    parser.add_argument("--out", type=Path, required=True, help="e.g. docs/results/smollm2-135m")
    parser.add_argument("--title", default="Results", help="heading of the folder's README.md")
    parser.add_argument("--command", action="append", default=[], help="a command that made the sweep")
    parser.add_argument("--headline-budgets", default="0.1,0.3,0.5", help="budgets of headline.md")
    parser.add_argument(
        "--heatmap-budget", type=float, default=0.3, help="budget of the NIAH heatmaps copied"
    )
    args = parser.parse_args(argv)

    rows = []
    for folder in args.sweep_dirs:
        found = sweep.collect(folder)
        for r in found:
            r["job"] = str(Path(folder) / r["job"]) if len(args.sweep_dirs) > 1 else r["job"]
        rows += found
    if not rows:
        print(f"no finished job under {', '.join(map(str, args.sweep_dirs))}", file=sys.stderr)
        return 1
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    sweep.write_summary(rows, out / sweep.SUMMARY)
    tables = sweep.markdown(rows)
    atomic_write_text(out / sweep.TABLES, tables)
    budgets = [float(b) for b in args.headline_budgets.split(",") if b.strip()]
    head = "\n".join(filter(None, (headline(rows, b) for b in budgets)))
    atomic_write_text(out / "headline.md", head)
    figures = task_figures(rows, out)
    proj_table, proj_figure = proj_dim_results(rows, out)
    if proj_table:
        atomic_write_text(out / "proj_dim.md", proj_table)
        figures.append(proj_figure)
    base = args.sweep_dirs[0] if len(args.sweep_dirs) == 1 else Path("/")
    figures += niah_heatmaps(rows, base, out, args.heatmap_budget)
    readme = [f"# {args.title}\n", provenance(rows, args.sweep_dirs, args.command)]
    if head:
        readme += ["## Headline\n", head]
    if proj_table:
        readme += [
            "## LSH-E against its exact limits, by proj_dim\n",
            proj_table,
            "![proj_dim](proj_dim.png)\n",
        ]
    readme += ["## Figures\n", *[f"![{p.stem}]({p.name})\n" for p in figures if p and p.suffix == ".png"]]
    readme += ["## Every job\n", tables]
    atomic_write_text(out / "README.md", "\n".join(readme))
    print(json.dumps({"out": str(out), "jobs": len(rows), "figures": [p.name for p in figures if p]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
