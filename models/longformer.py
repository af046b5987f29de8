"""Sliding-window + global-token attention (Longformer, Beltagy et al. 2020), computed blockwise.

Owns `LongformerAttention`. Attention pattern, for query i and key j (0-based positions, w the
one-sided window, g the number of global tokens, positions 0..g-1 being the global ones):
- bidirectional: allowed iff |i - j| <= w, or j < g (a global key), or i < g (a global query);
- causal: allowed iff 0 <= i - j <= w, or (j < g and j <= i), or (i < g and j <= i).
So a global token attends to everything it may see and everything may see it; with w >= T the
pattern is the full (causal) one and the output equals vanilla attention.

How it is computed, in O(T (w + g)) time and memory, never a T x T tensor or mask:
1. queries are cut into chunks of C positions (T padded up to a multiple of C);
2. chunk n (queries nC .. nC+C-1) sees the keys nC-w .. nC+C-1 (causal) or nC-w .. nC+C-1+w
   (bidirectional): an overlapping window of length L = w+C (or 2w+C) taken with `unfold` from
   the zero-padded keys, with the g global keys prepended, so every chunk has G+L keys;
3. batched fused SDPA calls over the chunks (they ride in SDPA's head axis) with additive masks
   that keep exactly the pattern above: inside the window the band, keys j < g removed from
   the window (they are counted once, as globals), padding removed; on the global keys j <= i
   when causal. Interior chunks (window inside [g, T)) all have the same (C, G+L) mask, so they
   run in one call with that mask broadcast; the few edge chunks at either end run with a mask
   each;
4. the g global query rows are recomputed against all T keys ((g, T) scores, g < T) and
   replace their chunk rows.
On CPU, step 3 does not gather: each chunk's window keys stay an overlapping view of the padded
keys, and the g global keys are a second fused call over all queries; the two partial softmaxes
are merged by their log-sum-exps (`WindowAndGlobals`, with the matching backward). Measured at
n = 16384 (w = 512, g = 16, 2 threads): forward 103-110 ms instead of 113-115 and forward peak
memory 180 MB instead of 265; forward+backward 5% faster. `split_globals = False` (and every
other device) runs step 3 as described, through `sdpa_recorded`.
C = 256 measured fastest on a 2-core AVX-512 CPU (fp32, w = 512): smaller chunks waste less of
the window but run SDPA's CPU kernel on too-short query blocks.

FLOP count (`mixing_flops`): exactly the allowed (i, j) pairs of the pattern, 2 multiply-adds
each (one in Q K^T, one in P V), 2 FLOPs per multiply-add: 4 * B * H * K * pairs(T). For
i >= g and T >> w that is ~(w+1+g) keys per query causal, ~(2w+1+g) bidirectional. The kernel
computes G+L keys per query chunk row, so useful/computed is ~(w+1+g)/(w+C+g) causal; softmax
exponentials and the mask are not counted.

Decoding (causal): the g global keys and values in fixed slots, and a ring buffer of the last
w+1 (positions i-w .. i; slot g + i mod (w+1)); a step attends over those g + w + 1 slots with
a mask of the pattern, O((w + g) D) per token whatever the context. `state_bytes` =
2 B (min(g, max_len) + min(w+1, max_len)) H_kv K dtype_bytes (H_kv K = D unless grouped).
Prefill writes the globals and the prompt's last w+1 keys from the forward's projections.

    attn = LongformerAttention(d_model=256, n_heads=4, causal=True, window=512, global_tokens=16)
    y_BTD = attn(x_BTD)
"""
from __future__ import annotations

import math

import torch

from models.base import grouped_scores, grouped_values, repeat_kv
from models.knobs import check_knob
from models.vanilla import VanillaAttention
from models.xformers_attn import sdpa_recorded


def pattern_pairs(seq_len: int, window: int, global_tokens: int, causal: bool) -> int:
    """Number of allowed (query, key) pairs of the pattern in the module docstring, counted exactly."""
    T, w, g = seq_len, window, min(global_tokens, seq_len)
    i = torch.arange(T, dtype=torch.int64)
    if causal:
        # window keys max(0, i-w)..i, plus the globals left of the window; i < g sees all j <= i
        n_i = torch.minimum(i, torch.tensor(w)) + 1 + (i - w).clamp(0, g)
    else:
        lo, hi = (i - w).clamp(min=0), (i + w).clamp(max=T - 1)
        n_i = hi - lo + 1 + lo.clamp(max=g)
        n_i = torch.where(i < g, torch.tensor(T), n_i)  # global queries see every key
    return int(n_i.sum())


def _pad_time(x_BHTK: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """Zero rows before/after along T, contiguous. A cat writes each element once, where F.pad
    fills the whole output first (measurably slower for these sizes on CPU)."""
    B, H, _, K = x_BHTK.shape
    parts = [x_BHTK.new_zeros(B, H, left, K)] if left else []
    parts.append(x_BHTK)
    if right:
        parts.append(x_BHTK.new_zeros(B, H, right, K))
    return torch.cat(parts, dim=2) if len(parts) > 1 else x_BHTK.contiguous()


# PyTorch's fused CPU attention with its log-sum-exp (None on a build without it: then the
# one-softmax path runs on CPU too)
_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_flash_cpu_backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _join_runs(parts: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Per-run results (runs of chunks, in order along dim 1) as one tensor; no copy for one run."""
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


class WindowAndGlobals(torch.autograd.Function):
    """Softmax attention of each query over two disjoint key sets, its chunk's window and the
    g global keys, from two fused CPU flash calls merged by their log-sum-exps:
        out = (e^lse_w out_w + e^lse_g out_g) / (e^lse_w + e^lse_g),  lse = logaddexp(lse_w, lse_g).
    Backward: the softmax over the union has the merged (out, lse) as its statistics, so each
    part's flash backward, given those instead of its own, returns that part's share of the
    gradient (the usual split-KV rule); the query gradients add up.
    Inputs: q (X, nc, C, K); window keys/values (X, nc, L, K), overlapping views are fine;
    global keys/values (X, g, K) or None; runs of (first chunk, end chunk, window mask).
    """

    @staticmethod
    def forward(ctx, q, k, v, kg, vg, runs):
        parts = [_flash_cpu(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], 0.0, False, attn_mask=mask)
                 for lo, hi, mask in runs]
        out, lse = (_join_runs(x) for x in zip(*parts))
        if kg is not None:
            X, nc, C, K = q.shape
            out_g, lse_g = _flash_cpu(q.reshape(X, 1, nc * C, K), kg.unsqueeze(1), vg.unsqueeze(1), 0.0, False)
            merged = torch.logaddexp(lse, lse_g.view_as(lse))
            w_win = (lse - merged).exp_().unsqueeze(-1).to(out.dtype)  # lse is fp32 whatever q is
            w_glob = (lse_g.view_as(lse) - merged).exp_().unsqueeze(-1).to(out.dtype)
            out = (out * w_win).add_(out_g.view_as(out) * w_glob)
            lse = merged
        ctx.save_for_backward(q, k, v, kg, vg, out, lse)
        ctx.runs = runs
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, kg, vg, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        grads = [_flash_cpu_backward(dout[:, lo:hi], q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], out[:, lo:hi],
                                     lse[:, lo:hi], 0.0, False, attn_mask=mask)
                 for lo, hi, mask in ctx.runs]
        dq, dk, dv = (_join_runs(x) for x in zip(*grads))
        dkg = dvg = None
        if kg is not None:
            X, nc, C, K = q.shape
            flat = (X, 1, nc * C, K)
            dq_g, dkg, dvg = _flash_cpu_backward(dout.view(flat), q.reshape(flat), kg.unsqueeze(1), vg.unsqueeze(1),
                                                 out.reshape(flat), lse.reshape(X, 1, nc * C), 0.0, False)
            dq = dq + dq_g.view_as(dq)
            dkg, dvg = dkg.squeeze(1), dvg.squeeze(1)
        return dq, dk, dv, dkg, dvg, None


class LongformerAttention(VanillaAttention):
    """Sliding window of one-sided width `window` plus `global_tokens` global positions."""

    exact = False
    is_attention = True
    materialises_scores = False
    time_order = 1.0
    memory_order = 1.0
    constant_state = True  # decoding keeps g + w + 1 keys and values, whatever the context
    # CPU: window and global keys as two fused calls merged by log-sum-exp (no window copies);
    # False runs the one-softmax path every device uses (the tests run both)
    split_globals = True

    def __init__(self, d_model: int, n_heads: int, causal: bool = True, bias: bool = False,
                 window: int = 512, global_tokens: int = 16, chunk_size: int = 256, n_kv_heads: int | None = None):
        super().__init__(d_model, n_heads, causal, bias, n_kv_heads=n_kv_heads)
        self.window, self.global_tokens, self.chunk_size = (
            check_knob("window", window), check_knob("global_tokens", global_tokens), check_knob("chunk_size", chunk_size))
        self._mask_cache: tuple | None = None  # ((T, device, dtype), mask) of the last forward

    def _geometry(self, T: int) -> tuple[int, int, int, int]:
        """(w, C, n_chunks, L): window clipped to T-1 (a wider one sees nothing more), chunk, window length."""
        w = min(self.window, T - 1)
        C = min(self.chunk_size, T)
        n_chunks = -(-T // C)
        L = w + C if self.causal else 2 * w + C
        return w, C, n_chunks, L

    def _interior(self, T: int) -> tuple[int, int]:
        """Chunks n0 .. n1-1 are interior: their whole window lies in [g, T), so the globals
        in front of it are all visible and no key is padding; one (C, G+L) mask serves them all."""
        w, C, nc, _ = self._geometry(T)
        n0 = min(nc, -(-(w + self.global_tokens) // C))  # window start nC - w >= g
        # causal: a real query i < T only sees j <= i; bidirectional: window end nC + C - 1 + w < T
        n1 = nc if self.causal else (T - C - w) // C + 1
        return n0, max(n0, min(nc, n1))

    def _chunk_masks(self, T: int, device: torch.device, dtype: torch.dtype,
                     with_globals: bool = True) -> list[tuple[int, int, torch.Tensor]]:
        """[(first chunk, last chunk + 1, additive mask)] covering every chunk: 0 where the pattern
        allows, -inf elsewhere. Edge chunks get a (1, k, C, G+L) mask each, the interior run one
        (1, 1, C, G+L) mask broadcast over its chunks (the fused kernel reads it from cache).
        `with_globals=False`: the window columns only, (.., C, L).

        A constant of (T, device, dtype), so the last one is kept: repeated calls at one length
        (benchmark repeats, training steps) do not rebuild it.
        """
        key = (T, str(device), dtype, with_globals)
        if self._mask_cache is not None and self._mask_cache[0] == key:
            return self._mask_cache[1]
        w, C, nc, L = self._geometry(T)
        g = self.global_tokens
        G = g if with_globals else 0
        n0, n1 = self._interior(T)
        a = torch.arange(C, device=device).view(C, 1)
        b = torch.arange(L, device=device).view(1, L)
        # window key b of chunk n sits at j = nC - w + b, query a at i = nC + a, so i - j = w + a - b:
        # the band depends on (a, b) only ...
        band_CL = (b >= a) & (b <= a + w) if self.causal else (b >= a) & (b <= a + 2 * w)

        def mask_of(chunks: torch.Tensor) -> torch.Tensor:
            # ... while j >= g (drops the globals, counted once in front, and the left padding)
            # and j < T (right padding) cut a range of b per chunk
            k = len(chunks)
            j_NL = chunks.view(k, 1) * C - w + b
            ok = torch.empty(k, C, G + L, dtype=torch.bool, device=device)
            torch.logical_and(band_CL, ((j_NL >= g) & (j_NL < T)).unsqueeze(1), out=ok[..., G:])
            i_NC = chunks.view(k, 1) * C + a.view(1, C)
            if G:
                jg = torch.arange(g, device=device)
                ok[..., :G] = (jg <= i_NC.unsqueeze(-1)) if self.causal else True
            # rows whose output is thrown away keep a finite softmax: padded query rows see
            # everything, and the global query rows i < g (recomputed against all keys later)
            # their own key i (b = a + w), which their window may otherwise leave empty
            ok.view(k * C, G + L)[i_NC.view(-1) >= T] = True
            ok[..., G:].diagonal(offset=w, dim1=-2, dim2=-1)[i_NC < g] = True
            return torch.zeros(1, k, C, G + L, dtype=dtype, device=device).masked_fill_(~ok, float("-inf"))

        runs = []
        for lo, hi in ((0, n0), (n0, n1), (n1, nc)):
            if hi > lo:
                edge = lo != n0 or hi != n1
                chunks = torch.arange(lo, hi, device=device) if edge else torch.tensor([n0], device=device)
                runs.append((lo, hi, mask_of(chunks)))
        self._mask_cache = (key, runs)
        return runs

    def check_seq_len(self, seq_len: int) -> None:
        super().check_seq_len(seq_len)
        if self.global_tokens > seq_len:
            raise ValueError(f"global_tokens={self.global_tokens} exceeds the sequence length T={seq_len}")

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self._forward(x_BTD)

    def _forward(self, x_BTD: torch.Tensor, state=None) -> torch.Tensor:
        """The forward; with a state (prefill), the globals' and the last window's keys and
        values also go into it."""
        B, T, _ = x_BTD.shape
        g = self.global_tokens
        self.check_seq_len(T)
        H, K = self.n_heads, self.head_dim
        w, C, nc, L = self._geometry(T)
        q_BHTK, k_BHTK, v_BHTK = self.split_heads(x_BTD)
        if state is not None:
            self._cache_prompt(state, k_BHTK, v_BHTK)
        # grouped-query attention: the blocks take one key head per query head (a copy of
        # O(T D), beside the O(T (w + g)) windows); the decoding state keeps H_kv heads
        k_BHTK, v_BHTK = repeat_kv(k_BHTK, H), repeat_kv(v_BHTK, H)

        # queries: pad to nc*C and cut into chunks; chunks go into SDPA's head axis
        pad_T = nc * C - T
        q_XNCK = _pad_time(q_BHTK, 0, pad_T).view(B * H, nc, C, K)  # X = B*H
        # keys/values: w zeros in front (and w behind when bidirectional) so every window exists
        right = pad_T + (0 if self.causal else w)
        k_XSK = _pad_time(k_BHTK, w, right).view(B * H, -1, K)  # S = padded length
        v_XSK = _pad_time(v_BHTK, w, right).view(B * H, -1, K)
        k_XNLK = k_XSK.unfold(1, L, C).transpose(-1, -2)  # (X, nc, L, K) overlapping view
        v_XNLK = v_XSK.unfold(1, L, C).transpose(-1, -2)
        if self.split_globals and x_BTD.device.type == "cpu" and _flash_cpu_backward is not None:
            # the windows stay overlapping views (no copy); the globals are their own keys
            kg_XGK = k_BHTK[:, :, :g].reshape(B * H, g, K) if g else None
            vg_XGK = v_BHTK[:, :, :g].reshape(B * H, g, K) if g else None
            runs = self._chunk_masks(T, x_BTD.device, q_XNCK.dtype, with_globals=False)
            y_XNCK = WindowAndGlobals.apply(q_XNCK, k_XNLK, v_XNLK, kg_XGK, vg_XGK, runs)
            kernel = "sdpa-flash-lse-merge"
        else:
            y_XNCK, kernel = self._window_with_globals(T, q_XNCK, k_XNLK, v_XNLK, k_BHTK, v_BHTK)
        y_BHTK = y_XNCK.reshape(B, H, nc * C, K)[:, :, :T]

        if g:
            # global queries see every key (the ones they may, when causal): (g, T) scores, g <= T
            yg_BHGK, _, _ = sdpa_recorded(q_BHTK[:, :, :g], k_BHTK, v_BHTK, is_causal=self.causal)
            y_BHTK = torch.cat([yg_BHGK, y_BHTK[:, :, g:]], dim=2)
        self.backend = f"blockwise-band:{kernel}"
        return self.merge_heads(y_BHTK)

    def _window_with_globals(self, T, q_XNCK, k_XNLK, v_XNLK, k_BHTK, v_BHTK):
        """One softmax per chunk over its G global keys and L window keys gathered together
        (one copy of every window), through `sdpa_recorded`: any device, any fused kernel."""
        X, nc = q_XNCK.shape[:2]
        g, K = self.global_tokens, self.head_dim
        if g:
            kg_XNGK = k_BHTK[:, :, :g].reshape(X, 1, g, K).expand(X, nc, g, K)
            vg_XNGK = v_BHTK[:, :, :g].reshape(X, 1, g, K).expand(X, nc, g, K)
            k_XNLK = torch.cat([kg_XNGK, k_XNLK], dim=2)  # (X, nc, G+L, K)
            v_XNLK = torch.cat([vg_XNGK, v_XNLK], dim=2)
        parts = []
        for lo, hi, mask in self._chunk_masks(T, q_XNCK.device, q_XNCK.dtype):
            y, kernel, _ = sdpa_recorded(q_XNCK[:, lo:hi], k_XNLK[:, lo:hi], v_XNLK[:, lo:hi], attn_mask=mask)
            parts.append(y)
        return _join_runs(parts), kernel

    # --- decoding: the g global keys plus a ring buffer of the window ----------
    def _slots(self, max_len: int) -> tuple[int, int]:
        """(G, R): global slots and ring slots. The ring holds positions i-w .. i (w+1 keys, the
        current one included); neither needs more slots than there are positions."""
        return min(self.global_tokens, max_len), min(self.window + 1, max_len)

    def _new_state(self, batch, max_len, device, dtype):
        G, R = self._slots(max_len)
        shape = (batch, self.n_kv_heads, G + R, self.head_dim)
        # zeros, not empty: unused slots are masked, but garbage there (inf, nan) would still poison a score
        tensors = {"k": torch.zeros(shape, device=device, dtype=dtype),
                   "v": torch.zeros(shape, device=device, dtype=dtype)}
        return tensors, {"ring_R": torch.arange(R, device=device), "global_G": torch.arange(G, device=device)}

    def state_bytes(self, batch: int, max_len: int, dtype_bytes: int = 4) -> int:
        G, R = self._slots(max_len)
        return 2 * batch * (G + R) * self.kv_dim * dtype_bytes

    def _cache_prompt(self, state, k_BHTK: torch.Tensor, v_BHTK: torch.Tensor) -> None:
        """Globals at slots 0..G-1; position p >= G of the last R at ring slot G + p mod R."""
        T = k_BHTK.shape[2]
        G, R = self._slots(state.max_len)
        kc, vc = state.tensors["k"], state.tensors["v"]
        g = min(G, T)
        kc[:, :, :g].copy_(k_BHTK[:, :, :g])
        vc[:, :, :g].copy_(v_BHTK[:, :, :g])
        lo = max(g, T - R)
        if lo < T:
            idx = G + torch.arange(lo, T, device=kc.device) % R
            kc.index_copy_(2, idx, k_BHTK[:, :, lo:T])
            vc.index_copy_(2, idx, v_BHTK[:, :, lo:T])

    def _prefill(self, x_BTD: torch.Tensor, state) -> torch.Tensor:
        if x_BTD.shape[1] < self.global_tokens:  # the forward refuses a prompt shorter than g: step it
            return self._prefill_by_steps(x_BTD, state)
        y_BTD = self._forward(x_BTD, state)
        state.pos = x_BTD.shape[1]
        return y_BTD

    def _step(self, x_B1D: torch.Tensor, state) -> torch.Tensor:
        """Query i sees the globals j < g with j <= i and the window max(g, i-w) .. i: the
        causal pattern of the module docstring, over G + R slots (O(w + g) per token)."""
        i, g = state.pos, self.global_tokens
        G, R = self._slots(state.max_len)
        q_BH1K, k_BH1K, v_BH1K = self.split_heads(x_B1D)
        slot = i if i < G else G + i % R
        kc, vc = state.tensors["k"], state.tensors["v"]
        kc[:, :, slot:slot + 1].copy_(k_BH1K)
        vc[:, :, slot:slot + 1].copy_(v_BH1K)
        # the position each ring slot holds now: the latest p <= i with p = slot mod R (so p >= i - w);
        # none yet (p < 0), or a global one (p < g, counted once, in its global slot): masked
        p_R = i - (i - state.consts["ring_R"]) % R
        ok = torch.cat([state.consts["global_G"] <= i, p_R >= max(g, 0)])
        s_BH1S = grouped_scores(q_BH1K, kc) / math.sqrt(self.head_dim)
        s_BH1S = s_BH1S.masked_fill(~ok, float("-inf"))
        self.backend = "ring-window:torch-matmul"
        return self.merge_heads(grouped_values(s_BH1S.softmax(dim=-1), vc))

    def mixing_flops(self, batch: int, seq_len: int) -> float:
        pairs = pattern_pairs(seq_len, self.window, self.global_tokens, self.causal)
        return 4.0 * batch * self.n_heads * self.head_dim * pairs

    def memory_bytes(self, batch: int, seq_len: int, dtype_bytes: int = 4) -> int:
        w, C, nc, L = self._geometry(seq_len)
        G = min(self.global_tokens, seq_len)
        X = batch * self.n_heads
        windows = 2 * X * nc * (G + L) * self.head_dim  # gathered K and V windows (saved for backward)
        padded = 3 * X * (nc * C + 2 * w) * self.head_dim  # padded q, k, v
        n0, n1 = self._interior(seq_len)
        mask = (nc - (n1 - n0) + 1) * C * (G + L)  # edge chunks' masks and the interior one
        linear = batch * seq_len * (6 * self.d_model + 2 * self.kv_dim)  # projections, output, as vanilla counts them
        lse = X * nc * C  # fp32 row statistics of the fused kernel
        return int((windows + padded + mask + linear) * dtype_bytes + 4 * lse)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, window={self.window}, global_tokens={self.global_tokens}, "
                f"chunk_size={self.chunk_size}")
