"""The train / infer / full scenarios on the real configs, shrunk for a CPU: training lowers the
loss, a non-finite loss is reported as divergence, inference is timed, and fidelity scores each
discovered variant against exact attention."""
from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from pipeline import record as R
from pipeline.config import to_dict
from pipeline.execute import preflight
from pipeline.registry import CONF_DIR
from pipeline.scenarios import quality
from pipeline.scenarios.base import CellResult, Diverged
from pipeline.schema import scenario_section, workload
from tests.support import variant_params

SMALL_MQAR = ["task=mqar", "task.num_pairs=2", "task.num_keys=8", "task.num_values=8", "task.val_samples=64",
              "seq_len=32", "task.train.batch_size=16", "task.train.warmup_steps=5"]


pytestmark = pytest.mark.usefixtures("one_thread")


def cell(*overrides: str):
    """The real root config with the given overrides (vanilla unless a test says otherwise)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("config", overrides=["model=vanilla", *overrides])


def run(fn, cfg) -> CellResult:
    """A scenario as the child side calls it: its own section, the workload, pre-flight's plan."""
    d, device = to_dict(cfg), torch.device("cpu")
    result = CellResult()
    fn(scenario_section(d), workload(d), preflight(d, device), device, result)
    return result


def test_train_lowers_loss_and_reports():
    cfg = cell("scenario=train", "scenario.warmup_steps=2", *SMALL_MQAR, "task.train.max_steps=40")
    r = run(quality.run_train, cfg)
    loss = r.series[R.TRAIN_LOSS]
    assert len(loss) == 40 and all(math.isfinite(v) for v in loss)
    assert sum(loss[-5:]) / 5 < loss[0] - 0.5
    m = r.metrics
    assert m[R.TRAIN_STEPS] == 40
    assert len(r.artifacts["train_step_ms.json"]["ms"]) == 40 - 2  # warm-up steps left out
    assert m[R.TRAIN_STEP_MS] > 0 and m[R.TRAIN_STEP_MS_IQR] >= 0
    assert m[R.TRAIN_TOKENS_PER_S] == pytest.approx(16 * 32 / (m[R.TRAIN_STEP_MS] * 1e-3))
    assert 0.0 <= m[R.VAL_ACC] <= 1.0 and math.isfinite(m[R.VAL_LOSS])
    assert m[R.VAL_ACC_CHANCE] == pytest.approx(1 / 8)
    assert r.tags[R.BACKEND] == "torch-matmul" and r.params["seed"] == 0
    assert r.tags[R.MEMORY_METHOD]
    assert R.INFER_LATENCY_MS not in m
    q = loss[30:40]
    assert m[R.TRAIN_LOSS_FALL] == pytest.approx((sum(loss[20:30]) / 10 - sum(q) / 10) / (sum(q) / 10))


def test_code_lm_beats_unigram():
    cfg = cell("scenario=train", "scenario.warmup_steps=2", "task=code_lm", "seq_len=64", "task.max_train_chars=100000",
               "task.max_val_chars=8000", "task.train.max_steps=60", "task.train.batch_size=16",
               "task.train.warmup_steps=5")
    m = run(quality.run_train, cfg).metrics
    assert m[R.VAL_BPC] == pytest.approx(m[R.VAL_LOSS] / math.log(2))
    assert 3.0 < m[R.VAL_BPC_UNIGRAM] < 6.5
    assert m[R.VAL_BPC] < m[R.VAL_BPC_UNIGRAM]


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
    assert r.metrics[R.VAL_ACC] < 0.5


def test_infer_times_batches():
    cfg = cell("scenario=infer", *SMALL_MQAR, "batch_size=3", "scenario.warmup=1", "scenario.batches=4")
    r = run(quality.run_infer, cfg)
    m = r.metrics
    assert len(r.artifacts["infer_latency_ms.json"]["ms"]) == 4
    assert m[R.INFER_LATENCY_MS] > 0 and m[R.INFER_PEAK_MEM_MB] == m[R.INFER_PEAK_MEM_MB]  # not NaN
    assert m[R.INFER_TOKENS_PER_S] == pytest.approx(3 * 32 / (m[R.INFER_LATENCY_MS] * 1e-3))
    assert R.TRAIN_STEP_MS not in m and r.tags[R.BACKEND] == "torch-matmul"


def test_full_trains_then_infers_and_checkpointing_matches():
    base = ["scenario=full", "scenario.warmup_steps=2", *SMALL_MQAR, "task.train.max_steps=6", "scenario.batches=2"]
    plain = run(quality.run_full, cell(*base))
    ckpt = run(quality.run_full, cell(*base, "trainer.grad_checkpointing=true"))
    for r in (plain, ckpt):
        assert {R.TRAIN_STEP_MS, R.VAL_ACC, R.INFER_LATENCY_MS, R.INFER_TOKENS_PER_S} <= r.metrics.keys()
    # same seed, same data: checkpointing changes memory and time, not the optimisation
    assert plain.series[R.TRAIN_LOSS] == pytest.approx(ckpt.series[R.TRAIN_LOSS], rel=1e-5)


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


@pytest.mark.parametrize("name", variant_params())
def test_fidelity_per_variant(name):
    from pipeline.registry import build_mixer

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        model = compose("config", overrides=[f"model={name}", f"seq_len={FID_T}"]).model
    mixer = build_mixer(model, d_model=64, n_heads=2)
    r = _fidelity(name)
    assert R.TRAIN_LOSS not in r.series  # fidelity does not train
    assert r.tags[R.BACKEND] and r.tags[R.BACKEND] != "unset"
    if not mixer.is_attention:
        assert R.QUALITY_REL_ERR_VS_EXACT not in r.metrics and R.QUALITY_REL_ERR_UNIFORM_MEAN not in r.metrics
        assert "is_attention=False" in r.tags[R.QUALITY_NOTE]
        return
    err, uni = r.metrics[R.QUALITY_REL_ERR_VS_EXACT], r.metrics[R.QUALITY_REL_ERR_UNIFORM_MEAN]
    assert 0.5 < uni < 1.5  # the inputs make attention peaked, so the mean of v is far off
    assert r.metrics[R.QUALITY_ATTN_EFF_KEYS] < FID_T / 4
    if mixer.exact:
        assert err < 1e-4
    else:
        assert 1e-3 < err < float("inf")
    if "window" in model and not mixer.exact:
        assert err < uni  # half the sequence in view must beat equal weights


def test_fidelity_reference_against_itself_is_zero():
    assert _fidelity("vanilla").metrics[R.QUALITY_REL_ERR_VS_EXACT] == 0.0


def test_fidelity_full_also_times_inference():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=["model=vanilla", "task=fidelity", "scenario=full", "seq_len=64",
                                           "scenario.batches=2"])
    r = run(quality.run_full, cfg)
    assert R.QUALITY_REL_ERR_VS_EXACT in r.metrics and r.metrics[R.INFER_LATENCY_MS] > 0


def test_fidelity_refuses_mismatched_weights():
    from torch import nn

    from pipeline.fidelity import copy_shared_weights

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="same names"):
        copy_shared_weights(nn.Sequential(nn.Linear(4, 4)), Other())


@pytest.mark.parametrize("name", variant_params())
def test_a_lower_precision_is_measured_against_float32_and_judged_for_exact_variants(name):
    r = _fidelity(name, "backbone.dtype=bfloat16")
    err, base = r.metrics[R.QUALITY_REL_ERR_VS_FP32_REF], r.metrics[R.QUALITY_REL_ERR_TORCH_SAME_DTYPE]
    assert 1e-4 < base < 0.05 and 0 < err < 1  # bfloat16 keeps 8 bits: errors of a few 1e-3
    rule = r.tags[R.PRECISION_RULE]
    if name in ("vanilla", "xformers"):
        assert rule.startswith("pass: ") and "bfloat16" in rule, rule
    else:
        assert rule.startswith("not judged: "), rule
    assert R.QUALITY_REL_ERR_VS_FP32_REF not in _fidelity("vanilla").metrics  # float32 cells: nothing to add


def test_an_exact_kernel_that_errs_more_than_plain_pytorch_in_bf16_fails_the_rule():
    r = _fidelity("custom", "model._target_=tests.faults.SloppyInLowPrecision", "model.name=sloppy",
                  "backbone.dtype=bfloat16")
    assert r.metrics[R.QUALITY_REL_ERR_VS_FP32_REF] > 2 * r.metrics[R.QUALITY_REL_ERR_TORCH_SAME_DTYPE]
    assert r.tags[R.PRECISION_RULE].startswith("fail: "), r.tags[R.PRECISION_RULE]
