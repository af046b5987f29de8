"""Longformer's pattern (sliding window + global tokens) through PyTorch's FlexAttention.

Owns `FlexWindowAttention`: the projections, knobs (`window`, `global_tokens`), pattern, analytic
FLOP and memory models and decoding ring buffer of `LongformerAttention` (models/longformer.py,
whose docstring states the pattern), with the forward computed by a compiled
`torch.nn.attention.flex_attention` over a `BlockMask` instead of our blockwise SDPA calls, so a
sweep shows a library kernel and ours on the same pattern side by side.

The block mask comes from arithmetic on blocks, never from a mask evaluated over a (T, T) grid.
Positions are cut into nb = ceil(T / b) blocks of b = `block_size`; for query block m and key
block n the pattern's bounds on the blocks' first and last real positions say whether no pair is
allowed (the block is skipped), every pair is (a full block: no mask work in the kernel), or some
are (a partial block: `mask_mod` decides per pair inside the kernel). The tables are the ones
FlexAttention's BlockMask holds, a row of nb key blocks per query block: (nb, nb) int32 each,
4 (T/b)^2 bytes (1 MiB at T = 65536, b = 128), block-level and far from T^2.
`create_block_mask` would instead evaluate mask_mod over all T^2 pairs (1.8 s at T = 1024 on a
2-core CPU).

The kernel is `flex_attention` under torch.compile, compiled once per process and specialised by
it per shape, dtype and pattern (on a 2-core CPU ~18 s the first time, ~3.5 s per new shape,
much less when inductor's on-disk cache has it). Uncompiled, flex_attention is a dense reference
that builds the (T, T) scores, so the forward refuses, in one line, wherever the eager path would
run instead: under a TorchDispatchMode (torch.compile skips the frame: FlopCounterMode, shape
recorders), with dynamo disabled, and past dynamo's recompile limit (raised, not fallen back).

Where it runs (torch 2.13): on CPU the forward only, in float32, bfloat16 or float16 (inductor's
CPU template has no float64, and FlexAttention no CPU backward); on CUDA both. `refusal` states
it, and the forward raises that line instead of running another kernel.

Grouped-query attention: flex_attention's `enable_gqa`, so key/value heads are read, not repeated.

    attn = FlexWindowAttention(d_model=256, n_heads=4, causal=True, window=512, global_tokens=16)
    with torch.no_grad():                     # CPU: forward only
        y_BTD = attn(x_BTD)
"""
from __future__ import annotations

import functools
import warnings

import torch

from models.knobs import check_knob
from models.longformer import LongformerAttention

# dynamo's default (8) would be reached by a process that meets more shapes than that (a test
# session, a sweep server); past it the call is refused (fail_on_recompile_limit_hit) rather
# than left to run the dense eager path
_RECOMPILE_LIMIT = 64
_EAGER_WARNING = "flex_attention called without torch.compile"

_compiled = None  # the compiled flex_attention, made on first use (importing this compiles nothing)


def compiled_flex_attention():
    """torch.compile(flex_attention), one per process. dynamic=False: each length gets a kernel
    specialised to it, as a benchmark cell wants, instead of one generic over T."""
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def pattern_mod(window: int, global_tokens: int, causal: bool):
    """The pattern as FlexAttention's mask_mod (query i, key j), the docstring's of longformer.py."""
    w, g = window, global_tokens
    if causal:
        def allowed(b, h, i, j):
            return (j <= i) & ((i - j <= w) | (j < g))  # a global query i < g sees j <= i < g anyway
    else:
        def allowed(b, h, i, j):
            return ((i - j).abs() <= w) | (j < g) | (i < g)
    return allowed


def block_pattern(seq_len: int, window: int, global_tokens: int, causal: bool, block: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full): boolean (nb, nb) over (query block m, key block n). Block m holds the real
    positions i0 .. i1 (i1 = min(mb + b, T) - 1), block n likewise j0 .. j1; padding beyond T is
    not counted (FlexAttention masks it, seq_lengths = (T, T))."""
    T, w, g, b = seq_len, window, global_tokens, block
    nb = -(-T // b)
    first = torch.arange(nb, device=device) * b
    last = (first + b).clamp(max=T) - 1
    i0, i1 = first.view(nb, 1), last.view(nb, 1)
    j0, j1 = first.view(1, nb), last.view(1, nb)
    # i - j over the block pair spans [i0 - j1, i1 - j0]; among keys j >= g (not global) the
    # farthest from a query is max(j0, g), among queries i >= g the farthest is max(i0, g)
    if causal:
        some = (j0 <= i1) & (((i0 - j1 <= w) & (i1 - j0 >= 0)) | (j0 < g))
        every = (j1 <= i0) & ((j1 < g) | (i1 - j0.clamp(min=g) <= w))
    else:
        some = ((i0 - j1 <= w) & (j0 - i1 <= w)) | (j0 < g) | (i0 < g)
        every = (i1 < g) | (j1 < g) | (torch.maximum(i1 - j0.clamp(min=g), j1 - i0.clamp(min=g)) <= w)
    return some & ~every, every


def _ordered(sel_MN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BlockMask's layout of a boolean (nb, nb) block table: per query block the count of its
    selected key blocks, (1, 1, nb), and their indices first, in order, (1, 1, nb, nb)."""
    nb = sel_MN.shape[0]
    count = sel_MN.sum(-1).to(torch.int32)
    idx = torch.argsort(sel_MN.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return count.view(1, 1, nb), idx.view(1, 1, nb, nb)


@functools.lru_cache(maxsize=16)
def window_block_mask(seq_len: int, window: int, global_tokens: int, causal: bool, block: int,
                      device: str, with_q_blocks: bool):
    """The BlockMask of the pattern at one length on one device, kept: repeated calls (benchmark
    repeats, decoding prefills, the blocks of a model) reuse it and its mask_mod object, so the
    compiled kernel's guards match without recompiling. `with_q_blocks`: also the transposed
    tables the backward needs (skipped where there is no backward)."""
    from torch.nn.attention.flex_attention import BlockMask

    partial_MN, full_MN = block_pattern(seq_len, window, global_tokens, causal, block, torch.device(device))
    kv_num, kv_idx = _ordered(partial_MN)
    full_num, full_idx = _ordered(full_MN)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block,
                                    mask_mod=pattern_mod(window, global_tokens, causal),
                                    seq_lengths=(seq_len, seq_len), compute_q_blocks=with_q_blocks)


class FlexWindowAttention(LongformerAttention):
    """Longformer's sliding window + global tokens, computed by compiled FlexAttention."""

    exact = False
    is_attention = True
    materialises_scores = False
    time_order = 1.0
    memory_order = 1.0
    grouped_kv = True
    runs_compiled = True  # uncompiled, flex_attention is a dense reference (see the module's docstring)
    backward_devices = ("cuda",)  # FlexAttention has no CPU backward (NotImplementedError)
    dtypes = {"cpu": ("float32", "bfloat16", "float16")}  # inductor's CPU template: no float64

    def __init__(self, d_model: int, n_heads: int, causal: bool = True, bias: bool = False,
                 window: int = 512, global_tokens: int = 16, block_size: int = 128, n_kv_heads: int | None = None):
        super().__init__(d_model, n_heads, causal, bias, window=window, global_tokens=global_tokens,
                         n_kv_heads=n_kv_heads)
        self.block_size = check_knob("block_size", block_size)

    def _refuse(self, x_BTD: torch.Tensor) -> None:
        """Raise the one line that says why this call cannot run the compiled kernel."""
        needs_grad = torch.is_grad_enabled() and (x_BTD.requires_grad or any(p.requires_grad for p in self.parameters()))
        why = self.refusal(x_BTD.device.type, str(x_BTD.dtype).removeprefix("torch."), backward=needs_grad)
        if why is None and _dispatch_mode_active():
            why = (f"{type(self).__name__} runs only compiled, and torch.compile skips it under a TorchDispatchMode "
                   "(a FLOP counter, a shape recorder): eager flex_attention would build the T x T scores")
        if why is None and torch._dynamo.config.disable:
            why = f"{type(self).__name__} runs only compiled, and torch._dynamo is disabled (TORCHDYNAMO_DISABLE)"
        if why is not None:
            raise RuntimeError(why)

    def _forward(self, x_BTD: torch.Tensor, state=None) -> torch.Tensor:
        """The forward; with a state (prefill), the globals' and the last window's keys and
        values also go into it (the Longformer ring buffer)."""
        B, T, _ = x_BTD.shape
        g = self.global_tokens
        self.check_seq_len(T)
        self._refuse(x_BTD)
        q_BHTK, k_BhTK, v_BhTK = self.split_heads(x_BTD)  # h = n_kv_heads key/value heads
        if state is not None:
            self._cache_prompt(state, k_BhTK, v_BhTK)
        w = min(self.window, T - 1)  # a wider window sees nothing more: one kernel for all of them
        device = x_BTD.device
        mask = window_block_mask(T, w, g, self.causal, self.block_size, str(device),
                                 device.type in self.backward_devices)
        with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True), \
                warnings.catch_warnings():
            # the last guard against the dense eager path: its warning becomes the error
            warnings.filterwarnings("error", message=_EAGER_WARNING)
            y_BHTK = compiled_flex_attention()(q_BHTK, k_BhTK, v_BhTK, block_mask=mask,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        self.backend = f"flex-compiled:block{self.block_size}"
        return self.merge_heads(y_BHTK)

    def memory_bytes(self, batch: int, seq_len: int, dtype_bytes: int = 4) -> int:
        """Longformer's model (its gathered windows overcount what FlexAttention keeps) plus the
        block tables: partial and full, each (nb, nb) + nb int32, and as many transposed for
        the backward."""
        nb = -(-seq_len // self.block_size)
        return super().memory_bytes(batch, seq_len, dtype_bytes) + 4 * 4 * (nb * nb + nb)

    def extra_repr(self) -> str:
        kv = f", n_kv_heads={self.n_kv_heads}" if self.n_kv_heads != self.n_heads else ""
        return (f"d_model={self.d_model}, n_heads={self.n_heads}{kv}, causal={self.causal}, window={self.window}, "
                f"global_tokens={self.global_tokens}, block_size={self.block_size}")


def _dispatch_mode_active() -> bool:
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode

    return is_in_torch_dispatch_mode(include_infra_modes=False)
