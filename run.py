"""Run an experiment: ``python run.py policy=lshe proj_dim=16 budget=0.3`` (Hydra; see conf/ and README.md).

One job = one runner, built from ``conf/runner/<name>.yaml`` by ``_target_`` (``runner=evaluate`` by
default) and called with the config; it returns the metrics. Sweeps: ``python run.py -m policy=lshe,h2o
budget=0.1,0.3``; ``summary.csv``, ``summary.md`` and ``score_vs_budget.png`` are written at the sweep
root (`runners.sweep`).

Before anything heavy is imported the config is checked (`runners.config`: types when Hydra composes,
ranges in `validate`), then the job's lock is taken (two processes never compute one job) and a job
whose folder holds verified results of the same config is skipped (``skip_done=false`` reruns it).
Bad input (an unknown name, a value out of range, a typo'd key) and faults (disk full, read-only
output, an asset that cannot be fetched) stop the job with one line, in the console and in the job's
``run.log``, and a non-zero exit code; no half-written results are left behind. In a sweep such a job
leaves ``failed.json`` in its folder, the other jobs run, and the sweep ends with exit code 1 and one
line naming the failed jobs (`runners.sweep.SweepReport`).
"""

from __future__ import annotations

import logging
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

from lshe.assets import AssetError  # noqa: E402  (stdlib only: no torch)
from runners import results  # noqa: E402
from runners.config import ConfigError, validate  # noqa: E402  (registers the config schemas)

log = logging.getLogger("lshe")


def dispatch(cfg: DictConfig) -> dict:
    """Check the config, then, under the job's lock, skip a finished job or run its runner."""
    from runners import common, components

    validate(cfg)
    output_dir = common.output_dir()
    with results.job_lock(output_dir):
        if cfg.skip_done:
            done = results.load_done(output_dir, results.config_hash(cfg))
            if done is not None:
                log.info(
                    "skip: %s already holds the results of this config (skip_done=false reruns it)",
                    output_dir,
                )
                return done
        elif (output_dir / results.METRICS).is_file():
            log.info("note: skip_done=false: the results in %s will be replaced", output_dir)
        runner = components.build("runner", cfg.runner)
        try:
            return runner(cfg)
        finally:
            common.release()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict | None:
    from runners import common

    try:
        common.clear_failed()
        return dispatch(cfg)
    except (ConfigError, results.ResultsError, AssetError) as err:  # the user's input or the machine's state
        log.error("error: %s", err)
        if common.is_multirun():  # the other jobs go on; the sweep exits 1 at its end (SweepReport)
            common.mark_failed(err)
            return None
        logging.shutdown()
        sys.exit(2 if isinstance(err, ConfigError) else 1)


if __name__ == "__main__":
    main()
