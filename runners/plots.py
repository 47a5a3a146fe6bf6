"""Figures: one fixed colour and marker per policy across every plot, so a policy reads the same everywhere."""

from __future__ import annotations

from pathlib import Path

# LSH-E variants in warm, saturated colours so they stand out; baselines in cooler ones.
STYLES: dict[str, tuple[str, str]] = {
    "full": ("black", "s"),
    "lshe": ("#d62728", "o"),
    "lshe_key": ("#ff7f0e", "D"),
    "h2o": ("#1f77b4", "^"),
    "tova": ("#17becf", "v"),
    "knorm": ("#2ca02c", "P"),
    "streaming": ("#9467bd", "X"),
    "random": ("#7f7f7f", "*"),
}
_OTHERS = ("#8c564b", "#e377c2", "#bcbd22", "#393b79", "#637939", "#843c39")


def style(policy: str) -> tuple[str, str]:
    """(colour, marker) of a policy: fixed for the built-ins, stable per name for any other."""
    if policy in STYLES:
        return STYLES[policy]
    index = sum(policy.encode()) % len(_OTHERS)
    return _OTHERS[index], "h"


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
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
