"""Hydra entry point: one cell, or with `-m` a sweep of cells (pipeline/sweep.py).

    python -m pipeline.run model=vanilla seq_len=2048          # one cell
    python -m pipeline.run -m grid=smoke                       # a sweep
    attnbench -m grid=cpu                                      # same, installed console script
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from pipeline.config import ConfigError, check_group_overrides, to_dict, validate


def _fail(msg: str) -> None:
    print(f"attnbench: error: {msg}", file=sys.stderr)
    sys.exit(2)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> str:
    # torch-free imports: run_cell validates before anything heavy; cuda_missing imports torch
    from pipeline.cell import run_cell
    from pipeline.devices import cuda_missing, wants_cuda
    from pipeline.sweep import sweep_info_for_job
    from pipeline.tracking import TrackingError

    d, sweep = to_dict(cfg), sweep_info_for_job()
    try:
        if sweep is None and wants_cuda(d):  # one cell from the command line: say so before any run is made
            validate(d)  # a bad field first: it is the clearer error
            why = cuda_missing()
            if why is not None:
                _fail(f"{why}: run it on a GPU machine")
        status = run_cell(d, sweep=sweep)
        if sweep is None:
            from pipeline import spool
            from pipeline.cell import spool_folder

            if spool.pending(spool_folder(None)):  # its record waits for make replay: not done yet
                sys.exit(spool.EXIT_WAITING)
        return status
    except (ConfigError, TrackingError) as e:
        _fail(str(e))
    return "error"


def main() -> None:
    from pipeline.tracking import TrackingError

    try:
        check_group_overrides(sys.argv[1:])
        _hydra_main()
    except (ConfigError, TrackingError) as e:  # raised by the sweeper before any cell runs
        _fail(str(e))


if __name__ == "__main__":
    main()
