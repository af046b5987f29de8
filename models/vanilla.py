"""Vanilla softmax attention: softmax(Q K^T / sqrt(K)) V with the T x T score matrix built.

The textbook form (Vaswani et al. 2017, eq. 1). It is the reference the other variants are
tested and scored against, and the O(T^2)-memory baseline of every benchmark.

Grouped-query attention (`n_kv_heads` = H_kv < H; Ainslie et al. 2023, GQA; 1 is multi-query,
Shazeer 2019): keys and values have H_kv heads, each shared by H / H_kv consecutive query heads;
the scores are computed per group without copying the keys.

Decoding keeps a preallocated KV cache, k and v of shape (B, H_kv, max_len, K) each: a step
writes its key and value at its position and attends over the n cached ones, O(n D) time and
O(n H_kv K) memory per token; `state_bytes` = 2 B max_len H_kv K dtype_bytes.

    attn = VanillaAttention(d_model=256, n_heads=4)
    y_BTD = attn(x_BTD)
"""
from __future__ import annotations

import math

import torch
from torch import nn

from models.base import (
    DecodeState,
    SequenceMixer,
    causal_mask,
    exact_attention_flops,
    grouped_scores,
    grouped_values,
)


class VanillaAttention(SequenceMixer):
    exact = True
    materialises_scores = True
    time_order = 2.0
    memory_order = 2.0
    grouped_kv = True

    def __init__(self, d_model: int, n_heads: int, causal: bool = True, bias: bool = False,
                 n_kv_heads: int | None = None):
        super().__init__(d_model, n_heads, causal, n_kv_heads)
        self.qkv = nn.Linear(d_model, d_model + 2 * self.kv_dim, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)

    def split_heads(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project and split into heads: q (B, H, T, K), k and v (B, H_kv, T, K)."""
        B, T, _ = x_BTD.shape
        if self.n_kv_heads == self.n_heads:
            qkv_BT3HK = self.qkv(x_BTD).view(B, T, 3, self.n_heads, self.head_dim)
            q_BHTK, k_BHTK, v_BHTK = qkv_BT3HK.permute(2, 0, 3, 1, 4).unbind(0)
            return q_BHTK, k_BHTK, v_BHTK
        q_BTD, k_BTd, v_BTd = self.qkv(x_BTD).split([self.d_model, self.kv_dim, self.kv_dim], dim=-1)
        K = self.head_dim
        return (q_BTD.view(B, T, self.n_heads, K).transpose(1, 2), k_BTd.view(B, T, self.n_kv_heads, K).transpose(1, 2),
                v_BTd.view(B, T, self.n_kv_heads, K).transpose(1, 2))

    def merge_heads(self, y_BHTK: torch.Tensor) -> torch.Tensor:
        B, H, T, K = y_BHTK.shape
        return self.out(y_BHTK.transpose(1, 2).reshape(B, T, H * K))  # (B, T, D)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self._forward(x_BTD)

    def _forward(self, x_BTD: torch.Tensor, state: DecodeState | None = None) -> torch.Tensor:
        """The forward; with a state (prefill), its keys and values also go into the state."""
        q_BHTK, k_BHTK, v_BHTK = self.split_heads(x_BTD)
        if state is not None:
            self._cache_prompt(state, k_BHTK, v_BHTK)
        T = x_BTD.shape[1]
        s_BHTT = grouped_scores(q_BHTK, k_BHTK) / math.sqrt(self.head_dim)
        if self.causal:
            s_BHTT = s_BHTT.masked_fill(~causal_mask(T, x_BTD.device), float("-inf"))
        p_BHTT = s_BHTT.softmax(dim=-1)
        self.backend = "torch-matmul"
        return self.merge_heads(grouped_values(p_BHTT, v_BHTK))

    # --- decoding: a preallocated KV cache -------------------------------------
    def _new_state(self, batch, max_len, device, dtype):
        shape = (batch, self.n_kv_heads, max_len, self.head_dim)
        return {"k": torch.zeros(shape, device=device, dtype=dtype),
                "v": torch.zeros(shape, device=device, dtype=dtype)}, {}

    def state_bytes(self, batch: int, max_len: int, dtype_bytes: int = 4) -> int:
        return 2 * batch * max_len * self.kv_dim * dtype_bytes

    def _cache_prompt(self, state: DecodeState, k_BHTK: torch.Tensor, v_BHTK: torch.Tensor) -> None:
        T = k_BHTK.shape[2]
        state.tensors["k"][:, :, :T].copy_(k_BHTK)
        state.tensors["v"][:, :, :T].copy_(v_BHTK)

    def _prefill(self, x_BTD: torch.Tensor, state: DecodeState) -> torch.Tensor:
        y_BTD = self._forward(x_BTD, state)
        state.pos = x_BTD.shape[1]
        return y_BTD

    def _step_qkv(self, x_B1D: torch.Tensor, state: DecodeState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project one token, append its key and value to the cache: q (B, H, 1, K) and the
        cached keys and values of positions 0 .. pos, (B, H, pos+1, K) views."""
        q_BH1K, k_BH1K, v_BH1K = self.split_heads(x_B1D)
        i = state.pos
        kc, vc = state.tensors["k"], state.tensors["v"]
        kc[:, :, i:i + 1].copy_(k_BH1K)
        vc[:, :, i:i + 1].copy_(v_BH1K)
        return q_BH1K, kc[:, :, :i + 1], vc[:, :, :i + 1]

    def _step(self, x_B1D: torch.Tensor, state: DecodeState) -> torch.Tensor:
        q_BH1K, k_BHnK, v_BHnK = self._step_qkv(x_B1D, state)
        s_BH1n = grouped_scores(q_BH1K, k_BHnK) / math.sqrt(self.head_dim)
        self.backend = "torch-matmul"
        return self.merge_heads(grouped_values(s_BH1n.softmax(dim=-1), v_BHnK))

    def mixing_flops(self, batch: int, seq_len: int) -> float:
        # counts the useful work; this kernel computes the masked half too (the report says so)
        return exact_attention_flops(batch, self.n_heads, seq_len, self.head_dim, self.causal)

    def memory_bytes(self, batch: int, seq_len: int, dtype_bytes: int = 4) -> int:
        # scores, (masked scores), probabilities: ~3 live (B, H, T, T) tensors at the peak,
        # plus O(T*D) projections (keys and values H_kv K wide)
        scores = 3 * batch * self.n_heads * seq_len**2
        linear = batch * seq_len * (6 * self.d_model + 2 * self.kv_dim)
        return int((scores + linear) * dtype_bytes)
