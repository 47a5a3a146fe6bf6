"""Sweep report with intervals: csv columns, markdown cells, error bars and bars in the figure."""

from __future__ import annotations

import csv

import pytest

from runners import plots, results, sweep


def write_job(root, job, **metrics):
    results.save(root / job, {}, {"config_hash": "test", **metrics}, [])


def job_metrics(policy, budget, score, task="passkey", proj_dim=None):
    overrides = [f"task={task}", f"policy={policy}", f"budget={budget}"]
    if proj_dim is not None:
        overrides.append(f"proj_dim={proj_dim}")
    return dict(
        task=task,
        metric="accuracy",
        higher_is_better=True,
        model="tiny-llama",
        device="cpu",
        policy=policy,
        budget=budget,
        score=score,
        score_ci=[max(0.0, score - 0.2), min(1.0, score + 0.1)],
        score_full=0.9,
        score_full_ci=[0.6, 0.98],
        agreement_rouge_l=score,
        agreement_rouge_l_ci=[score - 0.05, score + 0.05],
        paired_vs_full={
            "test": "mcnemar_exact",
            "diff": score - 0.9,
            "diff_ci": [-0.5, 0.0],
            "p_value": 0.01,
        },
        intervals={"level": 0.95, "n_boot": 2000, "seed": 0},
        n_examples=10,
        overrides=overrides,
    )


def test_summary_has_interval_columns_and_cells(tmp_path):
    write_job(tmp_path, "a", **job_metrics("lshe", 0.30000000000000004, 0.5))
    write_job(tmp_path, "b", **job_metrics("lshe", 0.5, 0.7))
    write_job(tmp_path, "c", **job_metrics("knorm", 0.30000000000000004, 0.5))
    write_job(tmp_path, "d", **job_metrics("knorm", 0.5, 0.6))
    sweep.write_report(tmp_path)
    with open(tmp_path / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {
        "score_ci_low",
        "score_ci_high",
        "paired_p_value",
        "paired_test",
        "agreement_rouge_l_ci_low",
    } <= set(rows[0])
    lshe = next(r for r in rows if r["policy"] == "lshe" and r["budget"] == "0.3")
    assert float(lshe["score_ci_low"]) == pytest.approx(0.3) and float(
        lshe["score_ci_high"]
    ) == pytest.approx(0.6)
    assert lshe["paired_test"] == "mcnemar_exact" and float(lshe["paired_p_value"]) == pytest.approx(0.01)
    tables = (tmp_path / "summary.md").read_text()
    assert "| lshe | 0.5 [0.3, 0.6] * | 0.7 [0.5, 0.8] * | 0.9 [0.6, 0.98] |" in tables
    assert "| 0.3 | 0.5 |" in tables  # budgets rounded in the header
    assert (tmp_path / "agreement_vs_budget.png").is_file()


def test_budget_figure_draws_error_bars_offsets_and_the_full_cache_band():
    rows = []
    for policy in ("lshe", "knorm"):
        for budget in (0.3, 0.5):
            r = job_metrics(policy, budget, 0.5)  # a tie: same score everywhere
            r.update(sweep._interval_columns(r), label=policy)
            rows.append(r)
    fig = plots.budget_figure(rows)
    ax = fig.axes[0]
    containers = [c for c in ax.containers if c.__class__.__name__ == "ErrorbarContainer"]
    assert len(containers) == 2
    lines = {c.get_label(): c.lines[0] for c in containers}
    xs = {label: tuple(line.get_xdata()) for label, line in lines.items()}
    assert xs["lshe"] != xs["knorm"]  # tied points drawn side by side
    segments = containers[0].lines[2][0].get_segments()  # the vertical error bars
    assert [tuple(seg[:, 1]) for seg in segments] == [pytest.approx((0.3, 0.6))] * 2
    assert lines["lshe"].get_markerfacecolor() != "none" and lines["knorm"].get_markerfacecolor() == "none"
    assert any(p.__class__.__name__ == "Rectangle" or "Polygon" in p.__class__.__name__ for p in ax.patches)
    assert "tiny-llama" in ax.get_title() and "n=10" in ax.get_title() and "cpu" in ax.get_title()


def test_single_budget_is_drawn_as_bars_with_intervals():
    rows = []
    for policy in ("lshe", "knorm", "random"):
        r = job_metrics(policy, 0.3, 0.4)
        r.update(sweep._interval_columns(r), label=policy)
        rows.append(r)
    ax = plots.budget_figure(rows).axes[0]
    bars = [c for c in ax.containers if c.__class__.__name__ == "BarContainer"]
    assert len(bars) == 3 and all(b.errorbar is not None for b in bars)


def test_styles_are_fixed_and_distinct_and_labels_sort_numerically():
    names = list(plots.STYLES)
    assert len({plots.style(n) for n in names}) == len(names)
    assert {"angle", "dot", "lshe_norm"} <= set(names)
    labels = ["lshe, proj_dim=128", "lshe, proj_dim=16", "lshe, proj_dim=4", "angle", "full"]
    assert sorted(labels, key=plots.label_order) == [
        "full",
        "lshe, proj_dim=4",
        "lshe, proj_dim=16",
        "lshe, proj_dim=128",
        "angle",
    ]


def test_tidy_dirname_rounds_swept_floats():
    assert sweep.tidy_dirname("budget=0.30000000000000004,policy=lshe,proj_dim=16") == (
        "budget=0.3,policy=lshe,proj_dim=16"
    )
    assert sweep.tidy_dirname("") == ""
