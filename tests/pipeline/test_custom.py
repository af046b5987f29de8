"""A user's mixer (model=custom model._target_=pkg.module.Class) runs like a built-in variant: as a
single cell and in a sweep, recorded under its class's name with where the class came from, its
missing analytic models recorded as absent; the configs that cannot run are refused in one line."""
from __future__ import annotations

import pytest
import torch

from pipeline import record as R
from pipeline.analytic import analytic
from pipeline.cell import run_cell
from pipeline.config import ConfigError, check_group_overrides, to_dict, validate
from pipeline.registry import CONF_DIR, build_mixer, discover_variants, provenance, templates
from pipeline.tracking import Tracker
from tests.support import compose, run_cli

FAST = ["scenario.min_time_s=0", "scenario.noise_max_s=0", "scenario.min_repeats=2", "scenario.warmup=1",
        "scenario.warmup_s=0", "remeasure=0", "seq_len=32"]
MIXERS = "tests.custom_mixers"
WINDOWED, PLAIN = f"{MIXERS}.WindowedMixer", f"{MIXERS}.PlainGate"


def _runs(uri: str, experiment: str) -> dict:
    return {r.info.run_name: r for r in Tracker(uri, experiment).search("")}


def test_the_template_is_not_a_variant():
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from pipeline.sweep import expand_grids

    assert templates() == ["custom"] and "custom" not in discover_variants()
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))
    jobs = expand_grids(OverridesParser.create(config_loader=loader), [{"model": "glob(*)", "seq_len": "32"}], [])
    assert [j[0] for j in jobs] == [f"model={v}" for v in discover_variants()]


@pytest.mark.parametrize("overrides, line", [
    (["model=vanilla", f"model._target_={WINDOWED}"],
     f"model.name=vanilla is the built-in variant models.vanilla.VanillaAttention; to benchmark {WINDOWED} use "
     f"model=custom model._target_={WINDOWED}, under its own name (WindowedMixer)"),
    (["model=custom", f"model._target_={WINDOWED}", "model.name=performer"],
     "model.name=performer is the built-in variant models.performer.PerformerAttention; to benchmark"),
    (["model=custom"], "model=custom needs model._target_=pkg.module.Class"),
    (["model=custom", "model._target_=tests.no_such_module.Mixer"],
     "model._target_=tests.no_such_module.Mixer: cannot import module tests.no_such_module (ModuleNotFoundError"),
    (["model=custom", f"model._target_={MIXERS}.Missing"], f"module {MIXERS} ("),
    (["model=custom", f"model._target_={MIXERS}.NotAModule"], "is not an nn.Module subclass (NotAModule derives from object)"),
    (["model=custom", f"model._target_={MIXERS}.not_a_class"], "is not an nn.Module subclass (a function)"),
    (["model=custom", f"model._target_={MIXERS}.NarrowArgs"],
     "its constructor NarrowArgs(dim: 'int', heads: 'int') cannot take (d_model, n_heads, causal)"),
    (["model=custom", f"model._target_={WINDOWED}", "+model.widow=3"], "unexpected keyword argument 'widow'"),
    (["model=custom", f"model._target_={WINDOWED}", "model.exact=true", "model.time_order=2"],
     f"model.exact, model.time_order: {WINDOWED} is a SequenceMixer and declares its own capability flags "
     "(exact=False, time_order=1.0); drop these keys"),
    (["model=vanilla", "+model.exact=true"], "models.vanilla.VanillaAttention is a SequenceMixer and declares its own"),
    (["model=custom", f"model._target_={PLAIN}", "model.exact=yes"], "model.exact must be true or false, got 'yes'"),
])
def test_refused_in_one_line(overrides, line):
    with pytest.raises(ConfigError) as err:
        validate(to_dict(compose(overrides)))
    assert line in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_knob_of_the_class_needs_plus_said_in_one_line():
    with pytest.raises(ConfigError, match=r"^model.window is a knob of your class, not a key of conf/model/custom.yaml: "
                                          r"add it with \+model.window=3$"):
        check_group_overrides(["model=custom", f"model._target_={WINDOWED}", "model.window=3"])
    check_group_overrides(["model=custom", f"model._target_={WINDOWED}", "+model.window=3", "model.exact=true"])


def test_cli_refuses_a_builtin_running_another_class_before_any_store(tmp_path):
    r = run_cli(["model=vanilla", f"model._target_={WINDOWED}", f"tracking.uri=sqlite:///{tmp_path / 'x.db'}"],
                timeout=120)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "to benchmark tests.custom_mixers.WindowedMixer use model=custom" in lines[0]
    assert not (tmp_path / "x.db").exists()


def test_a_plain_module_runs_wrapped_with_the_flags_it_is_given():
    d = to_dict(compose(["model=custom", f"model._target_={PLAIN}", "+model.gain=2.0", "model.exact=false",
                         "model.time_order=1"]))
    validate(d)
    assert d["model"] == {"name": "PlainGate", "_target_": PLAIN, "gain": 2.0, "exact": False, "time_order": 1}
    mixer = build_mixer(d["model"], d_model=16, n_heads=2, causal=True)
    assert (mixer.backend, mixer.exact, mixer.time_order, mixer.memory_order) == ("PlainGate", False, 1.0, 2.0)
    assert mixer.inner.gain == 2.0 and not mixer.has_step()
    assert sorted(mixer.state_dict()) == ["gate.bias", "gate.weight"]  # the module's own names
    x = torch.randn(2, 5, 16)
    assert mixer(x).shape == x.shape
    tags: dict[str, str] = {}
    assert analytic(mixer.flops, 2, 5, absent=tags) is None and analytic(mixer.memory_bytes, 2, 5, absent=tags) is None
    assert tags == {R.ANALYTIC_ABSENT: "flops,memory_bytes"}
    # the template's unset flags are not part of the cell: a SequenceMixer subclass passes
    assert to_dict(compose(["model=custom", f"model._target_={WINDOWED}"]))["model"] == {"name": "WindowedMixer",
                                                                                       "_target_": WINDOWED}


def test_provenance_of_a_builtin_a_user_class_and_an_installed_one():
    assert provenance("models.vanilla.VanillaAttention")[R.MIXER_FILE].endswith("models/vanilla.py")
    mine = provenance(PLAIN)
    assert mine[R.MIXER_CLASS] == PLAIN and mine[R.MIXER_FILE].endswith("tests/custom_mixers.py")
    assert R.MIXER_DIST not in mine  # a source tree, not an installed distribution
    lib = provenance("torch.nn.Linear")
    assert lib[R.MIXER_FILE].endswith("torch/nn/modules/linear.py")  # the defining module's file
    assert lib[R.MIXER_DIST] == f"torch=={torch.__version__}"


def test_single_cells_recorded_under_the_class_name(store_uri):
    exp = "custom-cells"
    for extra in (["model=custom", f"model._target_={PLAIN}", "model.exact=false", "model.time_order=1"],
                  []):  # the built-in vanilla: provenance on every run
        d = to_dict(compose([*FAST, "isolate=false", f"tracking.uri={store_uri}", f"tracking.experiment={exp}", *extra]))
        assert run_cell(d, quiet=True) == "ok"
    runs = _runs(store_uri, exp)
    plain, vanilla = runs["PlainGate-n32-kernel"], runs["vanilla-n32-kernel"]
    t, m, p = plain.data.tags, plain.data.metrics, plain.data.params
    assert t[R.MODEL] == "PlainGate" and t[R.BACKEND] == "PlainGate" and p["model.name"] == "PlainGate"
    assert t[R.MIXER_CLASS] == PLAIN and t[R.MIXER_FILE].endswith("tests/custom_mixers.py")
    assert (t[R.EXACT], t[R.TIME_ORDER], t[R.MEMORY_ORDER]) == ("False", "1.0", "2.0")
    assert t[R.ANALYTIC_ABSENT] == "flops,memory_bytes"
    assert m[R.KERNEL_FWD_MS] > 0 and m[R.KERNEL_FWDBWD_MS] > 0 and m[R.KERNEL_FLOPS_FWD] > 0  # counted, not analytic
    for absent in (R.KERNEL_FLOPS_FWD_ANALYTIC, R.KERNEL_TFLOPS, R.KERNEL_PEAK_FRACTION, R.KERNEL_MIXING_TFLOPS):
        assert absent not in m, absent
    assert R.PREDICTED_MEM_MB not in p and R.PREDICTED_MEM_FWDBWD_MB not in p
    tv = vanilla.data.tags
    assert tv[R.MODEL] == "vanilla" and tv[R.MIXER_CLASS] == "models.vanilla.VanillaAttention"
    assert tv[R.MIXER_FILE].endswith("models/vanilla.py") and R.ANALYTIC_ABSENT not in tv
    assert R.PREDICTED_MEM_MB in vanilla.data.params


def test_cli_cell_isolated_sequence_mixer(tmp_path):
    uri = f"sqlite:///{tmp_path / 'cli.db'}"
    r = run_cli(["model=custom", f"model._target_={WINDOWED}", "+model.window=8", *FAST, f"tracking.uri={uri}",
                 f"hydra.run.dir={tmp_path / 'out'}"], env={"ATTNBENCH_CACHE": str(tmp_path / "cache")}, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (run,) = _runs(uri, "attnbench").values()
    t, m = run.data.tags, run.data.metrics
    assert run.info.run_name == "WindowedMixer-n32-kernel" and t[R.STATUS] == "ok" and t[R.ISOLATION] == "fork"
    assert t[R.MODEL] == "WindowedMixer" and t[R.BACKEND] == "cumsum" and run.data.params["model.window"] == "8"
    assert (t[R.EXACT], t[R.IS_ATTENTION], t[R.TIME_ORDER]) == ("False", "False", "1.0")  # the class's own
    assert t[R.ANALYTIC_ABSENT] == "memory_bytes"  # it has flops, not memory_bytes
    assert m[R.KERNEL_FLOPS_FWD_ANALYTIC] == 3.0 * 32 * 64 + 2.0 * 32 * 64 * 64 and m[R.KERNEL_PEAK_FRACTION] > 0


def test_sweep_of_custom_mixers_and_its_report(tmp_path):
    from pipeline.report import build_report

    uri = f"sqlite:///{tmp_path / 'sweep.db'}"
    r = run_cli(["-m", "model=custom", f"model._target_={WINDOWED},{PLAIN}", *FAST, "seq_len=32,64", "isolate=false",
                 "hydra.sweeper.report=false", f"hydra.sweep.dir={tmp_path / 'mr'}"],
                env={"MLFLOW_TRACKING_URI": uri, "ATTNBENCH_CACHE": str(tmp_path / "cache")}, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "done: 4 run (4 ok)" in r.stdout
    runs = _runs(uri, "attnbench")
    cells = {k: v for k, v in runs.items() if not k.startswith("sweep-")}
    assert sorted(cells) == ["PlainGate-n32-kernel", "PlainGate-n64-kernel", "WindowedMixer-n32-kernel",
                             "WindowedMixer-n64-kernel"]
    for name, run in cells.items():
        model = name.split("-")[0]
        assert run.data.tags[R.MODEL] == model and run.data.tags[R.MIXER_CLASS] == f"{MIXERS}.{model}"
    sweep_id = next(v for k, v in runs.items() if k.startswith("sweep-")).data.tags[R.SWEEP_ID]
    out = build_report(experiment="attnbench", sweep_id=sweep_id, out_dir=tmp_path / "report", tracking_uri=uri)
    md = (out / "report.md").read_text()
    assert "| PlainGate | 32 | absent | absent | absent |" in md  # section 4: no analytic FLOP count
    row = next(ln for ln in md.splitlines() if ln.startswith("| WindowedMixer | 32 |"))
    assert "absent" not in row and "| 268,288 |" in row  # 3 B T D + 2 B T D^2
    assert "| PlainGate | no |" in md and "| WindowedMixer | no |" in md  # a line of its own, tagged exact=False
    csv = (out / "results.csv").read_text()
    assert csv.count("PlainGate") >= 2 and csv.count("WindowedMixer") >= 2
