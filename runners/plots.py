"""Figures: one fixed colour and marker per policy across every plot, so a policy reads the same everywhere.

The one home of figure styles. LSH-E and its variants are drawn in warm colours with solid markers
and thicker lines; the exact limits (angle, dot) dashed in darker shades of them; baselines in cool
colours with hollow markers. Ties stay visible: each line is shifted by a small horizontal offset of
its own, and hollow markers let a marker underneath show through. Every score is drawn with its 95%
interval (error bars; the full cache as a dashed line with a grey band), and titles carry model,
task, number of examples and device. A task measured at a single budget is drawn as bars.
"""

from __future__ import annotations

import math
from pathlib import Path

# LSH-E variants in warm, saturated colours so they stand out; baselines in cooler ones.
STYLES: dict[str, tuple[str, str]] = {
    "full": ("black", "s"),
    "lshe": ("#d62728", "o"),
    "lshe_key": ("#ff7f0e", "D"),
    "lshe_norm": ("#e377c2", "p"),
    "angle": ("#8c1c13", "<"),
    "dot": ("#8c564b", ">"),
    "h2o": ("#1f77b4", "^"),
    "tova": ("#17becf", "v"),
    "knorm": ("#2ca02c", "P"),
    "streaming": ("#9467bd", "X"),
    "random": ("#7f7f7f", "*"),
}
LSHE_FAMILY = ("lshe", "lshe_key", "lshe_norm")  # solid markers, thick lines
EXACT_LIMITS = ("angle", "dot")  # dashed: references, not methods
_OTHERS = ("#bcbd22", "#393b79", "#637939", "#843c39", "#5254a3", "#6b6ecf")


def style(policy: str) -> tuple[str, str]:
    """(colour, marker) of a policy: fixed for the built-ins, stable per name for any other."""
    if policy in STYLES:
        return STYLES[policy]
    index = sum(policy.encode()) % len(_OTHERS)
    return _OTHERS[index], "h"


def line_style(policy: str) -> dict:
    """Matplotlib keyword arguments of a policy's line: colour, marker, fill, width, dashes."""
    color, marker = style(policy)
    lshe = policy in LSHE_FAMILY or policy.startswith("lshe")
    return {
        "color": color,
        "marker": marker,
        "markerfacecolor": color if lshe or policy == "full" else "none",
        "markeredgecolor": color,
        "markersize": 7 if lshe else 6,
        "linewidth": 2.2 if lshe else 1.3,
        "linestyle": "--" if policy in EXACT_LIMITS else "-",
        "zorder": 3 if lshe else 2,
    }


def _policy_of(label: str) -> str:
    return str(label).split(",")[0].strip()


def number(value) -> float:
    """A table cell as a float (NaN where it is none)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def save(fig, path: Path, dpi: int = 130) -> Path:
    """Write ``fig`` as a PNG at ``path`` all or nothing (`runners.results.atomic_write_bytes`) and close
    it, so that a long sweep, which redraws its report after every job, does not pile up figures."""
    import io

    import matplotlib.pyplot as plt

    from runners.results import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def _err(rows: list[dict], key: str) -> list[list[float]] | None:
    """(2, n) error bar lengths below/above each row's value, None when no row has an interval."""
    lows, highs, any_ci = [], [], False
    for row in rows:
        value, low, high = row.get(key), row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
        if isinstance(low, (int, float)) and isinstance(high, (int, float)):
            lows.append(max(0.0, value - low))
            highs.append(max(0.0, high - value))
            any_ci = True
        else:
            lows.append(0.0)
            highs.append(0.0)
    return [lows, highs] if any_ci else None


def title(task_rows: list[dict], what: str = "") -> str:
    """``task: what`` on one line, then model, n examples, device (every value that occurs)."""

    def values(key: str) -> str:
        found = sorted({str(r.get(key)) for r in task_rows if r.get(key) not in (None, "")})
        return "/".join(found) if found else "?"

    head = f"{values('task')}{': ' + what if what else ''}"
    return f"{head}\n{values('model')}, n={values('n_examples')}, {values('device')}"


KEY_NAMES = {"score": None, "agreement_rouge_l": "ROUGE-L vs full-cache output"}


def budget_figure(rows: list[dict], key: str = "score"):
    """Score (or ``key``) against budget: one panel per task, one line per label (policy and varied
    setting) with its interval; a task measured at one budget only is drawn as bars. Returns a Figure
    (Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = sorted({str(r["task"]) for r in rows})
    fig = Figure(figsize=(6.0 * len(tasks), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks, strict=True):
        task_rows = [r for r in rows if str(r["task"]) == task]
        draw_panel(ax, task_rows, key)
    return fig


def draw_panel(ax, task_rows: list[dict], key: str = "score") -> None:
    """One task's panel: lines (several budgets) or bars (one budget), the full cache as a band."""
    metric = task_rows[0].get("metric") or "score"
    higher = task_rows[0].get("higher_is_better") is not False
    labels = sorted({r["label"] for r in task_rows}, key=label_order)
    budgets = sorted({number(r["budget"]) for r in task_rows})
    if key == "score":
        full = [r for r in task_rows if isinstance(r.get("score_full"), (int, float))]
        if full:
            value = sum(r["score_full"] for r in full) / len(full)
            ax.axhline(value, color="black", linestyle="--", linewidth=1, label="full cache", zorder=1)
            low, high = full[0].get("score_full_ci_low"), full[0].get("score_full_ci_high")
            if isinstance(low, (int, float)) and isinstance(high, (int, float)):
                ax.axhspan(low, high, color="grey", alpha=0.15, linewidth=0, zorder=0)
    if len(budgets) == 1:
        _bars(ax, task_rows, labels, key)
    else:
        span = (budgets[-1] - budgets[0]) or 1.0
        step = 0.012 * span
        for i, label in enumerate(labels):
            mine = sorted(
                (r for r in task_rows if r["label"] == label and isinstance(r.get(key), (int, float))),
                key=lambda r: number(r["budget"]),
            )
            if not mine:
                continue
            offset = (i - (len(labels) - 1) / 2) * step
            xs = [number(r["budget"]) + offset for r in mine]
            kwargs = line_style(_policy_of(label))
            variant = _variant_index(label, labels)
            variants = sum(_policy_of(lb) == _policy_of(label) for lb in labels)
            if variants > 1:  # e.g. proj_dim 4..128: one shade per value, light to dark
                shade = _shade(kwargs["color"], 0.65 * (1 - variant / (variants - 1)))
                kwargs.update(color=shade, markeredgecolor=shade)
                if kwargs["markerfacecolor"] != "none":
                    kwargs["markerfacecolor"] = shade
            ax.errorbar(
                xs,
                [r[key] for r in mine],
                yerr=_err(mine, key),
                capsize=2.5,
                elinewidth=0.9,
                label=label,
                **kwargs,
            )
        ax.set_xlabel("budget (fraction of prompt + new tokens kept)")
        ax.set_xticks(budgets)
    what = KEY_NAMES.get(key) or metric
    values = [r[key] for r in task_rows if isinstance(r.get(key), (int, float))]
    if higher and values and all(0.0 <= v <= 1.0 for v in values):
        ax.set_ylim(-0.05, 1.08)
    ax.set_title(title(task_rows, what), fontsize=10)
    ax.set_ylabel(what if higher or key != "score" else f"{what} (lower is better)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(labels) > 6 else 1)


def _bars(ax, task_rows: list[dict], labels: list[str], key: str) -> None:
    """One bar per label with its interval (a single budget was measured)."""
    for i, label in enumerate(labels):
        mine = [r for r in task_rows if r["label"] == label and isinstance(r.get(key), (int, float))]
        if not mine:
            continue
        kw = line_style(_policy_of(label))
        ax.bar(
            i,
            mine[0][key],
            yerr=_err(mine[:1], key),
            color=kw["color"],
            alpha=0.85 if kw["markerfacecolor"] != "none" else 0.45,
            edgecolor=kw["color"],
            capsize=3,
            label=label,
        )
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=7)
    ax.set_xlabel(f"budget {number(task_rows[0]['budget']):g}")


def _order(policy: str) -> int:
    order = [
        "full",
        "lshe",
        "lshe_norm",
        "lshe_key",
        "angle",
        "dot",
        "h2o",
        "tova",
        "knorm",
        "streaming",
        "random",
    ]
    return order.index(policy) if policy in order else len(order)


def label_order(label: str) -> tuple:
    """Sort key of a line label: policies in a fixed order, then numbers by value (proj_dim=4 < 16)."""
    import re

    parts = tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(label)))
    return (_order(_policy_of(label)), tuple((isinstance(t, int), t) for t in parts))


def _shade(color: str, towards_white: float) -> tuple:
    """``color`` mixed with white by ``towards_white`` in [0, 1]."""
    from matplotlib.colors import to_rgb

    return tuple(c + (1.0 - c) * towards_white for c in to_rgb(color))


def _variant_index(label: str, labels: list[str]) -> int:
    """0 for the first label of its policy, 1, 2, ... for its other variants (e.g. proj_dim values)."""
    policy = _policy_of(label)
    same = [lb for lb in labels if _policy_of(lb) == policy]
    return same.index(label)


def bench_plot(rows: list[dict], path: Path) -> None:
    """Decode tokens/s against budget, one panel per (context, batch); each policy beside its own control
    (dotted, same colour); the full cache as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["context"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (context, batch) in zip(axes[0], panels, strict=True):
        here = [r for r in rows if (r["context"], r["batch"]) == (context, batch)]
        for policy in sorted({r["policy"] for r in here if r["paired_with"] is None}):
            mine = sorted(
                (r["budget"], r["tokens_per_s"])
                for r in here
                if r["policy"] == policy and r["paired_with"] is None
            )
            ctrl = sorted((r["budget"], r["tokens_per_s"]) for r in here if r["paired_with"] == policy)
            color, marker = style(policy)
            if len(mine) == 1 and not ctrl:
                ax.axhline(mine[0][1], color=color, linestyle="--", label=policy)
                continue
            ax.plot(*zip(*mine, strict=True), marker=marker, color=color, label=policy)
            if ctrl:
                ax.plot(
                    *zip(*ctrl, strict=True),
                    marker="x",
                    linestyle=":",
                    color=color,
                    label=f"{policy} control",
                )
        ax.set_title(f"context {context}, batch {batch}")
        ax.set_xlabel("budget (fraction kept)")
        ax.set_ylabel("decode tokens/s")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save(fig, path, dpi=120)
