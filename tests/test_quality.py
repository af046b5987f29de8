"""The train / infer / full scenarios on the real configs, shrunk for a CPU: training lowers the
loss, a non-finite loss is reported as divergence, inference is timed, and fidelity scores each
discovered variant against exact attention."""
from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from pipeline.registry import CONF_DIR, discover_variants
from pipeline.scenarios import quality
from pipeline.scenarios.base import CellResult, Diverged

SMALL_MQAR = ["task=mqar", "task.num_pairs=2", "task.num_keys=8", "task.num_values=8", "task.val_samples=64",
              "seq_len=32", "task.train.batch_size=16", "task.train.warmup_steps=5"]


pytestmark = pytest.mark.usefixtures("one_thread")


def cell(*overrides: str):
    """The real root config with the given overrides (vanilla unless a test says otherwise)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("config", overrides=["model=vanilla", *overrides])


def run(fn, cfg) -> CellResult:
    result = CellResult()
    fn(cfg, torch.device("cpu"), result)
    return result


def test_train_lowers_loss_and_reports():
    cfg = cell("scenario=train", "scenario.warmup_steps=2", *SMALL_MQAR, "task.train.max_steps=40")
    r = run(quality.run_train, cfg)
    loss = r.series["train/loss"]
    assert len(loss) == 40 and all(math.isfinite(v) for v in loss)
    assert sum(loss[-5:]) / 5 < loss[0] - 0.5
    m = r.metrics
    assert m["train/steps"] == 40
    assert len(r.artifacts["train_step_ms.json"]) == 40 - 2  # warm-up steps left out
    assert m["train/step_ms"] > 0 and m["train/step_ms_iqr"] >= 0
    assert m["train/tokens_per_s"] == pytest.approx(16 * 32 / (m["train/step_ms"] * 1e-3))
    assert 0.0 <= m["val/acc"] <= 1.0 and math.isfinite(m["val/loss"])
    assert m["val/acc_chance"] == pytest.approx(1 / 8)
    assert r.tags["backend"] == "torch-matmul" and r.params["seed"] == 0
    assert r.tags["memory_method"]
    assert "infer/latency_ms" not in m


def test_code_lm_beats_unigram():
    cfg = cell("scenario=train", "scenario.warmup_steps=2", "task=code_lm", "seq_len=64", "task.max_train_chars=100000",
               "task.max_val_chars=8000", "task.train.max_steps=60", "task.train.batch_size=16",
               "task.train.warmup_steps=5")
    m = run(quality.run_train, cfg).metrics
    assert m["val/bpc"] == pytest.approx(m["val/loss"] / math.log(2))
    assert 3.0 < m["val/bpc_unigram"] < 6.5
    assert m["val/bpc"] < m["val/bpc_unigram"]


def test_nan_loss_raises_diverged(monkeypatch):
    build = quality._build

    def poisoned(cfg, task):
        model = build(cfg, task)
        calls = {"n": 0}

        def hook(module, args, out):
            calls["n"] += 1
            return out * float("nan") if calls["n"] > 3 else out

        model.head.register_forward_hook(hook)
        return model

    monkeypatch.setattr(quality, "_build", poisoned)
    cfg = cell("scenario=train", "scenario.warmup_steps=2", *SMALL_MQAR, "task.train.max_steps=20")
    with pytest.raises(Diverged, match="step 3"):
        run(quality.run_train, cfg)


def test_huge_lr_diverges_or_fails_to_learn():
    """lr=1e6 either produces a non-finite loss (-> Diverged) or a model no better than chance:
    never a silent success."""
    cfg = cell("scenario=train", "scenario.warmup_steps=2", *SMALL_MQAR, "task.train.max_steps=15", "task.train.lr=1e6",
               "task.train.grad_clip=null", "task.train.warmup_steps=0")
    try:
        r = run(quality.run_train, cfg)
    except Diverged:
        return
    assert r.metrics["val/acc"] < 0.5


def test_infer_times_batches():
    cfg = cell("scenario=infer", *SMALL_MQAR, "batch_size=3", "scenario.warmup=1", "scenario.batches=4")
    r = run(quality.run_infer, cfg)
    m = r.metrics
    assert len(r.artifacts["infer_latency_ms.json"]) == 4
    assert m["infer/latency_ms"] > 0 and m["infer/peak_mem_mb"] == m["infer/peak_mem_mb"]  # not NaN
    assert m["infer/tokens_per_s"] == pytest.approx(3 * 32 / (m["infer/latency_ms"] * 1e-3))
    assert "train/step_ms" not in m and r.tags["backend"] == "torch-matmul"


def test_full_trains_then_infers_and_checkpointing_matches():
    base = ["scenario=full", "scenario.warmup_steps=2", *SMALL_MQAR, "task.train.max_steps=6", "scenario.batches=2"]
    plain = run(quality.run_full, cell(*base))
    ckpt = run(quality.run_full, cell(*base, "trainer.grad_checkpointing=true"))
    for r in (plain, ckpt):
        assert {"train/step_ms", "val/acc", "infer/latency_ms", "infer/tokens_per_s"} <= r.metrics.keys()
    # same seed, same data: checkpointing changes memory and time, not the optimisation
    assert plain.series["train/loss"] == pytest.approx(ckpt.series["train/loss"], rel=1e-5)


def test_bad_run_settings_fail_before_compute():
    from pipeline.lightning_module import build_trainer

    with pytest.raises(ValueError, match="no timed step"):
        run(quality.run_train, cell("scenario=train", "scenario.warmup_steps=5", *SMALL_MQAR,
                                    "task.train.max_steps=5"))
    with pytest.raises(ValueError, match="spawn"):
        build_trainer({"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"}, max_steps=3)


def test_no_progress_bar_without_terminal():
    from pipeline.lightning_module import build_trainer

    trainer = build_trainer({"accelerator": "cpu", "devices": 1}, max_steps=3)
    assert trainer.progress_bar_callback is None  # pytest's stderr is not a tty
    assert trainer.logger is None and trainer.max_steps == 3


# ----------------------------------------------------------------------------- fidelity

FID_T = 128


def _fidelity(name: str, *extra: str) -> CellResult:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        base = compose("config", overrides=[f"model={name}"])
        knobs = []
        if "window" in base.model:  # a window covering half the sequence, no global tokens
            knobs += [f"model.window={FID_T // 2}"]
        if "global_tokens" in base.model:
            knobs += ["model.global_tokens=0"]
        cfg = compose("config", overrides=[f"model={name}", "task=fidelity", "scenario=train",
                                           f"seq_len={FID_T}", "batch_size=2", *knobs, *extra])
    return run(quality.run_train, cfg)


@pytest.mark.parametrize("name", discover_variants())
def test_fidelity_per_variant(name):
    from pipeline.registry import build_mixer

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        model = compose("config", overrides=[f"model={name}", f"seq_len={FID_T}"]).model
    mixer = build_mixer(model, d_model=64, n_heads=2)
    r = _fidelity(name)
    assert "train/loss" not in r.series  # fidelity does not train
    assert r.tags["backend"] and r.tags["backend"] != "unset"
    if not mixer.is_attention:
        assert "quality/rel_err_vs_exact" not in r.metrics and "quality/rel_err_uniform_mean" not in r.metrics
        assert "is_attention=False" in r.tags["quality_note"]
        return
    err, uni = r.metrics["quality/rel_err_vs_exact"], r.metrics["quality/rel_err_uniform_mean"]
    assert 0.5 < uni < 1.5  # the inputs make attention peaked, so the mean of v is far off
    assert r.metrics["quality/attn_eff_keys"] < FID_T / 4
    if mixer.exact:
        assert err < 1e-4
    else:
        assert 1e-3 < err < float("inf")
    if "window" in model and not mixer.exact:
        assert err < uni  # half the sequence in view must beat equal weights


def test_fidelity_reference_against_itself_is_zero():
    assert _fidelity("vanilla").metrics["quality/rel_err_vs_exact"] == 0.0


def test_fidelity_full_also_times_inference():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=["model=vanilla", "task=fidelity", "scenario=full", "seq_len=64",
                                           "scenario.batches=2"])
    r = run(quality.run_full, cfg)
    assert "quality/rel_err_vs_exact" in r.metrics and r.metrics["infer/latency_ms"] > 0


def test_fidelity_refuses_mismatched_weights():
    from torch import nn

    from pipeline.tasks import copy_shared_weights

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="same names"):
        copy_shared_weights(nn.Sequential(nn.Linear(4, 4)), Other())
