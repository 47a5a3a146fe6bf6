"""Run an experiment: ``python run.py policy=lshe proj_dim=16 budget=0.3`` (Hydra; see conf/ and README.md).

One job = one runner (``runner=evaluate`` by default; ``runners/<runner.name>.py``, its ``main(cfg)``
returns the metrics). Sweeps: ``python run.py -m policy=lshe,h2o budget=0.1,0.3``; at the end
``summary.csv`` and ``score_vs_budget.png`` are written at the sweep root (`runners.sweep`).

A job whose output folder already holds a ``metrics.json`` for the same config is skipped
(``skip_done=false`` to rerun). Bad input (an unknown name, a value out of range, a typo'd key) stops
the job with one message naming the key, a non-zero exit code, and no results written.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("LSHE_ROOT", str(ROOT))  # outputs/ lands in the repo, whatever the working directory
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# conf/hydra/launcher/*.yaml keep the plugins' names, so Hydra checks them against the plugins' schemas
# (wanted) and warns that matching a schema by name is deprecated (it still works in Hydra 1.3).
warnings.filterwarnings("ignore", message="(?s).*is validated against ConfigStore schema with the same name")

from runners import common, results  # noqa: E402
from runners.common import ConfigError  # noqa: E402


def dispatch(cfg: DictConfig) -> dict:
    """Skip a finished job, else run ``runners.<cfg.runner.name>.main(cfg)``."""
    output_dir = common.output_dir()
    if cfg.get("skip_done", True):
        done = results.load_done(output_dir, results.config_hash(cfg))
        if done is not None:
            print(f"skip: {output_dir} already holds the results of this config (skip_done=false reruns it)")
            return done
    if (output_dir / results.METRICS).is_file():
        print(f"note: {output_dir} holds results of another config or an earlier run; they will be replaced")
    name = cfg.runner.get("name")
    choices = common.group_choices("runner")
    if name not in choices:
        raise ConfigError(f"runner.name must be one of {choices}, got {name!r}")
    runner = importlib.import_module(f"runners.{name}")
    return runner.main(cfg)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    try:
        return dispatch(cfg)
    except ConfigError as err:
        if common.is_multirun():  # let Hydra record the failed job and go on with the others
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
