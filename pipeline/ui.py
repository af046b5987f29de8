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

# the runs table's columns a sweep opens with (those its cells have), in this order
VIEW_COLUMNS = (("params", R.SEQ_LEN), ("tags", R.MODEL), ("tags", R.SCENARIO), ("tags", R.STATUS),
                ("tags", R.STABILITY), ("metrics", R.KERNEL_FWD_MS), ("metrics", R.KERNEL_FWDBWD_MS), ("metrics", R.KERNEL_PEAK_MEM_MB),
                ("metrics", R.DECODE_MS_PER_TOKEN), ("metrics", R.VAL_ACC), ("metrics", R.QUALITY_REL_ERR_VS_EXACT),
                ("metrics", R.TRAIN_STEP_MS), ("tags", R.BACKEND))
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."  # an experiment tag the UI loads with ?viewStateShareKey=


def share_sweep_view(tr, sweep_id: str, parent_run_id: str, cells: list) -> str:
    """Save a view of the runs table for one sweep as the UI's shared view state (an experiment
    tag): its runs only, grouped by scenario, and the attnbench columns its cells have. Returns
    the share key."""
    have = {("metrics", k) for r in cells for k in r.data.metrics} | {("params", k) for r in cells for k in r.data.params}
    have |= {("tags", k) for r in cells for k in r.data.tags}
    state = {
        "searchFilter": f"tags.{R.SWEEP_ID} = '{sweep_id}'",
        "orderByKey": "attributes.start_time", "orderByAsc": True,
        "selectedColumns": [f"{kind}.`{key}`" for kind, key in VIEW_COLUMNS if (kind, key) in have],
        # grouped by scenario: the cells as rows of their groups, not folded under the sweep's run
        "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": R.SCENARIO}]},
    }
    key = f"sweep-{sweep_id}"
    tr.client.set_experiment_tag(tr.experiment_id, SHARED_VIEW_PREFIX + key, json.dumps(state))
    return key


def sweep_urls(base: str, experiment_id: str, parent_run_id: str, sweep_id: str, cell_run_ids: list[str],
               max_compare: int = 40, share_key: str | None = None) -> dict[str, str]:
    """The UI's addresses (MLflow 3's hash routes) for one sweep. `workflowType=machine_learning`
    selects the UI's model-training side, which otherwise opens on its GenAI overview."""
    exp = f"{base}/#/experiments/{experiment_id}"
    ml = "workflowType=machine_learning"
    runs = cell_run_ids[:max_compare]
    search = quote(f"tags.{R.SWEEP_ID} = '{sweep_id}'")
    runs_url = (f"{exp}/runs?{ml}&viewStateShareKey={quote(share_key)}" if share_key
                else f"{exp}/runs?{ml}&searchFilter={search}")
    return {
        "runs": runs_url,
        "sweep": f"{exp}/runs/{parent_run_id}?{ml}",
        "compare": f"{base}/#/compare-runs?runs={quote(json.dumps(runs))}&experiments={quote(json.dumps([experiment_id]))}&{ml}",
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
    runs = [r for r in tr.search(f"tags.{R.SWEEP_ID} = '{sweep_id}'") if r.info.run_id != parent.info.run_id]
    runs.reverse()  # oldest first: the sweep's order
    cells = [r.info.run_id for r in runs]
    share_key = share_sweep_view(tr, sweep_id, parent.info.run_id, runs)
    urls = sweep_urls(base, tr.experiment_id, parent.info.run_id, sweep_id, cells, share_key=share_key)
    print(f"[attnbench] latest sweep {sweep_id} ({len(cells)} cells) once the UI is up:")
    print(f"  its runs:      {urls['runs']}")
    print(f"  its report:    {urls['sweep']}  (Artifacts -> report/report.html)")
    print(f"  compare cells: {urls['compare']}" + (" (the first 40)" if len(cells) > 40 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
