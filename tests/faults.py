"""Fault-injection mixers: each fails the way a real variant can, to test that the pipeline
records the failure with the right status and carries on."""
from __future__ import annotations

import time

import torch

from models.vanilla import VanillaAttention


class Raising(VanillaAttention):
    def forward(self, x_BTD):
        raise ValueError("injected failure in forward")


class HugeAlloc(VanillaAttention):
    """Asks for far more memory than any machine has: the allocator refuses -> oom."""

    def forward(self, x_BTD):
        torch.empty(1 << 50, dtype=torch.uint8)  # 1 PiB
        return super().forward(x_BTD)


class _RefusedInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        torch.empty(1 << 50, dtype=torch.uint8)  # 1 PiB: the allocator refuses
        return g


class HugeBackward(VanillaAttention):
    """Its forward fits; its backward asks for more memory than any machine has."""

    def forward(self, x_BTD):
        return super().forward(_RefusedInBackward.apply(x_BTD))


class Sleepy(VanillaAttention):
    def forward(self, x_BTD):
        time.sleep(3600)
        return super().forward(x_BTD)


class NaNs(VanillaAttention):
    def forward(self, x_BTD):
        return super().forward(x_BTD) * float("nan")


class Killed(VanillaAttention):
    """Dies the way the kernel's OOM killer kills a process: SIGKILL, no chance to clean up."""

    def forward(self, x_BTD):
        import os
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


class SloppyInLowPrecision(VanillaAttention):
    """Claims to be exact, and is in float32; in a lower precision its output drifts by 3 %: the
    kind of kernel FlashAttention's rule (at most 2x plain PyTorch's error) is there to catch."""

    def forward(self, x_BTD):
        y = super().forward(x_BTD)
        return y if y.dtype == torch.float32 else y * 1.03
