"""The small token model the quality tasks train: embedding -> blocks -> final norm -> head.

The sequence mixer is whatever `mixer_factory(d_model, n_heads)` builds, so every variant sits in
the same backbone and only the mixer differs. models/ never imports pipeline/: the caller passes
the factory (pipeline.registry.mixer_factory builds one from a conf/model yaml).

Inputs: each position embeds its own token, optionally its previous token
(`prev_token=True`, a second table with one extra row for "no previous token" at t=0), and
optionally its absolute position (`max_len` set: a learned table, GPT-2 style).
- Previous token: recall ("which value followed this key?") needs two hops in a causal model:
  each value position first learns to carry the key before it, then a query matches that key.
  The first hop is the induction-head pattern, which a small transformer acquires only after a
  long plateau (Olsson et al. 2022, "In-context Learning and Induction Heads"); H3 adds a shift
  SSM for exactly this hop (Fu et al. 2023, "Hungry Hungry Hippos"), and the Zoology models
  carry short convolutions for it (Arora et al. 2023). Giving every variant the previous token
  as input removes that plateau (measured on 4-pair MQAR at n=64, 2 layers, d=64: without it the
  loss sits at ln 4, "some value from the context", for all of 600 steps; with it accuracy is
  ~100% after 100 steps), so a minute of CPU training measures the mixer's retrieval,
  not how fast a previous-token head happens to form. It reaches one token back, so it does not
  widen any mixer's receptive field.
- Positions: attention is permutation-equivariant apart from the causal mask; with the
  previous token supplied, the recall task needs no absolute positions, and a causal model
  infers order anyway (Haviv et al. 2022, "Transformer Language Models without Positional
  Encodings Still Learn Positional Information"). Learned positions stay available as an option.
Shape legend as in models/base.py: B batch, T sequence length, D model width, V vocabulary.

    model = TokenModel(vocab_size=144, d_model=64, n_layers=2, n_heads=2, mlp_ratio=4,
                       mixer_factory=mixer_factory(model_cfg), prev_token=True)
    logits_BTV = model(tokens_BT)

    state = model.init_state(batch=1, max_len=T + k)     # greedy decoding
    logits_BTV, state = model.prefill(tokens_BT, state)
    logits_B1V, state = model.step(logits_BTV[:, -1:].argmax(-1), state)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from models.base import DecodeState, SequenceMixer
from models.blocks import Block


class TokenModel(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        mlp_ratio: int,
        mixer_factory: Callable[[int, int], SequenceMixer],
        grad_checkpointing: bool = False,
        max_len: int | None = None,
        prev_token: bool = False,
    ):
        super().__init__()
        if vocab_size < 1 or n_layers < 1:
            raise ValueError(f"vocab_size and n_layers must be positive, got {vocab_size} and {n_layers}")
        self.vocab_size, self.max_len = vocab_size, max_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model) if max_len is not None else None
        # row `vocab_size` stands for "no previous token" (position 0)
        self.prev_emb = nn.Embedding(vocab_size + 1, d_model) if prev_token else None
        self.blocks = nn.ModuleList(
            Block(mixer_factory(d_model, n_heads), d_model, mlp_ratio, grad_checkpointing)
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        # GPT-2's N(0, 0.02) for the embeddings; the default N(0, 1) makes the first LayerNorm's
        # input dominated by the token embedding and the position signal hard to pick up
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        for emb in (self.pos_emb, self.prev_emb):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)

    @property
    def mixers(self) -> list[SequenceMixer]:
        return [b.mixer for b in self.blocks]

    @property
    def backend(self) -> str:
        """The kernel(s) the mixers ran in the last forward, e.g. "torch-matmul"; "+"-joined when
        blocks differ (a kernel can choose per call, e.g. by length or dtype)."""
        return "+".join(sorted({m.backend for m in self.mixers}))

    def set_grad_checkpointing(self, enabled: bool) -> None:
        for b in self.blocks:
            b.grad_checkpointing = enabled

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        x_BTD = self._embed(tokens_BT)
        for block in self.blocks:
            x_BTD = block(x_BTD)
        return self.head(self.norm(x_BTD))  # (B, T, V)

    def _embed(self, tokens_BT: torch.Tensor, start: int = 0, prev_B1: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of tokens at positions start .. start+T-1; `prev_B1` is the token before
        them (None at the start of the sequence: the "no previous token" row)."""
        T = tokens_BT.shape[1]
        x_BTD = self.tok_emb(tokens_BT)
        if self.prev_emb is not None:
            start_B1 = torch.full_like(tokens_BT[:, :1], self.vocab_size) if prev_B1 is None else prev_B1
            prev_BT = torch.cat([start_B1, tokens_BT[:, :-1]], dim=1)  # token t-1 at position t
            x_BTD = x_BTD + self.prev_emb(prev_BT)
        if self.pos_emb is not None:
            if start + T > self.max_len:
                raise ValueError(f"sequence length {start + T} exceeds the position table's max_len={self.max_len}")
            x_BTD = x_BTD + self.pos_emb(torch.arange(start, start + T, device=tokens_BT.device))  # (T, D) broadcast
        return x_BTD

    # --- decoding: embedding -> blocks (norm, mixer.step, MLP) -> head, one token at a time
    def init_state(self, batch: int, max_len: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> LMState:
        """Every block's mixer state for `batch` sequences of up to `max_len` tokens."""
        if self.max_len is not None and max_len > self.max_len:
            raise ValueError(f"max_len={max_len} exceeds the position table's max_len={self.max_len}")
        return LMState([m.init_state(batch, max_len, device, dtype) for m in self.mixers])

    def state_bytes(self, batch: int, max_len: int, dtype_bytes: int = 4) -> int:
        """Analytic bytes of every block's mixer state (what LMState.nbytes measures)."""
        return sum(m.state_bytes(batch, max_len, dtype_bytes) for m in self.mixers)

    def prefill(self, tokens_BT: torch.Tensor, state: LMState) -> tuple[torch.Tensor, LMState]:
        """The prompt through the full forward, filling every block's state: logits (B, T, V)."""
        if state.pos != 0:
            raise ValueError(f"prefill needs an empty state (pos 0), got one at pos {state.pos}")
        x_BTD = self._embed(tokens_BT)
        for block, st in zip(self.blocks, state.blocks):
            x_BTD, _ = block.prefill(x_BTD, st)
        state.pos, state.last_B1 = tokens_BT.shape[1], tokens_BT[:, -1:]
        return self.head(self.norm(x_BTD)), state

    def step(self, tokens_B1: torch.Tensor, state: LMState) -> tuple[torch.Tensor, LMState]:
        """One token per sequence (B, 1) at position state.pos: its logits (B, 1, V)."""
        if tokens_B1.dim() != 2 or tokens_B1.shape[1] != 1:
            raise ValueError(f"step takes one token per sequence, shape (B, 1); got {tuple(tokens_B1.shape)}")
        x_B1D = self._embed(tokens_B1, start=state.pos, prev_B1=state.last_B1)
        for block, st in zip(self.blocks, state.blocks):
            x_B1D, _ = block.step(x_B1D, st)
        state.pos, state.last_B1 = state.pos + 1, tokens_B1
        return self.head(self.norm(x_B1D)), state


@dataclass
class LMState:
    """A TokenModel's decoding state: one mixer state per block, the position, and the last
    token consumed (the previous-token input of the next one)."""

    blocks: list[DecodeState]
    pos: int = 0
    last_B1: torch.Tensor | None = None

    def nbytes(self) -> int:
        """Measured bytes of every block's state tensors."""
        return sum(b.nbytes() for b in self.blocks)
