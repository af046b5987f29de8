"""The quality-side scenarios: `train`, `infer` and `full` (train, then infer the trained model).

- `train`: Lightning fit for the task's `train.max_steps`, then one validation pass. Step time
  (median and IQR, warm-up steps excluded), tokens/s, peak memory of the fit, the loss of every
  step, and the task's `val/*` metrics.
- `infer`: Lightning predict over `scenario.warmup + scenario.batches` batches of root
  `batch_size` sequences; per-batch latency, tokens/s, peak memory. On an untrained model (the
  `infer` scenario alone) this is a cost measurement, not a quality one.
- Tasks that do not train (`task.trains` false, i.e. fidelity) replace the training part of
  `train` and `full` with the task's own evaluation: one mixer against exact attention on the
  same weights and inputs; `full` then still times inference.

Batch sizes: training uses the task's `train.batch_size` (the quality figure is a property of
the task's whole budget: steps x batch x lr); `infer` and fidelity use the root `batch_size`
(the grid's cost axis). Arithmetic precision is `trainer.precision` (Lightning's), not
`backbone.dtype` (the kernel scenario's); fidelity runs in float32, since its figure is about
the approximation, not the arithmetic. A fidelity cell whose `backbone.dtype` is another one
also measures the error that dtype adds: the variant in that dtype against itself in float32,
next to plain PyTorch exact attention's (`quality/rel_err_vs_fp32_ref`, `precision_rule`).

    python -m pipeline.run scenario=full task=mqar model=vanilla seq_len=128
"""
from __future__ import annotations

import time

import torch

from pipeline import record as R
from pipeline.evidence import MachineWatch, loop_timing
from pipeline.measure import PeakMemory, loss_fall_last_quarter
from pipeline.scenarios.base import CellResult, Plan, register
from pipeline.schema import FullScenario, InferScenario, TrainScenario, Workload


def _build(w: Workload, task):
    """The token model for this cell, seeded: the same seed gives the same initial weights."""
    from models.lm import TokenModel
    from pipeline.registry import mixer_factory

    bb = w.backbone
    torch.manual_seed(w.seed)
    return TokenModel(
        vocab_size=task.vocab_size, d_model=int(bb.d_model), n_layers=int(bb.n_layers),
        n_heads=int(bb.n_heads), mlp_ratio=int(bb.mlp_ratio),
        mixer_factory=mixer_factory(w.model, causal=w.causal, n_kv_heads=bb.n_kv_heads),
        grad_checkpointing=bool(w.trainer.grad_checkpointing),
        max_len=w.seq_len if task.positions == "learned" else None,
        prev_token=task.prev_token,
    )


def _setup(w: Workload, result: CellResult):
    from pipeline.tasks import build_task

    task = build_task(w.task)
    task.check(w.seq_len)
    result.params[R.SEED] = w.seed
    result.params.update(task.describe())
    return task


def _max_over_ranks(value: float, device) -> float:
    """Peak memory of a multi-process run is the largest of its ranks' (DESIGN §9)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t)
    return value


def train_model(sc: TrainScenario | FullScenario, w: Workload, device, result: CellResult, task):
    """Fit for the task's budget, validate, fill train/* and val/*; returns the LightningModule."""
    from pipeline.lightning_module import (
        LitTokenModel,
        StepTimer,
        build_trainer,
        expected_warnings_silenced,
    )

    tr = dict(task.train)
    max_steps, warmup_steps = int(tr["max_steps"]), int(sc.warmup_steps)
    if max_steps <= warmup_steps:
        raise ValueError(f"task.train.max_steps={max_steps} leaves no timed step after "
                         f"scenario.warmup_steps={warmup_steps}")
    model = _build(w, task)
    for m in model.mixers:
        m.check_seq_len(w.seq_len)
    module = LitTokenModel(model, task, optim={**tr, "max_steps": max_steps})
    timer = StepTimer(device, warmup_steps=warmup_steps)
    trainer = build_trainer(vars(w.trainer), max_steps=max_steps, callbacks=[timer],
                            gradient_clip_val=tr.get("grad_clip"))
    train_dl = task.train_loader(w.seq_len, int(tr["batch_size"]), w.seed)
    with expected_warnings_silenced():
        t0 = time.perf_counter()
        watch = MachineWatch()
        with PeakMemory(device) as pm:
            trainer.fit(module, train_dataloaders=train_dl)
        steps = loop_timing(timer.step_ms, timer.step_wait, watch, world=trainer.world_size)
        fit_s = time.perf_counter() - t0
        val_dl = task.val_loader(w.seq_len, w.seed)
        t0 = time.perf_counter()
        trainer.validate(module, dataloaders=val_dl, verbose=False)
        val_s = time.perf_counter() - t0

    step_ms = result.add_timing(R.TRAIN_STEP_MS, steps, iqr=R.TRAIN_STEP_MS_IQR, minimum=R.TRAIN_STEP_MS_MIN).median
    result.metrics.update({
        R.TRAIN_STEPS: float(len(timer.losses)),
        R.TRAIN_TOKENS_PER_S: timer.tokens_per_step / (step_ms * 1e-3),
        R.TRAIN_PEAK_MEM_MB: _max_over_ranks(pm.peak_mb, trainer.strategy.root_device),
        R.TRAIN_FINAL_LOSS: timer.losses[-1],
        R.TRAIN_WORLD_SIZE: float(trainer.world_size),
        R.TRAIN_FIT_S: fit_s,  # the whole fit: every step, data generation and Lightning's own work
        R.VAL_WALL_S: val_s,
    })
    result.metrics.update(module.val_results)
    result.metrics.update(task.baselines(w.seq_len))
    fall = loss_fall_last_quarter(timer.losses)
    if fall is not None:
        result.metrics[R.TRAIN_LOSS_FALL] = fall
    result.series[R.TRAIN_LOSS] = timer.losses
    result.tags[R.MEMORY_METHOD] = pm.method
    result.artifacts["train_step_ms.json"] = steps.to_dict()
    result.note_backend(model.backend, model.mixers)
    return module


def infer_model(sc: InferScenario | FullScenario, w: Workload, device, result: CellResult, task,
                module=None) -> None:
    """Time the predict loop on `module` (a fresh, untrained model when None); fill infer/*."""
    from pipeline.lightning_module import (
        InferTimer,
        LitTokenModel,
        build_trainer,
        expected_warnings_silenced,
    )

    if int(sc.batches) < 1:
        raise ValueError(f"scenario.batches must be >= 1, got {sc.batches}")
    if module is None:
        model = _build(w, task)
        for m in model.mixers:
            m.check_seq_len(w.seq_len)
        module = LitTokenModel(model, task)
    timer = InferTimer(device, warmup=int(sc.warmup))
    trainer = build_trainer(vars(w.trainer), callbacks=[timer])
    dl = task.predict_loader(w.seq_len, w.batch_size, int(sc.warmup) + int(sc.batches), w.seed)
    watch = MachineWatch()
    with expected_warnings_silenced(), PeakMemory(device) as pm:
        trainer.predict(module, dataloaders=dl, return_predictions=False)
    batches = loop_timing(timer.batch_ms, timer.batch_wait, watch, world=trainer.world_size)
    latency = result.add_timing(R.INFER_LATENCY_MS, batches, iqr=R.INFER_LATENCY_MS_IQR,
                                minimum=R.INFER_LATENCY_MS_MIN).median
    result.metrics.update({
        R.INFER_TOKENS_PER_S: timer.tokens_per_batch / (latency * 1e-3),
        R.INFER_PEAK_MEM_MB: _max_over_ranks(pm.peak_mb, trainer.strategy.root_device),
    })
    result.tags[R.INFER_MEMORY_METHOD] = pm.method
    result.artifacts["infer_latency_ms.json"] = batches.to_dict()
    result.note_backend(module.model.backend, module.model.mixers)


def fidelity(w: Workload, device, result: CellResult, task) -> None:
    """One mixer against the exact reference on the same weights and inputs (no training).

    Variants that do not approximate attention (`is_attention` false) get no figure, and a
    `quality_note` tag saying why. The reference runs at the full length: it holds ~3 (B, H, T, T)
    float32 tensors, 1.6 GB at T=8192 with 2 heads."""
    from pipeline.fidelity import copy_shared_weights
    from pipeline.registry import build_mixer, load_variant_cfg

    bb, B, T = w.backbone, w.batch_size, w.seq_len
    torch.manual_seed(w.seed)
    variant = build_mixer(w.model, d_model=int(bb.d_model), n_heads=int(bb.n_heads), causal=w.causal,
                          n_kv_heads=bb.n_kv_heads)
    variant.check_seq_len(T)
    result.params[R.SEED] = w.seed
    if not variant.is_attention:
        with torch.no_grad():
            variant.to(device)(torch.zeros(1, min(T, 8), int(bb.d_model), device=device))  # sets backend
        result.tags[R.BACKEND] = variant.backend
        result.tags[R.QUALITY_NOTE] = (
            f"{type(variant).__name__} does not approximate softmax attention (is_attention=False): "
            "there is no exact output to compare with; see the trained tasks for its quality"
        )
        if str(bb.dtype) != "float32":  # its own error in the dtype still has a meaning: against itself
            torch.manual_seed(w.seed)
            reference = build_mixer(load_variant_cfg(task.reference), d_model=int(bb.d_model), n_heads=int(bb.n_heads),
                                    causal=w.causal).to(device).eval()
            _precision(bb, reference, variant.to(device).eval(), task.inputs(reference, B, T, w.seed, device), result)
        return
    torch.manual_seed(w.seed)
    reference = build_mixer(load_variant_cfg(task.reference), d_model=int(bb.d_model), n_heads=int(bb.n_heads),
                            causal=w.causal, n_kv_heads=bb.n_kv_heads)
    if not reference.exact:
        raise ValueError(f"task.reference={task.reference!r} is not an exact variant (exact=False)")
    copy_shared_weights(reference, variant)
    reference.to(device).eval()
    variant.to(device).eval()
    x_BTD = task.inputs(reference, B, T, w.seed, device)
    result.metrics.update(task.evaluate(reference, variant, x_BTD))
    result.note_backend(variant.backend, [variant])
    if str(bb.dtype) != "float32":
        _precision(bb, reference, variant, x_BTD, result)


def _precision(bb, reference, variant, x_BTD, result: CellResult) -> None:
    """The error backbone.dtype adds, against float32, next to plain exact attention's
    (FlashAttention's rule): pipeline/fidelity.py precision_errors."""
    from pipeline.fidelity import precision_errors

    metrics, rule = precision_errors(reference, variant, x_BTD, getattr(torch, str(bb.dtype)))
    result.metrics.update(metrics)
    result.tags[R.PRECISION_RULE] = rule


@register("train")
def run_train(sc: TrainScenario, w: Workload, plan: Plan, device: torch.device, result: CellResult) -> None:
    task = _setup(w, result)
    if task.trains:
        train_model(sc, w, device, result, task)
    else:
        fidelity(w, device, result, task)


@register("infer")
def run_infer(sc: InferScenario, w: Workload, plan: Plan, device: torch.device, result: CellResult) -> None:
    task = _setup(w, result)
    infer_model(sc, w, device, result, task)


@register("full")
def run_full(sc: FullScenario, w: Workload, plan: Plan, device: torch.device, result: CellResult) -> None:
    task = _setup(w, result)
    if task.trains:
        module = train_model(sc, w, device, result, task)
        infer_model(sc, w, device, result, task, module)
    else:
        fidelity(w, device, result, task)
        infer_model(sc, w, device, result, task)
