"""A third-party kernel as an attnbench mixer: `LocalAttention` from the local-attention package
(https://github.com/lucidrains/local-attention, `pip install -e '.[examples]'`), sliding-window
attention over blocks of `window` tokens: each query sees the keys of its own block and of the
block before it (and the block after it when bidirectional), so between `window` and 2 `window`
keys, never a T x T matrix.

A plain nn.Module: the constructor takes (d_model, n_heads, causal) and the package's knob, and
forward maps (B, T, D) to (B, T, D). The projections are named `qkv` and `out` like vanilla's,
so the conformance check and the fidelity task can put exact attention's weights in. Rotary
position embeddings, the package's default, are turned off: with them the scores are no longer
those of plain softmax attention, and fidelity against exact attention would measure the
embedding, not the window.

    python -m pipeline.conformance model=custom model._target_=examples.local_attention_mixer.LocalAttentionMixer \\
        model.window=128 model.time_order=1 model.memory_order=1
"""
from __future__ import annotations

import torch
from local_attention import LocalAttention
from torch import nn


class LocalAttentionMixer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, causal: bool = True, window: int = 128):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads, self.head_dim, self.causal = n_heads, d_model // n_heads, causal
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.attn = LocalAttention(window_size=window, causal=causal, look_backward=1,
                                   look_forward=0 if causal else 1, autopad=True, use_rotary_pos_emb=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(x_BTD).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y_BHTK = self.attn(q, k, v)
        return self.out(y_BHTK.transpose(1, 2).reshape(B, T, D))
