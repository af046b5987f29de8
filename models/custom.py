"""A user's plain nn.Module as a sequence mixer: `PlainMixer` wraps any module whose constructor
takes (d_model, n_heads, causal) plus its own knobs and whose forward maps (B, T, D) -> (B, T, D).

The module states no capabilities and no analytic models, so the wrapper carries what it is told
(`flags`: exact, is_attention, materialises_scores, time_order, memory_order; the rest keep
SequenceMixer's defaults) and has no `flops`, `memory_bytes` or `state_bytes`: their figures
are absent, never guessed. `backend` is the wrapped class's name; the state dict is the wrapped
module's own (no `inner.` prefix), so weights load as they would into the module itself.
A SequenceMixer subclass needs none of this: it is built directly and declares its own flags.

    mixer = PlainMixer(MyMixer, d_model=256, n_heads=4, causal=True, flags={"time_order": 1.0}, window=64)
    y_BTD = mixer(x_BTD)
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.base import SequenceMixer

_INNER = "inner."


class PlainMixer(SequenceMixer):
    def __init__(self, module_cls: type[nn.Module], d_model: int, n_heads: int, causal: bool = True,
                 flags: dict[str, Any] | None = None, n_kv_heads: int | None = None, **knobs: Any):
        super().__init__(d_model, n_heads, causal, n_kv_heads)  # refuses n_kv_heads < n_heads (no grouped_kv)
        for name, value in (flags or {}).items():
            if name.startswith("_") or not hasattr(SequenceMixer, name) or callable(getattr(SequenceMixer, name)):
                raise ValueError(f"{name} is not a capability flag of SequenceMixer")
            if isinstance(getattr(SequenceMixer, name), float):
                value = float(value)  # an order given as 1 reads as the built-ins' 1.0
            setattr(self, name, value)  # this instance's capability, read like a class's
        self.inner = module_cls(d_model=d_model, n_heads=n_heads, causal=causal, **knobs)
        self.wrapped = f"{module_cls.__module__}.{module_cls.__qualname__}"
        self.backend = module_cls.__name__
        # the wrapped module's parameter names, as in its own state dict
        self.register_state_dict_post_hook(_drop_inner_prefix)
        self.register_load_state_dict_pre_hook(_add_inner_prefix)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        self.backend = type(self.inner).__name__  # set by every forward, as every mixer's is
        y_BTD = self.inner(x_BTD)
        if not isinstance(y_BTD, torch.Tensor) or y_BTD.shape != x_BTD.shape:
            got = tuple(y_BTD.shape) if isinstance(y_BTD, torch.Tensor) else type(y_BTD).__name__
            raise ValueError(f"{self.backend} returned {got} for an input of shape {tuple(x_BTD.shape)}: "
                             "a mixer maps (B, T, D) -> (B, T, D)")
        return y_BTD

    # no analytic models: whoever reads them records the figure as absent
    def flops(self, batch: int, seq_len: int) -> dict[str, float]:
        raise NotImplementedError(f"{self.wrapped} has no analytic FLOP count")

    def memory_bytes(self, batch: int, seq_len: int, dtype_bytes: int = 4) -> int:
        raise NotImplementedError(f"{self.wrapped} has no analytic memory model")

    def extra_repr(self) -> str:
        return f"{self.wrapped}, " + super().extra_repr()


def _drop_inner_prefix(module: nn.Module, state: dict, prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state if k.startswith(prefix + _INNER)]:
        state[prefix + key[len(prefix) + len(_INNER):]] = state.pop(key)


def _add_inner_prefix(module: nn.Module, state: dict, prefix: str, *args: Any) -> None:
    for key in [k for k in state if k.startswith(prefix) and not k.startswith(prefix + _INNER)]:
        state[prefix + _INNER + key[len(prefix):]] = state.pop(key)
