"""Where to open the MLflow UI: the latest sweep's runs (parent and cells, filtered by its
sweep_id), its parent run (the report is among its artifacts) and a compare view of its cells.
`make ui` prints these before it starts `mlflow ui`.

    python -m pipeline.ui [--experiment attnbench] [--port 5000]
"""
from __future__ import annotations

import argparse
import json
import sys
from urllib.parse import quote

from pipeline import record as R


def sweep_urls(base: str, experiment_id: str, parent_run_id: str, sweep_id: str, cell_run_ids: list[str],
               max_compare: int = 40) -> dict[str, str]:
    """The UI's addresses (MLflow 3's hash routes) for one sweep."""
    exp = f"{base}/#/experiments/{experiment_id}"
    runs = cell_run_ids[:max_compare]
    return {
        "runs": f"{exp}?searchFilter={quote(f'tags.{R.SWEEP_ID} = {chr(39)}{sweep_id}{chr(39)}')}",
        "sweep": f"{exp}/runs/{parent_run_id}",
        "compare": f"{base}/#/compare-runs?runs={quote(json.dumps(runs))}&experiments={quote(json.dumps([experiment_id]))}",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.ui", description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default="attnbench")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5000)
    ap.add_argument("--uri", default=None, help="tracking store (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    args = ap.parse_args(argv)

    from pipeline.tracking import Tracker, tracking_uri

    tr = Tracker(tracking_uri(args.uri), args.experiment)
    parents = tr.search(f"tags.`{R.ROLE}` = '{R.ROLE_SWEEP}'", max_results=1)
    base = f"http://{args.host}:{args.port}"
    if not parents:
        print(f"[attnbench] no sweep in experiment '{args.experiment}' yet: {base}/#/experiments/{tr.experiment_id}")
        return 0
    parent = parents[0]
    sweep_id = parent.data.tags[R.SWEEP_ID]
    cells = [r.info.run_id for r in tr.search(f"tags.{R.SWEEP_ID} = '{sweep_id}'") if r.info.run_id != parent.info.run_id]
    urls = sweep_urls(base, tr.experiment_id, parent.info.run_id, sweep_id, cells)
    print(f"[attnbench] latest sweep {sweep_id} ({len(cells)} cells) once the UI is up:")
    print(f"  its runs:      {urls['runs']}")
    print(f"  its report:    {urls['sweep']}  (Artifacts -> report/report.html)")
    print(f"  compare cells: {urls['compare']}" + (" (the first 40)" if len(cells) > 40 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
