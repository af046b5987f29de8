"""The pre-norm residual block every backbone stacks: mixer sub-layer, then MLP sub-layer.

x + mixer(LN(x)), then x + MLP(LN(x)) (the GPT-2 / pre-LN arrangement, Xiong et al. 2020,
"On Layer Normalization in the Transformer Architecture", which trains without warm-up tricks).
Shape legend as in models/base.py: B batch, T sequence length, D model width.

    block = Block(mixer, d_model=64, mlp_ratio=4, grad_checkpointing=True)
    y_BTD = block(x_BTD)
    y_B1D, state = block.step(x_B1D, state)     # decoding: norm, mixer.step, MLP (see models/base.py)
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.base import DecodeState, SequenceMixer


class MLP(nn.Module):
    """Position-wise D -> ratio*D -> D with GELU."""

    def __init__(self, d_model: int, mlp_ratio: int):
        super().__init__()
        self.fc = nn.Linear(d_model, mlp_ratio * d_model)
        self.act = nn.GELU()
        self.proj = nn.Linear(mlp_ratio * d_model, d_model)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x_BTD)))


class Block(nn.Module):
    """Pre-norm residual block around one sequence mixer.

    With `grad_checkpointing`, the block's activations are not kept for backward: the block is
    recomputed during backward instead (`use_reentrant=False`, the form PyTorch recommends; it
    supports inputs that do not require grad and keyword arguments). Only while training with
    grad enabled: in eval or under no_grad there is nothing to save, so the plain call is used.
    """

    def __init__(self, mixer: SequenceMixer, d_model: int, mlp_ratio: int, grad_checkpointing: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.mixer = mixer
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, mlp_ratio)
        self.grad_checkpointing = grad_checkpointing

    def _body(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_BTD = x_BTD + self.mixer(self.norm1(x_BTD))
        return x_BTD + self.mlp(self.norm2(x_BTD))

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._body, x_BTD, use_reentrant=False)
        return self._body(x_BTD)

    # --- decoding: the same body around the mixer's prefill / step ---------------
    def prefill(self, x_BTD: torch.Tensor, state: DecodeState) -> tuple[torch.Tensor, DecodeState]:
        y_BTD, state = self.mixer.prefill(self.norm1(x_BTD), state)
        x_BTD = x_BTD + y_BTD
        return x_BTD + self.mlp(self.norm2(x_BTD)), state

    def step(self, x_B1D: torch.Tensor, state: DecodeState) -> tuple[torch.Tensor, DecodeState]:
        y_B1D, state = self.mixer.step(self.norm1(x_B1D), state)
        x_B1D = x_B1D + y_B1D
        return x_B1D + self.mlp(self.norm2(x_B1D)), state
