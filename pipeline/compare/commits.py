"""Two commits measured interleaved, then compared: the grid's cells at a base ref (in a git
worktree) and at the working tree, cell by cell, alternating which side goes first (A B, B A, …)
so that a drift of the machine falls on both sides alike; then `pipeline.compare` on the two.

    python -m pipeline.compare.commits --base REF [--grid compare] [--rounds 1] [overrides …]
    make compare-commits BASE=<ref> [GRID=compare] [ARGS=…]

Each side's cells go to an experiment of its own, `compare-<commit>` (`-dirty` for a working
tree with local changes), in the project's store (or MLFLOW_TRACKING_URI). Cells already there
are reused (each cell is `python -m pipeline.run <cell>`, which skips a finished one), except on a
dirty tree, whose code may have changed since. Every cell pays its own interpreter start (about
5-10 s here): keep the grid small; the default `grid=compare` has 12 kernel cells. The exit
status is the comparison's (pipeline/compare/cli.py); 2 when the ref or the grid is bad.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.config import CONF_DIR

REPO = CONF_DIR.parent


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def resolve(ref: str) -> str:
    try:
        return git("rev-parse", "--verify", f"{ref}^{{commit}}")
    except subprocess.CalledProcessError as e:
        raise ValueError(f"not a commit: {ref!r} ({e.stderr.strip()})") from None


def worktree(sha: str) -> Path:
    """A detached worktree of the commit under .worktrees/ (made once, reused)."""
    path = REPO / ".worktrees" / sha[:12]
    if not (path / ".git").exists():
        path.parent.mkdir(exist_ok=True)
        git("worktree", "add", "--detach", "--force", str(path), sha)
    return path


def share_grid(root: Path, grid: str) -> None:
    """The base measures the same cells as the working tree: its worktree gets this grid's file
    (a config, not code) where it lacks it or has another version."""
    src, dst = REPO / "conf" / "grid" / f"{grid}.yaml", root / "conf" / "grid" / f"{grid}.yaml"
    if src.exists() and (not dst.exists() or dst.read_bytes() != src.read_bytes()):
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
        print(f"compare-commits: the base worktree measures conf/grid/{grid}.yaml as the working tree has it")


def cells(grid: str, overrides: Sequence[str]) -> list[list[str]]:
    """The grid's cells as the sweeper expands them (at the working tree's code)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from pipeline.config import compose
    from pipeline.sweep import expand_grids

    cfg = compose([f"grid={grid}"], return_hydra_config=True)  # the grid's cells; overrides may sweep
    grids = [dict(g) for g in (cfg.hydra.sweeper.get("grids") or [])]
    return expand_grids(OverridesParser.create(), grids, [f"grid={grid}", *overrides])


def run_cell(root: Path, cell: Sequence[str], experiment: str, uri: str, extra: Sequence[str]) -> int:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "pipeline.run", *cell, f"tracking.experiment={experiment}", *extra]
    return subprocess.run(cmd, cwd=root, env=env).returncode


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.compare.commits", description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git ref of the baseline (the new side is the working tree)")
    ap.add_argument("--grid", default="compare", help="conf/grid/<name>.yaml (default: compare)")
    ap.add_argument("--rounds", type=int, default=1, help="measure every cell this many times a side, "
                    "interleaved (≥ 2 measures the run-to-run noise instead of assuming it)")
    ap.add_argument("--threshold", default=None, help="passed to pipeline.compare")
    ap.add_argument("--out", default=None, help="passed to pipeline.compare")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every cell (e.g. seq_len=1024,2048)")
    args = ap.parse_args(argv)
    from pipeline.tracking import tracking_uri

    try:
        if args.rounds < 1:
            raise ValueError(f"--rounds must be ≥ 1, not {args.rounds}")
        base_sha = resolve(args.base)
        head_sha = resolve("HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        jobs = cells(args.grid, args.overrides)
    except Exception as e:  # noqa: BLE001 - one line before anything runs
        print(f"compare-commits: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    uri = tracking_uri(None)
    base_exp = f"compare-{base_sha[:12]}"
    new_exp = f"compare-{head_sha[:12]}" + ("-dirty" if dirty else "")
    base_root = worktree(base_sha)
    share_grid(base_root, args.grid)
    sides = [(base_root, base_exp, []), (REPO, new_exp, ["overwrite=true"] if dirty else [])]
    print(f"compare-commits: {len(jobs)} cells x {args.rounds} round(s) x 2 sides, interleaved; "
          f"base {args.base} = {base_sha[:12]} -> {base_exp}, new {'working tree' if dirty else 'HEAD'} -> {new_exp}")
    failed = 0
    step = 0
    for r in range(1, args.rounds + 1):
        rnd = [f"+round={r}"] if args.rounds > 1 else []
        for cell in jobs:
            order = sides if step % 2 == 0 else sides[::-1]
            step += 1
            for root, exp, extra in order:
                failed += run_cell(root, [*cell, *rnd], exp, uri, extra) != 0
    if failed:
        print(f"compare-commits: {failed} cell run(s) exited non-zero; their records say why", file=sys.stderr)
    from pipeline.compare.cli import main as compare_main

    cmp_args = ["--base", base_exp, "--new", new_exp, "--base-uri", uri, "--drift", "0"]  # interleaved
    cmp_args += ["--threshold", args.threshold] if args.threshold else []
    cmp_args += ["--out", args.out] if args.out else []
    return compare_main(cmp_args)


if __name__ == "__main__":
    raise SystemExit(main())
