"""Fault-injection mixers: each fails the way a real variant can, to test that the pipeline
records the failure with the right status and carries on, and (the last section) that each
conformance check catches the defect it is there for (tests/models/test_conformance.py)."""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from models.base import grouped_scores, grouped_values
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


# --------------------------------------------------- conformance: one mixer per defect a check catches
class UpcastsOutput(VanillaAttention):
    """shapes: hands back float32 whatever the input's dtype."""

    def forward(self, x_BTD):
        return super().forward(x_BTD).float()


class MixesTheBatch(VanillaAttention):
    """batch: subtracts half the batch mean from every output (a normalisation over the wrong axis)."""

    def forward(self, x_BTD):
        y = super().forward(x_BTD)
        return y - 0.5 * y.mean(dim=0, keepdim=True)


class DropoutInEval(VanillaAttention):
    """determinism: dropout that stays on in eval mode."""

    def forward(self, x_BTD):
        return torch.nn.functional.dropout(super().forward(x_BTD), p=0.1, training=True)


class DetachedGate(VanillaAttention):
    """gradients: a learnable output gate used through .detach(), so it never learns."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.gate = nn.Parameter(torch.ones(self.d_model))

    def forward(self, x_BTD):
        return super().forward(x_BTD) * self.gate.detach()


def _attention(m: VanillaAttention, x_BTD: torch.Tensor, scale: float, allowed_TT: torch.Tensor | None):
    q, k, v = m.split_heads(x_BTD)
    s = grouped_scores(q, k) * scale
    if allowed_TT is not None:
        s = s.masked_fill(~allowed_TT, float("-inf"))
    m.backend = "torch-matmul"
    return m.merge_heads(grouped_values(s.softmax(dim=-1), v))


class Unscaled(VanillaAttention):
    """exactness: claims exact softmax attention but leaves out the 1/sqrt(K) of the scores."""

    def forward(self, x_BTD):
        T = x_BTD.shape[1]
        return _attention(self, x_BTD, 1.0, torch.ones(T, T, dtype=torch.bool).tril() if self.causal else None)


class PeeksAhead(VanillaAttention):
    """causality: the causal mask is off by one, so each query also sees the next key."""

    def forward(self, x_BTD):
        T = x_BTD.shape[1]
        return _attention(self, x_BTD, self.head_dim ** -0.5,
                          torch.ones(T, T, dtype=torch.bool).tril(1) if self.causal else None)


class LeaksInBackward(VanillaAttention):
    """causality (backward): a causal forward plus a term that is exactly zero but carries the
    gradient of every later position (a custom kernel's backward that ignores the mask)."""

    def forward(self, x_BTD):
        later = x_BTD.flip(1).cumsum(1).flip(1)  # position t: the sum of inputs t .. T-1
        return super().forward(x_BTD) + (later - later.detach())


class MaskedWindow(VanillaAttention):
    """no-TxT: "sparse" sliding-window attention as a dense masked T x T score matrix."""

    materialises_scores, time_order, memory_order = False, 1.0, 1.0

    def forward(self, x_BTD):
        i = torch.arange(x_BTD.shape[1])
        allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] <= 16)
        return _attention(self, x_BTD, self.head_dim ** -0.5, allowed)


class RowChunkedDense(VanillaAttention):
    """time-order, memory-order: declares linear cost, but computes every query's full row of
    scores, 64 queries at a time: never a T x T tensor, yet T^2 work, and with autograd T^2 bytes
    kept for the backward."""

    materialises_scores, time_order, memory_order = False, 1.0, 1.0

    def forward(self, x_BTD):
        q, k, v = self.split_heads(x_BTD)
        k, v = k.repeat_interleave(self.n_heads // k.shape[1], 1), v.repeat_interleave(self.n_heads // v.shape[1], 1)
        T, rows = x_BTD.shape[1], []
        for lo in range(0, T, 64):
            s = q[:, :, lo:lo + 64] @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            if self.causal:
                s = s.masked_fill(torch.arange(T)[None, :] > torch.arange(lo, lo + s.shape[2])[:, None], float("-inf"))
            rows.append(s.softmax(dim=-1) @ v)
        self.backend = "row-chunks"
        return self.merge_heads(torch.cat(rows, dim=2))


class PrefillForgetsTheCache(VanillaAttention):
    """decoding: prefill returns the forward's output but leaves the KV cache empty."""

    def _prefill(self, x_BTD, state):
        y = self._forward(x_BTD)
        state.pos = x_BTD.shape[1]
        return y
