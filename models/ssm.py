"""Diagonal state-space mixer, S4D-style (Gu et al. 2022, "On the Parameterization and
Initialization of Diagonal State Space Models"), computed as an FFT convolution in O(T log T).

Owns `S4DMixer`. Per channel d of D (after an input projection), a complex diagonal SSM
    x_t = Abar x_{t-1} + Bbar u_t,   y_t = 2 Re(C x_t) + Dskip u_t
with N/2 complex modes (N = `state_size`; the conjugate half is implied by 2 Re), S4D-Lin init
A_n = -1/2 + i pi n, B = 1, C ~ CN(0, 1), dt log-uniform in [dt_min, dt_max], and zero-order
hold: Abar = exp(dt A), Bbar = (exp(dt A) - 1) / A. Unrolled, y = K * u + Dskip u with kernel
    K[l] = 2 Re( sum_n C_n Bbar_n Abar_n^l ),   l = 0 .. T-1.
The Vandermonde product is done as one batched complex matmul without the (D, N/2, T) power
table: with l = l0 + L0 l1 (L0 ~ sqrt T), Abar^l = Abar^l0 * Abar^(L0 l1), so
K[l0 + L0 l1] = sum_n (C Bbar Abar^l0)[l0, n] (Abar^(L0 l1))[n, l1]; the powers are formed in
float64 (phase accuracy of exp(i pi n dt l) at large l) and the matmul runs in complex64.
The convolution is `torch.fft.rfft` of length 2T (no wrap-around), pointwise product, irfft.
Bidirectional: a second, independent kernel K' acts on the reversed sequence,
y_t = sum_{s<=t} K[t-s] u_s + sum_{s>=t} K'[s-t] u_s, placed at the negative lags of the same
length-2T circular kernel, so it costs one FFT convolution too.
Then y = GELU(y + Dskip u) and an output projection, as the S4D block does.

`forward_recurrent` steps the recurrence in a Python loop over time (complex128): the test
oracle for the FFT path, never the timed one. `is_attention = False`: there is no softmax
attention to compare against.

FLOP count (`mixing_flops`; the FFT counts use the usual 2.5 n log2 n per real FFT of length n,
i.e. half of 5 n log2 n for a complex one): kernel matmul D * T * N/2 complex multiply-adds
(8 real FLOPs each) per direction, rfft of the input and of the kernel plus one irfft, and the
pointwise complex product (6 FLOPs per frequency); projections are in `projection_flops`.

Decoding (causal): the recurrence itself, one (B, D, N/2) complex state, O(D N) per token;
prefill computes the state after the prompt in one pass (`_state_after`). `state_bytes` =
B D (N/2) 2 max(dtype_bytes, 4).

    ssm = S4DMixer(d_model=256, n_heads=4, causal=True, state_size=64)
    y_BTD = ssm(x_BTD)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.base import SequenceMixer
from models.knobs import check_knob


class S4DMixer(SequenceMixer):
    """S4D-Lin diagonal SSM over D channels with input/output projections; FFT convolution."""

    exact = False
    is_attention = False
    materialises_scores = False
    time_order = 1.0  # T log T
    memory_order = 1.0
    constant_state = True  # decoding keeps the (D, N/2) complex state, whatever the context

    kv_heads_refusal = "a state-space model has no keys or values (no KV cache to shrink)"

    def __init__(self, d_model: int, n_heads: int, causal: bool = True, state_size: int = 64,
                 dt_min: float = 1e-3, dt_max: float = 1e-1, bias: bool = False, n_kv_heads: int | None = None):
        super().__init__(d_model, n_heads, causal, n_kv_heads)  # n_heads only validates D; the SSM has none
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        self.state_size = check_knob("state_size", state_size)
        D, Nh = d_model, self.state_size // 2
        self.n_dir = 1 if causal else 2  # direction 1 runs on the reversed sequence
        self.in_proj = nn.Linear(D, D, bias=bias)
        self.out = nn.Linear(D, D, bias=bias)
        log_dt = torch.rand(self.n_dir, D) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = nn.Parameter(log_dt)  # (n_dir, D)
        self.log_neg_re_a = nn.Parameter(torch.full((self.n_dir, D, Nh), math.log(0.5)))  # Re A = -1/2
        self.im_a = nn.Parameter(math.pi * torch.arange(Nh, dtype=torch.float32).expand(self.n_dir, D, Nh).clone())
        self.c = nn.Parameter(torch.randn(self.n_dir, D, Nh, 2) * math.sqrt(0.5))  # complex as (re, im)
        self.d_skip = nn.Parameter(torch.randn(D))

    def _discrete(self, dtype=torch.complex128) -> tuple[torch.Tensor, torch.Tensor]:
        """(log Abar = dt A, C Bbar) per (direction, channel, mode), ZOH with B = 1."""
        # float64 whatever the module's dtype: parameters are tiny, and powers of Abar need the range
        a = torch.complex(-torch.exp(self.log_neg_re_a.double()), self.im_a.double()).to(dtype)  # (n_dir, D, Nh)
        dta = torch.exp(self.log_dt.double()).unsqueeze(-1) * a
        cb = torch.view_as_complex(self.c.double().contiguous()).to(dtype) * (torch.exp(dta) - 1) / a
        return dta, cb

    def _split_powers(self, T: int) -> tuple[torch.Tensor, ...]:
        """(dta, C Bbar, Abar^l0, Abar^(L0 l1)) for the split l = l0 + L0 l1 of the lags l < T:
        powers (n_dir, D, Nh, L0) and (n_dir, D, Nh, L1), complex128. The kernel and the prefill's
        state both use them (computing them is most of the kernel's time)."""
        dta, cb = self._discrete()
        L0 = math.isqrt(T - 1) + 1 if T > 1 else 1
        L1 = -(-T // L0)
        l0 = torch.arange(L0, device=dta.device, dtype=torch.float64)
        l1 = torch.arange(L1, device=dta.device, dtype=torch.float64) * L0
        return dta, cb, torch.exp(dta.unsqueeze(-1) * l0), torch.exp(dta.unsqueeze(-1) * l1)

    def kernel(self, T: int, powers: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """K[dir, d, l] for l < T, float32 (n_dir, D, T), via the split Vandermonde matmul."""
        _, cb, p0, p1 = self._split_powers(T) if powers is None else powers
        L0, L1 = p0.shape[-1], p1.shape[-1]
        v0 = cb.unsqueeze(-1) * p0  # (n_dir, D, Nh, L0)
        v1 = p1  # (n_dir, D, Nh, L1)
        k = v0.to(torch.complex64).transpose(-2, -1) @ v1.to(torch.complex64)  # (n_dir, D, L0, L1)
        k = k.transpose(-2, -1).reshape(self.n_dir, self.d_model, L0 * L1)[..., :T]
        return 2 * k.real

    def _circular_kernel(self, T: int, powers: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """(D, 2T) real kernel: causal lags at 0..T-1, anti-causal ones at the end (negative lags)."""
        k = self.kernel(T, powers)
        kf = F.pad(k[0], (0, T))  # (D, 2T)
        if self.n_dir == 2:
            kb = k[1]
            kf = kf.clone()
            kf[:, 0] = kf[:, 0] + kb[:, 0]
            kf[:, T + 1:] = kf[:, T + 1:] + kb[:, 1:].flip(-1)  # lag -s sits at index 2T - s
        return kf

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self._forward(x_BTD)

    def _forward(self, x_BTD: torch.Tensor, state=None) -> torch.Tensor:
        """The forward; with a state (prefill, causal), the recurrent state after the prompt
        also goes into it."""
        T = x_BTD.shape[1]
        u_BDT = self.in_proj(x_BTD).transpose(1, 2)
        powers = None
        if state is not None:
            powers = self._split_powers(T)
            state.tensors["s"].copy_(self._state_after(u_BDT, state.tensors["s"].dtype, powers))
        k_DS = self._circular_kernel(T, powers).to(u_BDT.dtype)  # S = 2T
        # FFTs in fp32 at least: half-precision FFT is limited to power-of-two sizes on CUDA
        work = torch.promote_types(u_BDT.dtype, torch.float32)
        uf_BDF = torch.fft.rfft(u_BDT.to(work), n=2 * T)
        kf_DF = torch.fft.rfft(k_DS.to(work), n=2 * T)
        y_BDT = torch.fft.irfft(uf_BDF * kf_DF, n=2 * T)[..., :T].to(u_BDT.dtype)
        y_BDT = F.gelu(y_BDT + self.d_skip.unsqueeze(-1) * u_BDT)
        self.backend = "fft-conv"
        return self.out(y_BDT.transpose(1, 2))

    # --- decoding: the diagonal recurrence ---------------------------------------
    # state s (B, D, N/2) complex with C Bbar absorbed, as in forward_recurrent:
    #   s_t = Abar s_{t-1} + C Bbar u_t,   y_t = 2 Re(sum_n s_t,n)
    # complex64 (complex128 for a float64 module): it sums over the whole context.
    @staticmethod
    def _state_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.complex128 if dtype == torch.float64 else torch.complex64

    def _new_state(self, batch, max_len, device, dtype):
        cdt = self._state_dtype(dtype)
        dta, cb = self._discrete()
        consts = {"abar": torch.exp(dta[0]).to(device=device, dtype=cdt), "cb": cb[0].to(device=device, dtype=cdt)}
        return {"s": torch.zeros(batch, self.d_model, self.state_size // 2, device=device, dtype=cdt)}, consts

    def state_bytes(self, batch: int, max_len: int, dtype_bytes: int = 4) -> int:
        return batch * self.d_model * (self.state_size // 2) * 2 * max(dtype_bytes, 4)  # complex: 2 reals

    def _state_after(self, u_BDT: torch.Tensor, cdt: torch.dtype, powers: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """s_{T-1} = C Bbar sum_t Abar^(T-1-t) u_t, (B, D, N/2), in O(B D T N) without a
        (D, N/2, T) power table: with lag l = T-1-t = l0 + L0 l1 (L0 ~ sqrt T), Abar^l =
        Abar^l0 Abar^(L0 l1), so the sum is a batched matmul over l0, then a weighted sum over
        l1 (the kernel's split Vandermonde product, applied to the input instead)."""
        B, D, T = u_BDT.shape
        _, cb, p0, p1 = (t[0] for t in powers)  # causal: direction 0 only
        Nh, L0, L1 = p0.shape[-2], p0.shape[-1], p1.shape[-1]
        u_lag = F.pad(u_BDT.flip(-1), (0, L0 * L1 - T))  # lag l at index l; lags >= T are 0
        u_DXL = u_lag.reshape(B, D, L1, L0).permute(1, 0, 2, 3).reshape(D, B * L1, L0).to(cdt)
        inner_DBLN = (u_DXL @ p0.transpose(-2, -1).to(cdt)).view(D, B, L1, Nh)  # sum over l0
        s_DBN = (inner_DBLN * p1.transpose(-2, -1).to(cdt).unsqueeze(1)).sum(2) * cb.to(cdt).unsqueeze(1)
        return s_DBN.transpose(0, 1)

    def _prefill(self, x_BTD: torch.Tensor, state) -> torch.Tensor:
        y_BTD = self._forward(x_BTD, state)
        state.pos = x_BTD.shape[1]
        return y_BTD

    def _step(self, x_B1D: torch.Tensor, state) -> torch.Tensor:
        s = state.tensors["s"]
        u_BD = self.in_proj(x_B1D)[:, 0]
        s.mul_(state.consts["abar"]).add_(state.consts["cb"] * u_BD.unsqueeze(-1).to(s.dtype))
        y_BD = (2 * s.sum(-1).real).to(u_BD.dtype)
        y_BD = F.gelu(y_BD + self.d_skip * u_BD)
        self.backend = "recurrent-step"
        return self.out(y_BD).unsqueeze(1)

    @torch.no_grad()
    def forward_recurrent(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """Step-by-step recurrence in complex128 (Python loop over T): test oracle only."""
        B, T, D = x_BTD.shape
        u_BTD = self.in_proj(x_BTD).double()
        dta, cb = self._discrete()
        abar = torch.exp(dta)  # (n_dir, D, Nh)

        def scan(u_BTD: torch.Tensor, d: int) -> torch.Tensor:
            # state absorbs C Bbar so that y_t = 2 Re(sum_n state_n)
            s = torch.zeros(B, D, abar.shape[-1], dtype=torch.complex128, device=x_BTD.device)
            ys = []
            for t in range(T):
                s = abar[d] * s + cb[d] * u_BTD[:, t, :, None]
                ys.append(2 * s.sum(-1).real)
            return torch.stack(ys, dim=1)  # (B, T, D)

        y = scan(u_BTD, 0)
        if self.n_dir == 2:
            y = y + scan(u_BTD.flip(1), 1).flip(1)
        y = F.gelu(y + self.d_skip.double() * u_BTD).to(x_BTD.dtype)
        self.backend = "recurrent-reference"
        return self.out(y)

    def projection_flops(self, batch: int, seq_len: int) -> float:
        # in_proj and out: 2 GEMMs of (B*T, D) x (D, D)
        return 4.0 * batch * seq_len * self.d_model**2

    def mixing_flops(self, batch: int, seq_len: int) -> float:
        T, D, Nh = seq_len, self.d_model, self.state_size // 2
        kernel = 8.0 * self.n_dir * D * T * Nh
        n = 2 * T
        fft = 2.5 * n * math.log2(n)
        ffts = (2 * batch + 1) * D * fft  # rfft(u), irfft(y) per batch row; rfft(K) once
        pointwise = 6.0 * batch * D * (T + 1)
        return kernel + ffts + pointwise

    def memory_bytes(self, batch: int, seq_len: int, dtype_bytes: int = 4) -> int:
        T, D, Nh = seq_len, self.d_model, self.state_size // 2
        L = math.isqrt(max(T - 1, 0)) + 1
        # u, padded FFT input/output (2T real), spectra (T+1 complex = 2 reals) x2, gelu in/out, output
        per_row = (1 + 2 + 2 * 2 + 2 + 2 + 1) * D * T
        kernel = self.n_dir * D * T * (2 + 2) + 4 * self.n_dir * D * Nh * 2 * L * 2  # K, its spectrum; powers
        linear = 2 * batch * T * D
        return int((batch * per_row + kernel + linear) * dtype_bytes)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, state_size={self.state_size}"
