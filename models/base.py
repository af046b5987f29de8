"""The one interface every sequence mixer implements, and the capability flags the pipeline reads.

A mixer maps ``(B, T, D) -> (B, T, D)``. The pipeline never branches on a variant's name: it
reads the class attributes below and calls ``flops`` / ``memory_bytes`` / ``check_seq_len``.

Shape legend used across models/: B batch, T sequence length, D model width, H heads,
K head dim (D = H * K), M random features, W window, G global tokens, N state size.

    mixer = VanillaAttention(d_model=256, n_heads=4, causal=True)
    y_BTD = mixer(x_BTD)
"""
from __future__ import annotations

import torch
from torch import nn


class SequenceMixer(nn.Module):
    """Base class: validates the shared arguments and documents the capability flags."""

    # --- capabilities (read by the pipeline and the tests, never the class name) ---
    exact: bool = False  # computes exact softmax attention (up to float rounding)
    is_attention: bool = True  # approximates softmax attention, so fidelity vs exact is defined
    materialises_scores: bool = False  # builds a T x T tensor (allowed for exact-by-design only)
    time_order: float = 2.0  # promised exponent of T in forward time
    memory_order: float = 2.0  # promised exponent of T in activation memory
    devices: tuple[str, ...] = ("cpu", "cuda")  # device types it runs on

    def __init__(self, d_model: int, n_heads: int, causal: bool = True):
        super().__init__()
        if d_model <= 0 or n_heads <= 0:
            raise ValueError(f"d_model and n_heads must be positive, got {d_model} and {n_heads}")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.causal = causal
        # which kernel ran in the last forward; set by every forward, recorded as the run's `backend`
        self.backend: str = "unset"

    # --- analytic models -------------------------------------------------------
    def projection_flops(self, batch: int, seq_len: int) -> float:
        """Q, K, V and output projections: 4 GEMMs of (B*T, D) x (D, D), 2 FLOPs per multiply-add."""
        return 8.0 * batch * seq_len * self.d_model**2

    def mixing_flops(self, batch: int, seq_len: int) -> float:
        """FLOPs of the sequence mixing itself (what differs between variants). Forward only."""
        raise NotImplementedError

    def flops(self, batch: int, seq_len: int) -> dict[str, float]:
        """Useful forward FLOPs split into projection and mixing (2 FLOPs per multiply-add)."""
        proj, mix = self.projection_flops(batch, seq_len), self.mixing_flops(batch, seq_len)
        return {"projection": proj, "mixing": mix, "total": proj + mix}

    def memory_bytes(self, batch: int, seq_len: int, dtype_bytes: int = 4) -> int:
        """Predicted peak activation bytes of one forward with autograd on (used for pre-flight)."""
        raise NotImplementedError

    def check_seq_len(self, seq_len: int) -> None:
        """Raise ValueError with a one-line reason if this mixer cannot be benchmarked at seq_len."""
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, causal={self.causal}"


def exact_attention_flops(batch: int, heads: int, seq_len: int, head_dim: int, causal: bool) -> float:
    """QK^T and PV: 2 matmuls of T*T*K multiply-adds per head, 2 FLOPs each; causal needs half."""
    f = 4.0 * batch * heads * seq_len**2 * head_dim
    return f / 2 if causal else f


def causal_mask(t: int, device: torch.device) -> torch.Tensor:
    """Boolean (T, T) mask, True where attention is allowed (key index <= query index)."""
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()
