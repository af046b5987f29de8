"""Run quality scenarios directly (no MLflow, no child process) and print their figures: for
choosing task budgets and checking that the tasks separate the variants.

    .venv/bin/python scripts/quality_probe.py --task mqar --scenario full --seq-len 64 128 \
        --models vanilla longformer --threads 2 -o model.window=16
    .venv/bin/python scripts/quality_probe.py --task code_lm --scenario train --seq-len 128

`-o` takes Hydra overrides (applied to every cell); `--models all` runs every variant in
conf/model/. Each cell runs in this process, seeded, with the thread count given.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from hydra import compose, initialize_config_dir

from pipeline.registry import CONF_DIR, discover_variants
from pipeline.scenarios.base import CellResult, Diverged
from pipeline.scenarios.quality import run_full, run_infer, run_train

SCENARIOS = {"train": run_train, "infer": run_infer, "full": run_full}
SHOW = ("val/acc", "val/loss", "val/bpc", "val/bpc_unigram", "quality/rel_err_vs_exact",
        "quality/rel_err_uniform_mean", "quality/attn_eff_keys", "train/step_ms", "train/tokens_per_s",
        "train/peak_mem_mb", "train/fit_s", "val/wall_s", "infer/latency_ms", "infer/tokens_per_s")


def run_one(model: str, seq_len: int, args) -> dict:
    overrides = [f"model={model}", f"task={args.task}", f"scenario={args.scenario}", f"seq_len={seq_len}",
                 f"seed={args.seed}", *args.override]
    # model-relative overrides such as model.window only exist for variants that have the key
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        base = compose("config", overrides=[f"model={model}"])
        usable = [o for o in overrides if not o.startswith("model.") or o.split("=")[0][6:] in base.model]
        cfg = compose("config", overrides=usable)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    result = CellResult()
    t0 = time.perf_counter()
    try:
        SCENARIOS[args.scenario](cfg, torch.device("cpu"), result)
    except Diverged as e:
        result.status, result.failure_reason = "diverged", str(e)
    except Exception as e:  # noqa: BLE001 - a probe reports every failure and goes on
        result.status, result.failure_reason = "error", f"{type(e).__name__}: {e}"
    wall = time.perf_counter() - t0
    row = {"model": model, "seq_len": seq_len, "status": result.status, "wall_s": round(wall, 1),
           "backend": result.tags.get("backend", "")}
    row.update({k: round(v, 4) for k, v in result.metrics.items() if k in SHOW})
    if result.failure_reason:
        row["reason"] = result.failure_reason
    if result.tags.get("quality_note"):
        row["note"] = result.tags["quality_note"]
    loss = result.series.get("train/loss")
    if loss:
        # the loss at a few points of the run: where the phase transition happened
        row["loss_at"] = {i: round(loss[i], 3) for i in range(0, len(loss), max(1, len(loss) // 6))}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="mqar")
    p.add_argument("--scenario", default="full", choices=sorted(SCENARIOS))
    p.add_argument("--models", nargs="+", default=["all"])
    p.add_argument("--seq-len", nargs="+", type=int, default=[64, 128])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--override", action="append", default=[], help="Hydra override, repeatable")
    args = p.parse_args()
    models = discover_variants() if args.models == ["all"] else args.models
    for n in args.seq_len:
        for model in models:
            print(json.dumps(run_one(model, n, args)), flush=True)


if __name__ == "__main__":
    main()
