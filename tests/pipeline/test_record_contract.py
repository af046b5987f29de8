"""The record is a contract: the same sweep writes the same run names, param, tag and metric keys
and config hashes as the fixture taken from the code before the record's names moved into
pipeline/record.py (tests/fixtures/record_contract_smoke.json, from `grid=smoke`). The smoke grid
has gained decode cells since (a new scenario, its own names): those runs are new, not changed."""
from __future__ import annotations

import json
import re

import pytest

from pipeline import record as R
from pipeline.registry import REPO_ROOT
from tests.support import run_cli

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "record_contract_smoke.json"


def contract(uri: str) -> dict[str, dict]:
    """Per run name (the parent's without its sweep id): sorted keys, status and config_hash."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("attnbench")
    out = {}
    for r in client.search_runs([exp.experiment_id], max_results=1000):
        name = r.info.run_name
        if r.data.tags.get(R.ROLE) == R.ROLE_SWEEP:
            name = re.sub(r"-\d{8}-\d{6}-[0-9a-f]{6}$", "", name)
        tags = sorted(re.sub(rf"^{R.REUSED_PREFIX}.*", f"{R.REUSED_PREFIX}<hash>", k)
                      for k in r.data.tags if not k.startswith("mlflow."))
        out[name] = {"params": sorted(r.data.params), "tags": tags, "metrics": sorted(r.data.metrics),
                     "status": r.data.tags.get(R.STATUS), "config_hash": r.data.tags.get(R.CONFIG_HASH)}
    return out


def _sweep(tmp_path, *args: str) -> dict[str, dict]:
    uri = f"sqlite:///{tmp_path / 'c.db'}"
    r = run_cli(["-m", "grid=smoke", f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path / 'mr'}", *args], timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return contract(uri)


# names added since the fixture, each with its meaning in pipeline/record.py: new, not changed
# (the trust layer: each timed median's CI and left-out calls, the cell's stability and attempts)
TRUST_METRICS = {name for m in R.TIMED for name in (*R.ci_names(m), R.left_out_name(m))}
ADDED = {"metrics": {R.CELL_SCENARIO_S, R.CELL_OVERHEAD_S, R.TRAIN_LOSS_FALL, R.CELL_ATTEMPTS, R.CELL_ATTEMPT,
                     R.CELL_OTHERS_CORES, R.CELL_STEAL_FRAC} | TRUST_METRICS,
         "tags": {R.ISOLATION, R.STABILITY, R.STABILITY_REASON, *R.MIXER_TAGS, R.ANALYTIC_ABSENT},
         "params": {R.ISOLATION, "model.norm_cap", "remeasure", "remeasure_pause_s", "rounds", "scenario.noise_target",
                    "scenario.noise_max_s"}}
# cells whose measurement changed since: a new config_hash, so an old store never hands their
# earlier figures back as if measured now (performer's norm cap; the kernel scenario's timing
# loop, which now samples until its noise target and leaves disturbed calls out)
NEW_IDENTITY = ("performer-",)
NEW_IDENTITY_SCENARIOS = ("-kernel",)


def _new_scenarios_only(got: dict) -> dict:
    return {k: v for k, v in got.items() if not k.endswith("-decode")}


def _same(got: dict, want: dict) -> None:
    for name, rec in want.items():
        assert name in got, f"run {name} missing"
        for key in ("params", "tags", "metrics", "status", "config_hash"):
            if key in ADDED:
                # the mixing core's time is written only where it is more than noise
                optional = set(R.KERNEL_MIXING_ONLY_WHEN_MEASURABLE) if key == "metrics" else set()
                got[name][key] = sorted(set(got[name][key]) - optional - ADDED[key])
                rec = {**rec, key: sorted(set(rec[key]) - optional)}
            if key == "config_hash" and (name.startswith(NEW_IDENTITY) or name.endswith(NEW_IDENTITY_SCENARIOS)):
                assert got[name][key] != rec[key], f"{name}: its measurement changed, its identity must too"
                continue
            assert got[name][key] == rec[key], f"{name}: {key} differ: +{set(got[name][key]) - set(rec[key])} " \
                                               f"-{set(rec[key]) - set(got[name][key])}"


def test_one_variant_of_the_smoke_sweep_keeps_the_contract(tmp_path):
    """The smoke grid's vanilla cells (kernel, full, train with checkpointing off and on), inline."""
    want = json.loads(FIXTURE.read_text())
    got = _new_scenarios_only(_sweep(tmp_path, "model=vanilla", "isolate=false", "hydra.sweeper.report=false"))
    vanilla = {k: v for k, v in want.items() if k.startswith("vanilla-")}
    assert set(got) == set(vanilla) | {"sweep-smoke"}
    _same(got, vanilla)
    parent = dict(want["sweep-smoke"])  # no report asked for: no report_dir tag
    parent["tags"] = [t for t in parent["tags"] if t != R.REPORT_DIR]
    _same({"sweep-smoke": got["sweep-smoke"]}, {"sweep-smoke": parent})


@pytest.mark.slow
def test_the_smoke_sweep_keeps_the_contract(tmp_path):
    want = json.loads(FIXTURE.read_text())
    got = _new_scenarios_only(_sweep(tmp_path))
    # a variant discovered since the fixture was taken has no record there: its runs are new, not changed
    known = {_variant(name) for name in want}
    got = {name: rec for name, rec in got.items() if _variant(name) in known}
    assert set(got) == set(want)
    _same(got, want)


def _variant(run_name: str) -> str:
    """The model of a cell's run name `{model}-n{seq_len}-{scenario}` (the parent's name as it is)."""
    m = re.match(r"(.+?)-n\d+-", run_name)
    return m.group(1) if m else run_name
