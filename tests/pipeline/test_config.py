"""Config tree: discovery of variants, composition, and one-line errors before any compute."""
from __future__ import annotations

import importlib

import pytest

from pipeline.config import ConfigError, config_hash, family_hash, flatten, to_dict, validate
from pipeline.registry import discover_variants, load_variant_cfg, templates
from tests.support import REPO, compose, run_cli


def test_discovery_lists_conf_model():
    names = discover_variants()
    assert names == sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml") if p.stem not in templates())
    assert "vanilla" in names and "custom" not in names  # custom.yaml is a template (`_target_: ???`)


def test_discovery_fails_loudly_on_empty(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(RuntimeError, match="no variant configs"):
        discover_variants(tmp_path)


@pytest.mark.parametrize("name", discover_variants())
def test_every_variant_config_is_complete(name):
    cfg = load_variant_cfg(name)
    assert cfg["name"] == name, "conf/model/<name>.yaml must say name: <name>"
    module, _, cls = cfg["_target_"].rpartition(".")
    assert hasattr(importlib.import_module(module), cls)
    composed = to_dict(compose([f"model={name}"]))
    validate(composed)


@pytest.mark.parametrize(
    "override, field",
    [("seq_len=0", "seq_len"), ("batch_size=-1", "batch_size"), ("backbone.n_heads=3", "backbone.d_model"),
     ("backbone.dtype=int3", "backbone.dtype"), ("timeout_s=-5", "timeout_s"), ("budget.memory_gb=0", "budget.memory_gb"),
     ("trainer=ddp", "trainer.strategy")],  # default scenario=kernel: one process, no ranks
)
def test_validate_names_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate(to_dict(compose([override])))


def test_window_larger_than_n_is_rejected():
    if "longformer" not in discover_variants():
        pytest.skip("no windowed variant configured")
    with pytest.raises(ConfigError, match="model.window"):
        validate(to_dict(compose(["model=longformer", "seq_len=64", "model.window=128"])))


def _poisoned_torch(tmp_path):
    """A `torch` that refuses to import: proves an error came before torch was touched."""
    pkg = tmp_path / "torch"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('torch was imported before validation finished')\n")
    return {"PYTHONPATH": f"{tmp_path}"}


@pytest.mark.parametrize(
    "override, field", [("model=nope", "model"), ("seq_len=0", "seq_len"), ("batch_size=-1", "batch_size")]
)
def test_cli_bad_input_one_line_before_torch(override, field, tmp_path):
    r = run_cli([override, "tracking.uri=sqlite:///" + str(tmp_path / "x.db")], env=_poisoned_torch(tmp_path), timeout=60)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert field in lines[0] and "torch was imported" not in lines[0]
    assert not (tmp_path / "x.db").exists(), "no store may be created for a rejected config"


def test_hash_ignores_run_switches_but_not_measurements():
    base = to_dict(compose([]))
    same = to_dict(compose(["overwrite=true", "isolate=false", "timeout_s=5", "tracking.experiment=other"]))
    other = to_dict(compose(["seq_len=2048"]))
    assert config_hash(base) == config_hash(same)
    assert config_hash(base) != config_hash(other)
    assert family_hash(base) == family_hash(other)


def test_flatten_is_dotted_and_untruncated():
    flat = flatten({"model": {"name": "x" * 600, "window": 8}, "seq_len": 4})
    assert flat == {"model.name": "x" * 600, "model.window": 8, "seq_len": 4}


def test_sweep_rejects_an_impossible_task_layout_before_any_cell(tmp_path):
    """MQAR's pairs and query distance do not fit in 16 tokens: one line, no store, no cell."""
    r = run_cli(["-m", "scenario=train", "task=mqar", "seq_len=16,64", f"tracking.uri=sqlite:///{tmp_path / 'x.db'}",
                 f"hydra.sweep.dir={tmp_path / 'mr'}"], timeout=120)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "seq_len" in lines[0] and "mqar" in lines[0], r.stderr
    assert not (tmp_path / "x.db").exists()


@pytest.mark.skipif(importlib.util.find_spec("torch") is None or __import__("torch").cuda.is_available(),
                    reason="needs a machine without CUDA")
@pytest.mark.parametrize("args", [["-m", "grid=long"], ["trainer=gpu"]], ids=["sweep", "one-cell"])
def test_gpu_cells_without_cuda_fail_in_one_line_before_any_run(args, tmp_path):
    r = run_cli([*args, f"tracking.uri=sqlite:///{tmp_path / 'x.db'}", f"hydra.sweep.dir={tmp_path / 'mr'}"],
                timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "no usable CUDA device" in lines[0], r.stderr
    assert not (tmp_path / "x.db").exists(), "no store may be created for a grid that cannot run here"


def test_fp32_matmul_tag_survives_the_newer_precision_api():
    import subprocess
    import sys

    code = ("import torch; from pipeline.execute import fp32_matmul_tag; a = fp32_matmul_tag(); "
            "torch.backends.cuda.matmul.fp32_precision = 'tf32'; print(a, '|', fp32_matmul_tag())")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr  # its own process: the setting is global to one
    assert r.stdout.strip() == "highest | cuda matmul fp32_precision=tf32"


def test_gpu_launch_problem_per_launcher():
    from pipeline.sweep import gpu_launch_problem

    def no_cuda():
        return "no usable CUDA device"

    def cuda():
        return None

    def must_not_ask():
        raise AssertionError("a cluster launcher runs the cells elsewhere: this machine's CUDA does not matter")

    slurm = {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"}
    local = {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher", "gpus_per_node": None}
    basic = {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}
    assert gpu_launch_problem(slurm, must_not_ask) is None
    assert gpu_launch_problem(basic, cuda) is None
    assert "no usable CUDA device" in gpu_launch_problem(basic, no_cuda)
    assert "gpus_per_node" in gpu_launch_problem(local, cuda)
    assert gpu_launch_problem({**local, "gpus_per_node": 1}, cuda) is None
