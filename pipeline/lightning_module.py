"""Training and inference loops: the LightningModule (loss, metrics, optimiser), the callbacks that
time steps and batches, and the Trainer built from the trainer config.

The architecture lives in models/ (TokenModel); this file owns everything about *running* it.
Loss is next-token cross-entropy over the positions a task scores (targets -100 elsewhere);
validation sums NLL, scored-token and correct counts across batches (and ranks), and the task
turns the sums into its `val/*` metrics.

    module = LitTokenModel(model, task, optim=cfg.task.train)
    timer = StepTimer(device, warmup_steps=5)
    trainer = build_trainer(cfg.trainer, max_steps=600, callbacks=[timer])
    trainer.fit(module, train_dataloaders=task.train_loader(128, 64, seed=0))
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
import warnings
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from pipeline.scenarios.base import Diverged
from pipeline.tasks import IGNORE

# Lightning's start-up lines ("GPU available: ...", "`Trainer.fit` stopped: `max_steps` reached")
# are INFO records on these loggers; a sweep prints them for every cell. Warnings still pass.
_CHATTY_LOGGERS = (
    "pytorch_lightning.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
    "pytorch_lightning.accelerators.cuda",
    "lightning_fabric.utilities.seed",
    "lightning_fabric.utilities.distributed",  # "Initializing distributed: GLOBAL_RANK ..." per rank
)


def quiet_lightning() -> None:
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def expected_warnings_silenced():
    """Silence the warnings that are expected by design here, and only those:
    - data is generated in the main process on purpose (`num_workers=0`), and streams have no length;
    - fit runs without a validation loader (validation is one pass after the last step);
    - predict_step returns nothing on purpose (only the time is wanted);
    - Lightning's own use of a torch pytree API that torch deprecated (not ours to fix)."""
    with warnings.catch_warnings():
        for message in (
            r".*does not have many workers.*",
            r".*Your `IterableDataset` has `__len__` defined.*",
            r".*You defined a `validation_step` but have no `val_dataloader`.*",
            r".*predict returned None.*",
            r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
        ):
            warnings.filterwarnings("ignore", message=message)
        yield


# ----------------------------------------------------------------------------- the module


class LitTokenModel(pl.LightningModule):
    """Owns the loss, the metrics and the optimiser around a TokenModel.

    optim keys (conf/task/*.yaml `train:`): lr, weight_decay, betas, warmup_steps, max_steps,
    min_lr_ratio (cosine decay to lr * min_lr_ratio at max_steps; 1.0 = constant after warm-up).
    """

    def __init__(self, model: torch.nn.Module, task, optim: Mapping[str, Any] | None = None):
        super().__init__()
        self.model, self.task = model, task
        self.optim_cfg = dict(optim or {})
        self.val_results: dict[str, float] = {}
        self._val_sums = torch.zeros(3, dtype=torch.float64)

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        return self.model(tokens_BT)

    @staticmethod
    def _loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        # float32 loss even under mixed precision: a bf16 log-softmax over the vocabulary is coarse
        return F.cross_entropy(logits_BTV.flatten(0, 1).float(), targets_BT.flatten(),
                               ignore_index=IGNORE, reduction=reduction)

    def training_step(self, batch, batch_idx):
        tokens_BT, targets_BT = batch
        loss = self._loss(self(tokens_BT), targets_BT)
        value = float(loss.detach())
        if not math.isfinite(value):
            # raised before backward: the weights are left as they were, and Lightning's
            # exception path tears the trainer down cleanly before re-raising
            raise Diverged(f"training loss is {value} at step {self.global_step}")
        return loss

    # --- validation: summed counts, reduced across ranks, turned into metrics by the task ---
    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(3, dtype=torch.float64, device=self.device)

    def validation_step(self, batch, batch_idx):
        tokens_BT, targets_BT = batch
        logits_BTV = self(tokens_BT)
        scored = targets_BT != IGNORE
        nll = self._loss(logits_BTV, targets_BT, reduction="sum")
        correct = ((logits_BTV.argmax(dim=-1) == targets_BT) & scored).sum()
        self._val_sums += torch.stack([nll.double(), scored.sum().double(), correct.double()])

    def on_validation_epoch_end(self) -> None:
        # under DDP every rank scores the whole (small) validation set: the summed counts are a
        # multiple of one rank's, so the ratios are the same and no sample is padded in twice
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        nll, n, correct = (float(s) for s in sums)
        if not math.isfinite(nll):
            raise Diverged(f"validation loss is {nll}")
        self.val_results = self.task.val_metrics(nll, int(n), int(correct))

    def predict_step(self, batch, batch_idx):
        tokens_BT, _ = batch
        self(tokens_BT)  # timed by InferTimer; nothing is kept (return_predictions=False)

    # --- optimiser ---
    def configure_optimizers(self):
        o = self.optim_cfg
        params = [p for p in self.parameters() if p.requires_grad]
        # decay matrices (weights, embeddings), not gains and biases: the usual AdamW split
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": float(o.get("weight_decay", 0.0))},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        opt = torch.optim.AdamW(groups, lr=float(o.get("lr", 1e-3)), betas=tuple(o.get("betas", (0.9, 0.98))))
        warmup = int(o.get("warmup_steps", 0))
        total = int(o.get("max_steps", 1))
        floor = float(o.get("min_lr_ratio", 1.0))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ----------------------------------------------------------------------------- callbacks


def _wait_share(w0: int | None, w1: int | None, dt_ms: float) -> float | None:
    """Run-queue nanoseconds between two SchedWait readings over the span's wall time."""
    return None if w0 is None or w1 is None else max(0, w1 - w0) / max(dt_ms * 1e6, 1.0)


class StepTimer(pl.Callback):
    """Per training step: wall time (device synchronised on both sides, the first `warmup_steps`
    steps excluded from `step_ms`), tokens in the step, and the loss (every step)."""

    def __init__(self, device: torch.device | str, warmup_steps: int = 5):
        from pipeline.evidence import SchedWait
        from pipeline.measure import sync

        self._sync, self.device, self.warmup_steps = sync, torch.device(device), warmup_steps
        self._sched = SchedWait()
        self.step_ms: list[float] = []
        self.step_wait: list[float | None] = []  # each timed step's run-queue wait over its wall time
        self.losses: list[float] = []
        self.tokens_per_step = 0
        self._t0 = 0.0
        self._seen = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(self.device)
        self._w0 = self._sched.read()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(self.device)
        dt_ms = (time.perf_counter() - self._t0) * 1e3
        if self._seen >= self.warmup_steps:
            self.step_ms.append(dt_ms)
            self.step_wait.append(_wait_share(self._w0, self._sched.read(), dt_ms))
        self._seen += 1
        self.tokens_per_step = int(batch[0].numel()) * trainer.world_size
        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
        self.losses.append(float(loss.detach()))


class InferTimer(pl.Callback):
    """Per predict batch: wall time, device synchronised, the first `warmup` batches excluded."""

    def __init__(self, device: torch.device | str, warmup: int = 2):
        from pipeline.evidence import SchedWait
        from pipeline.measure import sync

        self._sync, self.device, self.warmup = sync, torch.device(device), warmup
        self._sched = SchedWait()
        self.batch_ms: list[float] = []
        self.batch_wait: list[float | None] = []
        self.tokens_per_batch = 0
        self._t0 = 0.0
        self._seen = 0

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._sync(self.device)
        self._w0 = self._sched.read()
        self._t0 = time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._sync(self.device)
        dt_ms = (time.perf_counter() - self._t0) * 1e3
        if self._seen >= self.warmup:
            self.batch_ms.append(dt_ms)
            self.batch_wait.append(_wait_share(self._w0, self._sched.read(), dt_ms))
        self._seen += 1
        self.tokens_per_batch = int(batch[0].numel()) * trainer.world_size


# ----------------------------------------------------------------------------- trainer


def build_trainer(trainer_cfg: Mapping[str, Any], max_steps: int = -1, callbacks: list | None = None,
                  gradient_clip_val: float | None = None) -> pl.Trainer:
    """A Trainer from conf/trainer/*.yaml: no logger (the parent process records to MLflow), no
    checkpoints, no sanity validation, a progress bar only on an interactive terminal.

    The loop must run in this process (rank 0 of `ddp` is this process; other ranks re-run the
    same command), because the timing callbacks report from here. `*_spawn` strategies train
    in child processes and are refused."""
    quiet_lightning()
    t = dict(trainer_cfg)
    if "spawn" in str(t.get("strategy", "auto")):
        raise ValueError(
            f"trainer.strategy={t['strategy']} trains in spawned children, out of reach of the step "
            "timing; use strategy=ddp (Lightning's subprocess launcher keeps rank 0 in this process)"
        )
    return pl.Trainer(
        accelerator=t.get("accelerator", "auto"),
        devices=t.get("devices", 1),
        strategy=t.get("strategy", "auto"),
        precision=t.get("precision", "32-true"),
        max_steps=max_steps,
        max_epochs=-1 if max_steps > 0 else None,  # the training data is an endless stream
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=sys.stderr.isatty(),
        num_sanity_val_steps=0,
        callbacks=callbacks or [],
        gradient_clip_val=gradient_clip_val,
        use_distributed_sampler=False,  # streams are seeded per rank (pipeline/tasks.py)
    )
