"""scripts/readme_results.py renders a finished sweep into a docs/results folder with intervals."""

from __future__ import annotations

import sys
from pathlib import Path

from test_report_intervals import job_metrics, write_job

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import readme_results  # noqa: E402


def test_readme_results_writes_tables_figures_and_the_proj_dim_convergence(tmp_path):
    sweep_dir = tmp_path / "sweep"
    for budget in (0.3, 0.5):
        for proj_dim in (4, 16, 64):
            for policy in ("lshe", "lshe_norm"):
                metrics = job_metrics(policy, budget, 0.4, proj_dim=proj_dim)
                write_job(sweep_dir, f"{policy}-{proj_dim}-{budget}", proj_dim=proj_dim, **metrics)
        for policy in ("angle", "dot", "random", "full"):
            write_job(sweep_dir, f"{policy}-{budget}", proj_dim=16, **job_metrics(policy, budget, 0.6))
    out = tmp_path / "docs" / "run"
    assert readme_results.main([str(sweep_dir), "--out", str(out), "--command", "python run.py -m x"]) == 0
    for name in (
        "README.md",
        "summary.csv",
        "summary.md",
        "headline.md",
        "proj_dim.md",
        "proj_dim.png",
        "passkey.png",
    ):
        assert (out / name).is_file(), name
    proj = (out / "proj_dim.md").read_text()
    assert "| lshe | 0.4 [0.2, 0.5] * | 0.4 [0.2, 0.5] * | 0.4 [0.2, 0.5] * |" in proj
    assert "| angle (no hashing) |" in proj
    head = (out / "headline.md").read_text()
    assert "| dot | 0.6 [0.4, 0.7] * |" in head and "| *full cache* | 0.9 [0.6, 0.98] |" in head
    assert "python run.py -m x" in (out / "README.md").read_text()
