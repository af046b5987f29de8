"""Small mixers from outside models/, run with model=custom model._target_=tests.custom_mixers.<Class>:
a SequenceMixer subclass that declares its own flags and analytic models (some of them), a plain
nn.Module with none, and classes a config must refuse."""
from __future__ import annotations

import torch
from torch import nn

from models.base import SequenceMixer


class WindowedMixer(SequenceMixer):
    """Each position averages the values of the last `window` positions (itself included): O(T W)
    time, no analytic memory model (so pre-flight has none and says so)."""

    exact = False
    is_attention = False
    materialises_scores = False
    time_order = 1.0
    memory_order = 1.0

    def __init__(self, d_model: int, n_heads: int, causal: bool = True, window: int = 4):
        super().__init__(d_model, n_heads, causal)
        self.window = window
        self.v = nn.Linear(d_model, d_model)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        v_BTD = self.v(x_BTD)
        c_BTD = torch.cumsum(v_BTD, dim=1)
        shifted = torch.nn.functional.pad(c_BTD, (0, 0, self.window, 0))[:, : x_BTD.shape[1]]  # c at t - W
        counts = torch.arange(1, x_BTD.shape[1] + 1, device=x_BTD.device).clamp(max=self.window)
        self.backend = "cumsum"
        return (c_BTD - shifted) / counts.view(1, -1, 1).to(v_BTD.dtype)

    def mixing_flops(self, batch: int, seq_len: int) -> float:
        return 3.0 * batch * seq_len * self.d_model

    def projection_flops(self, batch: int, seq_len: int) -> float:
        return 2.0 * batch * seq_len * self.d_model * self.d_model


class PlainGate(nn.Module):
    """A plain module (no SequenceMixer): a causal running mean, gated per channel."""

    def __init__(self, d_model: int, n_heads: int, causal: bool = True, gain: float = 1.0):
        super().__init__()
        self.gate = nn.Linear(d_model, d_model)
        self.gain = gain

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(1, x_BTD.shape[1] + 1, device=x_BTD.device, dtype=x_BTD.dtype).view(1, -1, 1)
        return self.gain * torch.sigmoid(self.gate(x_BTD)) * torch.cumsum(x_BTD, dim=1) / steps


class NarrowArgs(nn.Module):
    """A constructor that does not take (d_model, n_heads, causal)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()


class NotAModule:
    def __init__(self, d_model: int, n_heads: int, causal: bool = True):
        pass


def not_a_class(d_model: int, n_heads: int, causal: bool = True):
    return None
