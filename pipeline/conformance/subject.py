"""The mixer under test (`Subject`) and a check's result (`Outcome`), shared by the checks and the CLI."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.registry import build_mixer


@dataclass
class Outcome:
    check: str
    status: str  # pass | fail | info | skip
    reason: str

    def line(self) -> str:
        return f"  {self.status:<4}  {self.check:<13} {self.reason}"


@dataclass
class Subject:
    """The mixer under test: its model config (name, _target_, knobs) and the shape it is built at."""
    model: dict
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int | None = None
    causal: bool = True
    device: str = "cpu"

    def build(self, dtype: torch.dtype = torch.float32, causal: bool | None = None, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        m = build_mixer(self.model, d_model=self.d_model, n_heads=self.n_heads,
                        causal=self.causal if causal is None else causal, n_kv_heads=self.n_kv_heads)
        return m.to(device=self.device, dtype=dtype).eval()

    def refusal(self, m: torch.nn.Module, dtype: torch.dtype, backward: bool = False) -> str | None:
        refuse = getattr(m, "refusal", None)
        return refuse(torch.device(self.device).type, dtype_name(dtype), backward) if refuse else None

    def lengths(self, m: torch.nn.Module, wanted: tuple[int, ...]) -> tuple[tuple[int, ...], list[str]]:
        """The lengths of `wanted` the mixer accepts (its check_seq_len), and why it refuses the others."""
        ok, refused = [], []
        for T in wanted:
            try:
                if hasattr(m, "check_seq_len"):
                    m.check_seq_len(T)
                ok.append(T)
            except ValueError as e:
                refused.append(f"T={T} refused ({e})")
        return tuple(ok), refused

    def x(self, B: int, T: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(B, T, self.d_model, generator=g).to(device=self.device, dtype=dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _moved(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest change from b to a, relative to b's largest entry (0 when identical)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if a.numel() else 0.0


LEAK = 1e-5  # a change this small, relative to the largest output, is rounding, not information
