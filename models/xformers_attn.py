"""Memory-efficient exact attention: xFormers' kernel where it runs, PyTorch's fused SDPA otherwise.

Owns `XformersAttention` and the SDPA dispatch helper `sdpa_recorded`, which runs
`torch.nn.functional.scaled_dot_product_attention` under one backend at a time so the backend
that actually ran is known (the longformer variant reuses it for its blocks). Keys and values
with fewer heads than the queries (grouped-query attention) go through SDPA's `enable_gqa`.

Both kernels compute softmax(Q K^T / sqrt(K)) V tile by tile with an online softmax
(Rabe & Staats 2021, "Self-attention does not need O(n^2) memory"; Dao et al. 2022,
FlashAttention), so time stays O(T^2 K) but activation memory is O(T K): no T x T tensor.

Kernel choice (recorded in `self.backend`, the reason for not using xFormers in
`self.fallback_reason`, the xFormers operator that ran in `self.backend_detail`; never a
silent fallback):
- `backend="auto"`: `xformers.ops.memory_efficient_attention` on CUDA tensors when xFormers
  imports and its dispatcher accepts the inputs (fp16/bf16, and fp32 where its operators
  support it); otherwise SDPA.
- `backend="xformers"`: xFormers or a clear error (CPU tensors, missing/broken build).
- `backend="sdpa"`: SDPA only.
An xFormers wheel built for another PyTorch cannot load its C++ extension; its attention
operators that call PyTorch's own kernels still run then (see `xformers_build_note`).
SDPA backends are tried singly in a fixed order (CPU: flash; CUDA: flash, efficient, cuDNN);
if none accepts the inputs, the math backend runs and the names of the refusals are recorded.

Decoding uses vanilla's preallocated KV cache; each step's one query runs through the same
choice of kernel (xFormers on CUDA where its dispatcher accepts one query, SDPA otherwise).

    attn = XformersAttention(d_model=256, n_heads=4, causal=True)
    y_BTD = attn(x_BTD); print(attn.backend)   # e.g. "sdpa-flash" on CPU, "xformers" on a GPU
"""
from __future__ import annotations

import functools
import re
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.base import exact_attention_flops
from models.vanilla import VanillaAttention

_SDPA_NAMES = {
    SDPBackend.FLASH_ATTENTION: "sdpa-flash",
    SDPBackend.EFFICIENT_ATTENTION: "sdpa-efficient",
    SDPBackend.CUDNN_ATTENTION: "sdpa-cudnn",
    SDPBackend.MATH: "sdpa-math",
}
# the fused backends worth trying per device type, best first; MATH is the explicit last resort
_SDPA_ORDER = {
    "cpu": (SDPBackend.FLASH_ATTENTION,),
    "cuda": (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION),
}
BACKENDS = ("auto", "xformers", "sdpa")


def sdpa_recorded(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    attn_mask: torch.Tensor | None = None, is_causal: bool = False,
) -> tuple[torch.Tensor, str, str | None]:
    """SDPA under one backend at a time; returns (output, backend name, why fused ones refused).

    Each fused backend runs alone inside `sdpa_kernel([b])`, so a success names the kernel that
    ran. Only the "no available kernel" refusal moves on to the next one (an OOM or a real error
    propagates); the refusal warnings PyTorch emits are collected into the returned reason.
    """
    refusals: list[str] = []
    for b in _SDPA_ORDER.get(q.device.type, ()):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel([b]):
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                         enable_gqa=k.shape[-3] != q.shape[-3])
                return out, _SDPA_NAMES[b], "; ".join(refusals) or None
            except RuntimeError as err:
                if "No available kernel" not in str(err):
                    raise
                why = _refusal_text([str(w.message) for w in caught]) or str(err)
                refusals.append(f"{_SDPA_NAMES[b]} refused: {why}")
    with sdpa_kernel([SDPBackend.MATH]):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                             enable_gqa=k.shape[-3] != q.shape[-3])
    return out, _SDPA_NAMES[SDPBackend.MATH], "; ".join(refusals) or f"no fused SDPA for {q.device.type}"


def _refusal_text(messages: list[str]) -> str:
    """PyTorch's "kernel not used because" warnings, minus the source locations and the notes
    about backends that `sdpa_kernel` itself switched off for this attempt."""
    keep = []
    for msg in messages:
        msg = re.sub(r"\s*\(Triggered internally at [^)]*\)\.?", "", msg).strip()
        if msg and "runtime disabled" not in msg and not msg.endswith("not used because:"):
            keep.append(msg)
    return " ".join(keep)


@functools.lru_cache(maxsize=1)
def load_xformers_ops():
    """(xformers.ops, None) or (None, reason). Imported lazily: on CPU-only builds the import warns."""
    try:
        import xformers.ops as xops  # optional, heavy, and noisy on CPU-only builds
    except Exception as err:  # noqa: BLE001 - a broken build can raise anything; it is recorded
        return None, f"xformers import failed: {type(err).__name__}: {err}"
    return xops, None


@functools.lru_cache(maxsize=1)
def xformers_build_note() -> str | None:
    """None when xFormers' C++ extension loaded; otherwise what is known and what was done.

    An xFormers wheel loads its `_C` extension only with the PyTorch it was built against
    (0.0.35: torch 2.10 + cu128). When that fails, xFormers marks itself "not built with CUDA"
    and refuses every CUDA operator, although its attention operators on NVIDIA GPUs do not need
    `_C` at all: `fa2F/fa2B@<v>-pt` call PyTorch's bundled FlashAttention-2
    (`aten::_flash_attention_forward`) when the flash-attn package is absent, and `cutlassF/B`
    call `aten::_efficient_attention_forward`; xFormers itself checks at import that the running
    PyTorch's schemas for them are the ones it expects. In that case (CUDA build of PyTorch,
    those operators present) the flag is lifted so its dispatcher picks among them, and this
    note goes into the run's `backend_detail` tag. Anything else is left refused.
    """
    xops, _ = load_xformers_ops()
    if xops is None or torch.version.cuda is None:
        return None
    try:
        from xformers import _cpp_lib
        from xformers.ops.fmha import common as fmha_common
        from xformers.ops.fmha import cutlass, flash
    except Exception as err:  # noqa: BLE001 - layout of another xFormers release
        return f"xformers internals not as expected ({type(err).__name__}: {err}); nothing changed"
    load_error = getattr(_cpp_lib, "_cpp_library_load_exception", None)
    if load_error is None or getattr(fmha_common, "_built_with_cuda", True):
        return None
    why = _one_line(str(load_error), limit=300) or type(load_error).__name__
    pt_ops = [op.NAME for op in (flash.FwOp, flash.BwOp) if getattr(flash, "_USE_PT_FLASH_ATTN", False)]
    if str(getattr(cutlass.FwOp.OPERATOR, "_qualified_op_name", "")).startswith("aten::"):
        pt_ops += [cutlass.FwOp.NAME, cutlass.BwOp.NAME]
    if not pt_ops:
        return f"xformers C++ extension not loaded ({why}); no PyTorch-backed operator to use"
    fmha_common._built_with_cuda = True
    return (f"xformers C++ extension not loaded ({why}); "
            f"dispatching among its PyTorch-backed operators {', '.join(pt_ops)}")


def _one_line(text: str, limit: int = 1500) -> str:
    """A multi-line message (xFormers' per-operator refusals) as one line, capped."""
    flat = " | ".join(line.strip() for line in text.splitlines() if line.strip())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _forward_op_name(xops, q, k, v, bias, needs_gradient: bool) -> str:
    """Name of the forward operator xFormers' dispatcher picks for these inputs (e.g.
    "fa2F@2.8.3-pt", "cutlassF-pt"); raises its NotImplementedError when there is none."""
    fmha = xops.fmha
    dispatch = getattr(getattr(fmha, "dispatch", None), "_dispatch_fw", None)
    if dispatch is None:  # another release's layout: the call itself will still dispatch
        return "unknown"
    return dispatch(fmha.Inputs(query=q, key=k, value=v, attn_bias=bias), needs_gradient).NAME


class XformersAttention(VanillaAttention):
    """Exact softmax attention without the T x T matrix. Same `qkv`/`out` weights as vanilla."""

    exact = True
    materialises_scores = False
    time_order = 2.0
    memory_order = 1.0

    def __init__(self, d_model: int, n_heads: int, causal: bool = True, bias: bool = False,
                 backend: str = "auto", n_kv_heads: int | None = None):
        super().__init__(d_model, n_heads, causal, bias, n_kv_heads=n_kv_heads)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend_choice = backend
        # why the xFormers kernel did not run in the last forward (None when it ran)
        self.fallback_reason: str | None = None
        # which xFormers operator ran, and how the build was loaded (None when it did not run)
        self.backend_detail: str | None = None
        # the operator name per input signature: asking the dispatcher costs a second dispatch,
        # which timed forwards should not pay on every call
        self._op_names: dict[tuple, str] = {}

    def _xformers_unavailable(self, x: torch.Tensor) -> str | None:
        """Why xFormers cannot run on x (None when it may): device first, then the import."""
        if x.device.type != "cuda":
            return f"xformers memory_efficient_attention needs CUDA tensors, got {x.device.type}"
        if self.n_kv_heads != self.n_heads:
            return (f"grouped-query attention (n_kv_heads={self.n_kv_heads} of {self.n_heads}) runs through SDPA's "
                    "enable_gqa here: xFormers' 5-D grouped layout is not wired in")
        reason = load_xformers_ops()[1]
        if reason is None:
            xformers_build_note()  # before the first dispatch: may enable PyTorch-backed operators
        return reason

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self._forward(x_BTD)

    def _forward(self, x_BTD: torch.Tensor, state=None) -> torch.Tensor:
        """The forward; with a state (prefill), its keys and values also go into the KV cache."""
        B, T, _ = x_BTD.shape
        if self.backend_choice != "sdpa":
            reason = self._xformers_unavailable(x_BTD)
            if reason is None:
                y_BTHK, reason = self._xformers(x_BTD, state)
                if y_BTHK is not None:
                    self.backend, self.fallback_reason = "xformers", None
                    return self.out(y_BTHK.reshape(B, T, self.d_model))
            if self.backend_choice == "xformers":
                raise RuntimeError(f"backend='xformers' cannot run here: {reason}")
        else:
            reason = "backend='sdpa' requested"
        self.backend_detail = None
        q_BHTK, k_BHTK, v_BHTK = self.split_heads(x_BTD)
        if state is not None:
            self._cache_prompt(state, k_BHTK, v_BHTK)
        y_BHTK, self.backend, refused = sdpa_recorded(q_BHTK, k_BHTK, v_BHTK, is_causal=self.causal)
        self.fallback_reason = reason if refused is None else f"{reason}; {refused}"
        return self.merge_heads(y_BHTK)

    def _xformers(self, x_BTD: torch.Tensor, state=None) -> tuple[torch.Tensor | None, str | None]:
        """xFormers on the [B, M, H, K] layout, or (None, reason) when its dispatcher has no operator.
        With a state (prefill), the keys and values also go into its KV cache."""
        xops, _ = load_xformers_ops()
        B, T, _ = x_BTD.shape
        qkv_BT3HK = self.qkv(x_BTD).view(B, T, 3, self.n_heads, self.head_dim)
        q_BTHK, k_BTHK, v_BTHK = qkv_BT3HK.unbind(2)  # last-dim stride 1 is all xFormers needs
        if state is not None:
            self._cache_prompt(state, k_BTHK.transpose(1, 2), v_BTHK.transpose(1, 2))
        bias = xops.LowerTriangularMask() if self.causal else None
        try:
            needs_grad = torch.is_grad_enabled() and q_BTHK.requires_grad
            sig = (q_BTHK.device, q_BTHK.dtype, tuple(q_BTHK.shape), needs_grad)
            if sig not in self._op_names:
                self._op_names[sig] = _forward_op_name(xops, q_BTHK, k_BTHK, v_BTHK, bias, needs_grad)
            y_BTHK = xops.memory_efficient_attention(q_BTHK, k_BTHK, v_BTHK, attn_bias=bias)
        except NotImplementedError as err:  # fmha dispatch: "No operator found for ..." + why, per op
            return None, f"xformers has no operator for these inputs: {_one_line(str(err))}"
        self.backend_detail = "; ".join(x for x in (f"op {self._op_names[sig]}", xformers_build_note()) if x)
        return y_BTHK, None

    # --- decoding: vanilla's KV cache, one query through the fused kernels ------
    def _step(self, x_B1D: torch.Tensor, state) -> torch.Tensor:
        """One query against the n cached keys: xFormers where it runs and accepts the shapes
        (CUDA), otherwise SDPA's fused kernels; `backend` / `fallback_reason` as in forward. The
        query is the newest position, so no mask: it may see every cached key."""
        q_BH1K, k_BHnK, v_BHnK = self._step_qkv(x_B1D, state)
        if self.backend_choice != "sdpa":
            reason = self._xformers_unavailable(x_B1D)
            if reason is None:
                y_B1HK, reason = self._xformers_step(q_BH1K, k_BHnK, v_BHnK)
                if y_B1HK is not None:
                    self.backend, self.fallback_reason = "xformers", None
                    return self.out(y_B1HK.reshape(x_B1D.shape[0], 1, self.d_model))
            if self.backend_choice == "xformers":
                raise RuntimeError(f"backend='xformers' cannot run here: {reason}")
        else:
            reason = "backend='sdpa' requested"
        self.backend_detail = None
        y_BH1K, self.backend, refused = sdpa_recorded(q_BH1K, k_BHnK, v_BHnK, is_causal=False)
        self.fallback_reason = reason if refused is None else f"{reason}; {refused}"
        return self.merge_heads(y_BH1K)

    def _xformers_step(self, q_BH1K, k_BHnK, v_BHnK) -> tuple[torch.Tensor | None, str | None]:
        """xFormers on [B, M, H, K] views of the cache (no copy), or (None, reason)."""
        xops, _ = load_xformers_ops()
        q = q_BH1K.transpose(1, 2).contiguous()  # one row; the cache stays a view
        k, v = k_BHnK.transpose(1, 2), v_BHnK.transpose(1, 2)
        try:
            # the operator is looked up once per query shape, not per cache length (every step's)
            sig = ("step", q.device, q.dtype, tuple(q.shape))
            if sig not in self._op_names:
                self._op_names[sig] = _forward_op_name(xops, q, k, v, None, False)
            y_B1HK = xops.memory_efficient_attention(q, k, v)
        except NotImplementedError as err:
            return None, f"xformers has no operator for these inputs: {_one_line(str(err))}"
        self.backend_detail = "; ".join(x for x in (f"op {self._op_names[sig]}", xformers_build_note()) if x)
        return y_B1HK, None

    def mixing_flops(self, batch: int, seq_len: int) -> float:
        # useful work only; the fused kernels skip (most of) the masked half in causal mode
        return exact_attention_flops(batch, self.n_heads, seq_len, self.head_dim, self.causal)

    def memory_bytes(self, batch: int, seq_len: int, dtype_bytes: int = 4) -> int:
        # the fused kernels keep O(T K) per head: q, k, v, output and its gradient-side copies
        # (~8 (B, T, D) tensors, as vanilla's linear part) plus the log-sum-exp row statistics
        linear = batch * seq_len * (6 * self.d_model + 2 * self.kv_dim)
        lse = batch * self.n_heads * seq_len  # fp32 always
        return int(linear * dtype_bytes + 4 * lse)
