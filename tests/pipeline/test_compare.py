"""`python -m pipeline.compare` on fixture stores with closed-form answers: identical samples are
`same`, a 2× shift is `slower` with a small p, a 3 % shift under the threshold is `same`, a
flagged side is `unstable`, unmatched cells are `missing` and listed, rounds set the run-to-run
noise, an ignored axis lines a CPU sweep up with a GPU one, and the exit codes of the gate.

    .venv/bin/pytest tests/pipeline/test_compare.py
"""
from __future__ import annotations

import math

import pandas as pd
import pytest

from pipeline import compare as C
from pipeline import record as R
from pipeline.stability import median_ci

LENGTHS = (512, 1024, 2048)
MODELS = ("vanilla", "xformers")
# 15 calls around the median 1: a spread of ±7 %, the same shape in every cell
SHAPE = [1.0 + 0.01 * k for k in range(-7, 8)]


def _ms(model: str, n: int) -> float:
    return (2e-6 if model == "vanilla" else 1e-6) * n * n


class Store:
    """A sqlite store with one experiment per sweep; kernel cells as the pipeline records them."""

    def __init__(self, root):
        from mlflow.tracking import MlflowClient

        self.uri = f"sqlite:///{root / 'cmp.db'}"
        self.art = (root / "art").as_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        self.clock = 0

    def sweep(self, name: str, factor=lambda m, n: 1.0, flagged=(), drop=(), device="Intel Xeon",
              trainer="cpu", rounds: int = 1, round_spread: float = 0.0, mem_factor: float = 1.0,
              models=MODELS, lengths=LENGTHS, memory_method: str = "cuda.max_memory_allocated") -> None:
        exp = self.client.create_experiment(name, artifact_location=f"{self.art}/{name}")
        for model in models:
            for n in lengths:
                if (model, n) in drop:
                    continue
                for r in range(1, rounds + 1):
                    scale = _ms(model, n) * factor(model, n) * (1 + round_spread * (r - (rounds + 1) / 2))
                    self._cell(exp, model, n, scale, (model, n) in flagged, device, trainer,
                               r if rounds > 1 else None, mem_factor, memory_method)

    def _cell(self, exp, model, n, scale, flagged, device, trainer, rnd, mem_factor, memory_method):
        self.clock += 1
        calls = [scale * s for s in SHAPE]
        lo, hi = median_ci(calls)
        name = R.run_name(model, n, "kernel", False, rnd)
        tags = {R.MODEL: model, R.SCENARIO: "kernel", R.STATUS: "ok", R.DEVICE_NAME: device, R.HOST: "box",
                R.GIT_SHA: "abc", R.STABILITY: R.STABILITIES[1] if flagged else R.STABLE,
                R.MEMORY_METHOD: memory_method}
        params = {"model.name": model, "seq_len": n, "scenario.name": "kernel", "backbone.d_model": 64,
                  "trainer.accelerator": trainer, "scenario.min_repeats": 3, "seed": 0}
        if rnd:
            params["round"] = rnd
        metrics = {R.KERNEL_FWD_MS: scale, R.ci_names(R.KERNEL_FWD_MS)[0]: lo,
                   R.ci_names(R.KERNEL_FWD_MS)[1]: hi, R.KERNEL_PEAK_MEM_MB: 4e-6 * n * n * mem_factor}
        run = self.client.create_run(exp, start_time=1_700_000_000_000 + self.clock, run_name=name,
                                     tags={k: str(v) for k, v in tags.items()})
        rid = run.info.run_id
        for k, v in params.items():
            self.client.log_param(rid, k, v)
        for k, v in metrics.items():
            self.client.log_metric(rid, k, v)
        self.client.log_dict(rid, {"fwd_ms": {"ms": calls, "wait": [0.0] * len(calls)}}, "timings.json")
        self.client.set_terminated(rid, "FINISHED")


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path)


def _run(store, base, new, *extra, tmp):
    return C.main(["--base", base, "--new", new, "--base-uri", store.uri, "--out", str(tmp), *extra])


def _cmp(store, base, new, **kw):
    return C.compare(C.load_side(base, store.uri), C.load_side(new, store.uri), **kw).rows


def test_identical_samples_are_same(store, tmp_path):
    store.sweep("a")
    store.sweep("b")
    rows = _cmp(store, "a", "b")
    assert set(rows["figure"]) == {"fwd", "peak_mem"}
    assert (rows["verdict"] == "same").all() and (rows["ratio"] == 1.0).all()
    assert len(rows) == 2 * len(MODELS) * len(LENGTHS)
    assert _run(store, "a", "b", tmp=tmp_path / "out") == 0
    csv = pd.read_csv(tmp_path / "out" / "compare.csv")
    assert {"cell", "figure", "base", "new", "ratio", "ci_lo", "ci_hi", "p", "verdict"} <= set(csv.columns)
    assert (tmp_path / "out" / "compare.md").read_text().count("same machine") == 1
    assert "data:image/png;base64" in (tmp_path / "out" / "compare.html").read_text()


def test_a_2x_shift_is_slower_with_a_small_p_and_fails_the_gate(store, tmp_path):
    store.sweep("a")
    store.sweep("b", factor=lambda m, n: 2.0 if m == "vanilla" else 1.0)
    rows = _cmp(store, "a", "b").set_index(["cell", "figure"])
    slow = rows.loc[("vanilla-n1024-kernel", "fwd")]
    assert slow["verdict"] == "slower" and slow["ratio"] == pytest.approx(2.0)
    assert slow["p"] < 1e-4 and slow["ci_lo"] > 1.05 and slow["test"] == "mann-whitney"
    assert rows.loc[("xformers-n1024-kernel", "fwd"), "verdict"] == "same"
    assert _run(store, "a", "b", tmp=tmp_path / "o1") == 1
    assert _run(store, "a", "b", "--fail-on", "peak_mem", tmp=tmp_path / "o2") == 0  # memory did not change
    assert _run(store, "b", "a", tmp=tmp_path / "o3") == 0  # the other way it is faster
    assert (_cmp(store, "b", "a")["verdict"] == "faster").sum() == len(LENGTHS)


def test_a_3_percent_shift_under_the_threshold_is_same(store):
    store.sweep("a")
    store.sweep("b", factor=lambda m, n: 1.03)
    rows = _cmp(store, "a", "b")
    fwd = rows[rows["figure"] == "fwd"]
    assert (fwd["verdict"] == "same").all()
    assert fwd["ratio"].round(6).eq(1.03).all()


def test_memory_change_beyond_threshold_and_floor(store):
    store.sweep("a")
    store.sweep("b", mem_factor=1.5)
    mem = _cmp(store, "a", "b").query("figure == 'peak_mem'").set_index("cell")
    assert mem.loc["vanilla-n2048-kernel", "verdict"] == "slower"  # 16.8 -> 25.2 MiB
    assert mem.loc["vanilla-n512-kernel", "verdict"] == "same"  # 1.05 -> 1.57 MiB: under the 2 MiB floor
    assert math.isnan(mem.loc["vanilla-n2048-kernel", "p"])


def test_cpu_peak_memory_is_called_only_from_rounds_that_agree(store):
    """A CPU's resident high-water mark moves by whole buffers between processes: without rounds
    a change beyond the threshold is `unstable`; with rounds that agree on both sides it is called."""
    cpu = "VmHWM+clear_refs+malloc_trim"
    store.sweep("a", memory_method=cpu)
    store.sweep("b", memory_method=cpu, mem_factor=1.5)
    mem = _cmp(store, "a", "b").query("figure == 'peak_mem'").set_index("cell")
    assert mem.loc["vanilla-n2048-kernel", "verdict"] == "unstable"
    assert "whole buffers" in mem.loc["vanilla-n2048-kernel", "note"]
    store.sweep("c", memory_method=cpu, rounds=2)
    store.sweep("d", memory_method=cpu, rounds=2, mem_factor=1.5)
    mem = _cmp(store, "c", "d").query("figure == 'peak_mem'").set_index("cell")
    assert mem.loc["vanilla-n2048-kernel", "verdict"] == "slower"


def test_a_flagged_side_is_unstable_not_slower(store, tmp_path):
    store.sweep("a")
    store.sweep("b", factor=lambda m, n: 2.0, flagged={("vanilla", 512)})
    rows = _cmp(store, "a", "b").set_index(["cell", "figure"])
    r = rows.loc[("vanilla-n512-kernel", "fwd")]
    assert r["verdict"] == "unstable" and "new timings flagged" in r["note"]
    assert rows.loc[("vanilla-n1024-kernel", "fwd"), "verdict"] == "slower"


def test_unmatched_cells_are_listed_as_missing(store, tmp_path):
    store.sweep("a", drop={("xformers", 2048)})
    store.sweep("b", drop={("vanilla", 512)})
    rows = _cmp(store, "a", "b")
    miss = rows[rows["verdict"] == "missing"]
    assert set(miss["cell"]) == {"xformers-n2048-kernel", "vanilla-n512-kernel"}
    notes = dict(zip(miss["cell"], miss["note"]))
    assert notes["xformers-n2048-kernel"] == "base: no such cell"
    assert notes["vanilla-n512-kernel"] == "new: no such cell"
    assert _run(store, "a", "b", tmp=tmp_path / "o") == 0
    assert "missing" in (tmp_path / "o" / "compare.md").read_text()


def test_rounds_set_the_run_to_run_noise(store):
    """Two rounds 14 % apart in every cell: σ_run = log(1.07/0.93)/√2, wide enough that a 20 %
    shift is not called; without rounds (the default noise) the same shift is `slower`. No
    drift term here (as for interleaved sides), so only the rounds differ."""
    store.sweep("a", rounds=2, round_spread=0.14)
    store.sweep("b", rounds=2, round_spread=0.14, factor=lambda m, n: 1.20)
    cmp = C.compare(C.load_side("a", store.uri), C.load_side("b", store.uri), drift=0.0)
    assert cmp.run_noise["fwd"] == pytest.approx(math.log(1.07 / 0.93) / math.sqrt(2), rel=0.05)
    assert "rounds" in cmp.run_noise_source["fwd"]
    assert cmp.run_noise["peak_mem"] == 0.0  # memory the same in both rounds: no noise known
    fwd = cmp.rows[cmp.rows["figure"] == "fwd"]
    assert len(fwd) == len(MODELS) * len(LENGTHS) and (fwd["verdict"] == "same").all()
    assert not fwd["cell"].str.contains("-r1").any()
    store.sweep("c")
    store.sweep("d", factor=lambda m, n: 1.20)
    quiet = C.compare(C.load_side("c", store.uri), C.load_side("d", store.uri), drift=0.0).rows
    assert (quiet[quiet["figure"] == "fwd"]["verdict"] == "slower").all()
    # a whole sweep's drift widens every interval: the same 20 % with the default drift
    drifting = _cmp(store, "c", "d")
    ci = drifting[drifting["figure"] == "fwd"]
    assert (ci["ci_hi"] - ci["ci_lo"] > quiet[quiet["figure"] == "fwd"]["ci_hi"] - quiet[quiet["figure"] == "fwd"]["ci_lo"]).all()


def test_a_cell_whose_rounds_disagree_gets_a_wider_interval():
    """The cell's own rounds moderate the pooled σ_run (NU0 degrees of freedom against theirs)."""
    from pipeline.compare.cells import Measured, cell_run_noise

    agree = Measured(1.0, 0.0, 2, [0.0, 0.0], None, False)
    apart = Measured(1.0, 0.0, 2, [math.log(0.9), math.log(1.1)], None, False)
    assert cell_run_noise(agree, agree, 0.02) < 0.02 < cell_run_noise(apart, apart, 0.02)
    assert cell_run_noise(Measured(1.0, 0.0, 1, [0.0], None, False), agree, 0.02) < 0.02


def test_devices_side_by_side_match_on_an_ignored_axis_and_never_gate(store, tmp_path):
    store.sweep("cpu")
    store.sweep("gpu", factor=lambda m, n: 3.0, device="NVIDIA H100", trainer="gpu")
    assert (_cmp(store, "cpu", "gpu")["verdict"] == "missing").all()  # the trainer differs
    cmp = C.compare(C.load_side("cpu", store.uri), C.load_side("gpu", store.uri), ignore=["trainer"])
    assert not cmp.same_machine and (cmp.rows.query("figure == 'fwd'")["verdict"] == "slower").all()
    assert _run(store, "cpu", "gpu", "--ignore", "trainer", tmp=tmp_path / "o") == 0
    assert (tmp_path / "o" / "compare.md").read_text().splitlines()[2].startswith("- devices side by side")


def test_bad_input_exits_2(store, tmp_path, capsys):
    store.sweep("a")
    assert _run(store, "a", "nope", tmp=tmp_path / "o") == 2
    assert "neither an experiment nor a sweep id" in capsys.readouterr().err
    assert _run(store, "a", "a", "--threshold", "2", tmp=tmp_path / "o") == 2


@pytest.mark.parametrize("lo,hi,p,want", [
    (1.2, 1.4, 1e-6, "slower"), (0.7, 0.8, 1e-6, "faster"), (1.01, 1.2, 1e-6, "same"),
    (1.2, 1.4, 0.3, "same"), (0.97, 1.03, 1e-9, "same"), (1.2, 1.4, math.nan, "slower")])
def test_judge(lo, hi, p, want):
    assert C.judge((lo + hi) / 2, lo, hi, p, 0.05, 0.05) == want


def test_compare_commits_expands_the_grid_and_refuses_a_bad_ref(capsys):
    from pipeline.compare import commits

    jobs = commits.cells("compare", [])
    assert len(jobs) == 12 and all("scenario=kernel" in j for j in jobs)
    assert len(commits.cells("compare", ["model=vanilla"])) == 4
    assert len(commits.cells("compare", ["model=vanilla,ssm", "seq_len=1024"])) == 2
    assert commits.main(["--base", "no-such-ref-xyz"]) == 2
    assert "not a commit" in capsys.readouterr().err
