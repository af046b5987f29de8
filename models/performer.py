"""FAVOR+ linear attention (Performer, Choromanski et al. 2021, "Rethinking Attention with Performers").

Owns `PerformerAttention`. softmax(Q K^T / sqrt(K)) is approximated by phi(Q) phi(K)^T with M
positive orthogonal random features (paper §2.3-2.4, Lemma 1):
    phi(x) = exp(W x - |x|^2 / 2) / sqrt(M),   x = q / K^(1/4)  (so q.k/sqrt(K) = x_q.x_k),
W (M, K): blocks of K orthonormal rows (QR of a Gaussian matrix), each row rescaled to the norm
of an independent Gaussian vector, so its rows are marginally N(0, I) but orthogonal per block.

Norm cap (`norm_cap`, default "auto"): before the features, every x (query and key) is scaled
to |x|^2 <= r^2, r^2 = ln(M) / 4 by default. Why: phi(x).phi(y) is unbiased for exp(x.y), but its
relative variance is about (exp(|x + y|^2) - 1) / M (paper, Lemma 2), exponential in the norms.
At the benchmark's norms (4 heads of 64, default projections of unit inputs: |x|^2 ~ 2.7, so
exp(|x+y|^2) ~ 200; the fidelity task's sharper inputs: |x|^2 ~ 16) the noise of the unbiased
estimator outweighs the signal, and plain FAVOR+ was worse than outputting the mean of the
values (table below). The cap keeps exp(|x+y|^2) / M <= exp(4 r^2) / M = 1 for every pair: it
trades that variance for a bias towards flatter attention (softmax of the capped scores),
which at these norms is far the smaller error. A per-token factor min(1, r / |x|), so causality,
the chunk states and the decoding step are untouched. "off" (or None) is plain FAVOR+.
Relative error vs exact softmax, B = 1, 4 heads of 64, M = 256, same W and projections:
    n = 2048 / 8192 / 16384          no cap (before)     norm_cap auto    performer-pytorch  mean(v)
    unit inputs, causal             0.65 0.75 0.81     0.29 0.37 0.43   0.46 0.50 0.55     0.41 0.57 0.67
    unit inputs, bidirectional      0.93 0.97 0.99     0.44 0.55 0.59   0.66 0.69 0.72     0.70 0.89 0.94
    inputs x3, causal               1.55 1.63 1.64     0.97 0.98 0.98   0.99 1.00 1.00     0.99 1.00 1.00
    inputs x3, bidirectional        1.66 1.67 1.67     0.98 0.98 0.98   1.00 1.00 1.00     1.00 1.00 1.00
    fidelity task inputs, causal    1.99 2.17 2.17     0.93 0.94 0.94   0.96 0.98 0.99     0.96 0.98 0.99
    fidelity task inputs, bidir.    2.28 2.27 2.06     0.95 0.94 0.93   0.99 1.00 1.00     0.99 1.00 1.00
(performer-pytorch 1.1.4 adds 1e-4 to every feature, an implicit shrinkage towards the mean.)

Then out_i = phi(q_i) S / phi(q_i) z with S = sum_j phi(k_j) v_j^T, z = sum_j phi(k_j) (the
normaliser z is the "column of ones appended to V" of the paper, kept as its own vector).
- bidirectional: S over all keys, O(T M K).
- causal: chunks of C positions. Inside a chunk the masked (C, C) product phi(Q) phi(K)^T
  (lower triangle incl. the diagonal) times V; across chunks a prefix state of the earlier
  chunks' phi(K)^T V (M, K) and sum of phi(K) (M). Memory: features O(T M), chunk states
  O(T/C * M K) per head, never the O(T M K) of per-token prefix sums.
Numerical stabilisation (the paper's implementation subtracts maxima of W x before exp):
queries subtract their own row max (a per-query constant, cancels in the ratio, and so does
their -|x|^2/2, which is therefore never subtracted; their norm only sets the cap's factor).
Keys subtract a per-(batch, head) constant: bidirectional the max over all keys; causal the
running max over the chunks so far (including the current one), with earlier chunk states
rescaled by exp(old max - new max) <= 1 as the max grows. A later chunk therefore never touches an earlier
output; a later token of the same chunk only shifts that chunk's common scale, which cancels
exactly and changes earlier outputs at most by rounding.

On CPU the causal chunks run in blocks of ~4096 (batch x head x position) rows, one block after
the other, each continuing the state (and the running max) of the blocks before it; a block's
features and chunk products then stay in cache between the passes over them, where one block of
all T rows streams every (T, M) tensor through memory several times. Other devices run all
chunks as one block (one set of large batched calls).

Where the time goes (causal, n = 16384, B = 1, 4 heads of 64, M = 256, fp32, 2-core AVX-512 CPU,
one block: ~127 ms forward): the (C, M) x (M, C) chunk scores ~20 ms, the chunk states and
prefix products ~10 ms each, feature maps ~13 ms each (a GEMM plus passes over (T, M) tensors),
projections ~27 ms. The batched (128 x 256) products ran at ~0.2 TFLOP/s, about half the
large-GEMM rate, and the whole forward at ~35% of it. Blocks of 4096 rows cut the mixing core
from ~106 to ~84 ms (forward ~113 ms; forward+backward from ~450 to ~410 ms). `torch.compile`
of the one-block module measured 3-4% faster; chunk 64 or a transposed feature layout, no
faster. The norm cap (the query norms, a per-token scale of q and k) costs about what folding
the key norm into the causal stabiliser's shift and the position-major block outputs save:
forward at n = 16384, 1 thread, shared machine, min of 30: 239 ms before the cap, 232 ms with it.

FLOP count (`mixing_flops`, 2 FLOPs per multiply-add, matmuls only; exp and norms not counted):
features 2 * 2TMK; bidirectional + 2 * 2TM(K+1) (the +1 is the normaliser); causal per chunk the
useful lower triangle C(C+1)/2 * (M + K+1) * 2, plus the chunk states and the prefix products
2 * 2TM(K+1).

Decoding (causal): the running sums S = sum phi(k) v^T (M, K) and z = sum phi(k) (M) per
head, with the running max R of the key logits as their frame (see `_step`); O(M K) per token
whatever the context. `state_bytes` = B H (M K + M + 1) max(dtype_bytes, 4).

    attn = PerformerAttention(d_model=256, n_heads=4, causal=True, features=256)
    y_BTD = attn(x_BTD)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.knobs import check_knob
from models.vanilla import VanillaAttention


def orthogonal_gaussian(m: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """(m, k) random features: orthonormal blocks of k rows with chi(k)-distributed row norms."""
    blocks = []
    for _ in range(-(-m // k)):
        g_KK = torch.randn(k, k, generator=generator, dtype=torch.float64)
        q_KK, r_KK = torch.linalg.qr(g_KK)
        q_KK = q_KK * torch.sign(torch.diagonal(r_KK)).unsqueeze(0)  # Haar-uniform, not QR-biased
        blocks.append(q_KK.T)  # rows orthonormal
    w_MK = torch.cat(blocks)[:m]
    norms_M = torch.randn(m, k, generator=generator, dtype=torch.float64).norm(dim=1)
    return (w_MK * norms_M.unsqueeze(1)).float()


def norm_cap_value(norm_cap: float | str | None, features: int) -> float | None:
    """The bound r^2 on |x|^2 (x = q / K^(1/4), k / K^(1/4)) that `norm_cap` sets: "auto" is
    ln(M) / 4, so that exp(|x + y|^2) / M, the relative variance of the kernel estimate,
    stays <= 1 for every pair; a positive number is r^2 itself; None (or "off") is no cap."""
    if norm_cap is None or norm_cap == "off":
        return None
    if norm_cap == "auto":
        return math.log(max(features, 2)) / 4
    if isinstance(norm_cap, bool) or not isinstance(norm_cap, (int, float)) or not norm_cap > 0:
        raise ValueError(f"norm_cap must be 'auto', 'off', None or a positive number (the bound r^2 on "
                         f"|q|^2 / sqrt(K) and |k|^2 / sqrt(K)), got {norm_cap!r}")
    return float(norm_cap)


def decayed_prefix(s_BHNF: torch.Tensor, run_BHN: torch.Tensor) -> torch.Tensor:
    """P_n = sum_{m<n} s_m exp(R_m - R_n) for a nondecreasing R (all factors <= 1), vectorised.

    Two levels so neither a loop over all n nor an (n x n) weight matrix is needed: chunks are
    grouped into ~sqrt(n) groups of G; inside a group a (G, G) lower-triangular weight matrix,
    across groups a short loop carrying each group's total in the frame of its last chunk.
    """
    B, H, N, Fd = s_BHNF.shape
    G = _group_size(N)
    nb = -(-N // G)
    if nb * G != N:  # padding repeats the last R (decay 1) with zero states, so it adds nothing
        s_BHNF = F.pad(s_BHNF, (0, 0, 0, nb * G - N))
        run_BHN = F.pad(run_BHN, (0, nb * G - N), mode="replicate")
    s_BHbGF = s_BHNF.view(B, H, nb, G, Fd)
    r_BHbG = run_BHN.view(B, H, nb, G)
    # inside a group: W[r, r'] = exp(R_r' - R_r) for r' < r; the clamp only guards the masked half
    diff_BHbGG = (r_BHbG.unsqueeze(-2) - r_BHbG.unsqueeze(-1)).clamp(max=0)
    strict = torch.ones(G, G, dtype=torch.bool, device=s_BHNF.device).tril(-1)
    w_BHbGG = (torch.exp(diff_BHbGG) * strict).to(s_BHNF.dtype)
    # each group's total in the frame of its last chunk, then carried across groups
    last_BHb = r_BHbG[..., -1]
    tot_BHbF = (torch.exp(r_BHbG - last_BHb.unsqueeze(-1)).to(s_BHNF.dtype).unsqueeze(-2) @ s_BHbGF).squeeze(-2)
    carry = [torch.zeros_like(tot_BHbF[:, :, 0])]
    for b in range(1, nb):  # ~sqrt(N) steps
        d_BH = torch.exp(last_BHb[:, :, b - 2] - last_BHb[:, :, b - 1]) if b > 1 else None
        carry.append(tot_BHbF[:, :, b - 1] if d_BH is None else carry[-1] * d_BH[..., None] + tot_BHbF[:, :, b - 1])
    carry_BHbF = torch.stack(carry, dim=2)
    # carry b is in the frame of group b-1's last chunk; bring it to each chunk's own frame (<= 1)
    prev_BHb = torch.cat([r_BHbG[..., :1, 0], last_BHb[..., :-1]], dim=-1)
    f_BHbG = torch.exp(prev_BHb.unsqueeze(-1) - r_BHbG).to(s_BHNF.dtype)
    # in place on the fresh matmul output: the state is the largest tensor of this function
    p_BHbGF = (w_BHbGG @ s_BHbGF).addcmul_(f_BHbG.unsqueeze(-1), carry_BHbF.unsqueeze(-2))
    return p_BHbGF.view(B, H, nb * G, Fd)[:, :, :N]


def _group_size(n: int) -> int:
    """A divisor of n in [sqrt(n), 2 sqrt(n)] when there is one (no padding), else ceil(sqrt(n))."""
    root = math.isqrt(n - 1) + 1 if n > 1 else 1
    for g in range(root, 2 * root + 1):
        if n % g == 0:
            return g
    return root


def block_prefix(states: tuple[torch.Tensor, ...], run_BHn: torch.Tensor,
                 carry: tuple[torch.Tensor, ...] | None) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """`decayed_prefix` for the few chunks of one block that continues earlier blocks.

    states: per-chunk sums (B, H, n, F_i); run_BHn: the running max, nondecreasing, already at
    least the carried one; carry: (sums of every earlier chunk..., their frame R (B, H)) or None.
    Returns each state's prefix P_c = sum_{m<c} s_m exp(R_m - R_c), the earlier blocks included,
    and the carry after the block (every chunk's sum in the frame of its last R). One dense
    (n+1, n) weight matrix serves both: rows 0..n-1 are the prefixes, row n the block's total.
    """
    n = run_BHn.shape[-1]
    run_ext = torch.cat([run_BHn, run_BHn[..., -1:]], dim=-1)  # (B, H, n+1)
    strict = torch.ones(n + 1, n, dtype=torch.bool, device=run_BHn.device).tril(-1)
    # W[i, m] = exp(R_m - R_i) for m < i (<= 1); the clamp only guards the masked half
    w_BHen = torch.exp((run_BHn.unsqueeze(-2) - run_ext.unsqueeze(-1)).clamp(max=0)) * strict
    outs = [w_BHen.to(s.dtype) @ s for s in states]
    if carry is not None:  # the earlier blocks, from their frame to each row's (<= 1)
        f_BHe1 = torch.exp(carry[-1].unsqueeze(-1) - run_ext).unsqueeze(-1)
        outs = [o.addcmul_(f_BHe1.to(o.dtype), c.unsqueeze(-2)) for o, c in zip(outs, carry[:-1])]
    prefixes = tuple(o[:, :, :n] for o in outs)
    return prefixes, (*(o[:, :, n] for o in outs), run_ext[..., n])


class PerformerAttention(VanillaAttention):
    """FAVOR+ with `features` positive orthogonal random features on norm-capped queries and keys
    (`norm_cap`, see the module docstring); causal via chunked prefix sums."""

    exact = False
    is_attention = True
    materialises_scores = False
    time_order = 1.0
    memory_order = 1.0
    constant_state = True  # decoding keeps S (M x K), z (M) and R per head, whatever the context
    # causal on CPU: chunks run in blocks of about this many (batch x head x position) rows, so a
    # block's features stay in cache. Measured, mixing core alone (projections excluded), B = 1,
    # 4 heads of 64, 2 threads, ms at n = 1024 / 4096 / 16384: one block 5.2 / 23.7 / 106;
    # 2048 rows 5.0 / 21.6 / 89.5; 4096 rows 4.9 / 20.5 / 84.2; 8192 rows 4.9 / 20.5 / 84.2.
    # Forward+backward at n = 16384: ~450 ms one block, ~410 ms 4096 rows. None: one block.
    cpu_block_rows: int | None = 4096

    # FAVOR+ with shared key/value heads would share the keys' feature maps and running sums over
    # a group; not built, so a grouped config is refused rather than run as multi-head
    grouped_kv = False
    kv_heads_refusal = "its feature maps and running sums are per head; shared key/value heads are not implemented"

    def __init__(self, d_model: int, n_heads: int, causal: bool = True, bias: bool = False,
                 features: int = 256, redraw: bool = False, chunk_size: int = 128, seed: int = 0,
                 norm_cap: float | str | None = "auto", n_kv_heads: int | None = None):
        super().__init__(d_model, n_heads, causal, bias, n_kv_heads=n_kv_heads)
        self.features, self.redraw, self.chunk_size, self.seed = (
            check_knob("features", features), bool(redraw), check_knob("chunk_size", chunk_size), seed)
        self.norm_cap = norm_cap_value(norm_cap, self.features)
        self._gen = torch.Generator().manual_seed(int(seed))
        # shared by all heads (as in the paper's code); a buffer so it moves with .to() and is saved
        self.register_buffer("proj_MK", orthogonal_gaussian(self.features, self.head_dim, self._gen))

    def redraw_features(self) -> None:
        """Draw a fresh W from the module's own seeded generator (reproducible sequence of draws)."""
        new = orthogonal_gaussian(self.features, self.head_dim, self._gen)
        self.proj_MK.copy_(new.to(self.proj_MK))

    def _logits(self, x_BHTK: torch.Tensor, with_norm: bool = True) -> torch.Tensor:
        """W x - |x|^2 / 2 for x = input / K^(1/4) with |x|^2 capped at r^2 (`norm_cap`): the
        exponent of phi before stabilisation."""
        l_BHTM, half_BHT1 = self._project(x_BHTK, with_norm)
        # in place on the fresh matmul output: (B, H, T, M) is the largest tensor here
        return l_BHTM if half_BHT1 is None else l_BHTM.sub_(half_BHT1)

    def _project(self, x_BHTK: torch.Tensor, with_norm: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W x, |x|^2 / 2) for the (capped) x = input / K^(1/4); the norm only `with_norm`.
        The 1/K^(1/4) goes into the (M, K) weights and the norm, the cap's per-token factor
        min(1, r / |x|) over the (B, H, T, K) input, never over the (B, H, T, M) logits."""
        scale = self.head_dim ** -0.25
        w_MK = (self.proj_MK * scale).to(x_BHTK.dtype)
        r2 = self.norm_cap
        if r2 is None and not with_norm:
            return x_BHTK @ w_MK.T, None
        sq_BHT1 = torch.linalg.vector_norm(x_BHTK, dim=-1, keepdim=True).square() * (scale * scale)
        if r2 is None:
            return x_BHTK @ w_MK.T, 0.5 * sq_BHT1
        # r / max(|x|, r): finite with a finite gradient everywhere, zero-padded rows included
        c_BHT1 = torch.rsqrt(sq_BHT1.clamp(min=r2)) * math.sqrt(r2)
        # c first: the product takes c's (contiguous) layout, so it stands in for the copy the
        # matmul makes of the strided head view anyway
        l_BHTM = (c_BHT1 * x_BHTK) @ w_MK.T
        return l_BHTM, (0.5 * sq_BHT1.clamp(max=r2) if with_norm else None)  # |c x|^2 = min(|x|^2, r^2)

    @staticmethod
    def _exp_minus(l_BHTM: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """exp(l - shift) in place on l (a temporary); shift is a constant of the ratio, so detached."""
        return l_BHTM.sub_(shift.detach()).exp_()

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self._forward(x_BTD)

    def _forward(self, x_BTD: torch.Tensor, state=None) -> torch.Tensor:
        """The forward; with a state (prefill, causal), the running sums of the prompt's keys
        also go into it."""
        if self.redraw and self.training:
            self.redraw_features()
        T = x_BTD.shape[1]
        q_BHTK, k_BHTK, v_BHTK = self.split_heads(x_BTD)
        if state is not None:
            self._sum_prompt(state, k_BHTK, v_BHTK)
        if self.causal:
            C = min(self.chunk_size, T)
            nc = -(-T // C)
            if nc * C != T:
                # pad to whole chunks before the features: padded keys come after every real query,
                # so the causal mask hides them; they only enter the last chunk's stabiliser
                pad = (0, 0, 0, nc * C - T)
                q_BHTK, k_BHTK, v_BHTK = F.pad(q_BHTK, pad), F.pad(k_BHTK, pad), F.pad(v_BHTK, pad)
            # the blocks come out position-major (B, T, H, K): their concatenation is already the
            # layout the output projection reads, where the head-major one needs one more copy
            y_BTHK = self._causal(q_BHTK, k_BHTK, v_BHTK, C)[:, :T]
            return self.out(y_BTHK.reshape(x_BTD.shape[0], T, self.d_model))
        phiq_BHTM = self._query_features(q_BHTK)
        lk_BHTM = self._logits(k_BHTK)
        phik_BHTM = self._exp_minus(lk_BHTM, lk_BHTM.amax(dim=(-2, -1), keepdim=True))
        s_BHMK = phik_BHTM.transpose(-2, -1) @ v_BHTK
        z_BHM1 = phik_BHTM.sum(-2).unsqueeze(-1)
        num_BHTK, den_BHT = phiq_BHTM @ s_BHMK, (phiq_BHTM @ z_BHM1).squeeze(-1)
        self.backend = "favor+-linear"
        return self.merge_heads(num_BHTK / den_BHT.clamp_min(torch.finfo(den_BHT.dtype).tiny).unsqueeze(-1))

    def _query_features(self, q_BHTK: torch.Tensor) -> torch.Tensor:
        """phi(q) up to a per-query factor. The 1/sqrt(M) of phi cancels between numerator and
        denominator, and so does any per-query factor, the query's exp(-|x|^2/2) included: softmax
        over the features (one fused pass) is exp(l - row max) over its row sum, both constant
        along the row."""
        return self._logits(q_BHTK, with_norm=False).softmax(dim=-1)

    def _causal(self, q_BHTK: torch.Tensor, k_BHTK: torch.Tensor, v_BHTK: torch.Tensor, C: int) -> torch.Tensor:
        """Chunked causal FAVOR+ on inputs padded to nc * C positions: the output (B, nc*C, H, K).
        On CPU the chunks run in blocks of about `cpu_block_rows` (batch x head x position) rows,
        one block after the other, each from the state of the blocks before it: a block's
        features and chunk products stay in cache between the passes over them. Elsewhere (and
        with `cpu_block_rows = None`) all chunks are one block."""
        B, H, Tp, _ = q_BHTK.shape
        nc = Tp // C
        g = nc
        if self.cpu_block_rows and q_BHTK.device.type == "cpu":
            # at most 16 chunks: `block_prefix` weighs a block's states with a dense (g+1, g) matrix
            g = min(16, max(1, self.cpu_block_rows // (B * H * C)))
            self.backend = "favor+-chunked:cpu-blocks"
        else:
            self.backend = "favor+-chunked"
        # split, not slices: one backward node joins the blocks' gradients (a slice's backward
        # would write each block's into a zero tensor of the whole length)
        blocks = list(zip(*(t.split(g * C, dim=2) for t in (q_BHTK, k_BHTK, v_BHTK))))
        outs, carry = [], None
        for i, (q_BHLK, k_BHLK, v_BHLK) in enumerate(blocks):
            y_BHLK, carry = self._causal_block(q_BHLK, k_BHLK, v_BHLK, C, carry, more_blocks=i + 1 < len(blocks))
            outs.append(y_BHLK.transpose(1, 2))
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    def _causal_block(self, q_BHLK: torch.Tensor, k_BHLK: torch.Tensor, v_BHLK: torch.Tensor, C: int,
                      carry: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, more_blocks: bool
                      ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
        """The n = L / C chunks of one block: the output (B, H, L, K) and, unless the block is
        the only one, the state after it (sum of phi(K)^T V (B, H, M*K), of phi(K) (B, H, M), in the frame of the
        running max R (B, H)). `carry` is that state before the block, None for the first.
        The normaliser is kept apart from V (not as a column of ones) because K+1-wide matmuls
        measured up to 2x slower than K-wide ones on CPU BLAS."""
        B, H, L, K = q_BHLK.shape
        n, M = L // C, self.features
        X = B * H * n  # every chunk of every head is one batch entry of the bmm calls below
        phiq_XCM = self._query_features(q_BHLK).reshape(X, C, M)
        wk_BHLM, half_BHL1 = self._project(k_BHLK)  # the key logits are wk - half
        v_XCK = v_BHLK.reshape(X, C, K)

        # key stabiliser: running max over the chunks up to and including this one (no later chunk)
        # of the logits, max over a key's features first, then its norm term (one pass fewer
        # over the (L, M) logits than subtracting the norm term from all of them first)
        row_BHnC = (wk_BHLM.detach().amax(-1, keepdim=True) - half_BHL1.detach()).view(B, H, n, C)
        run_BHn = row_BHnC.amax(-1).cummax(dim=-1).values
        if carry is not None:
            run_BHn = torch.maximum(run_BHn, carry[-1].unsqueeze(-1))
        # exp(wk - half - R) in place: the norm term is part of phi (its gradient flows), R is not
        shift_BHnC1 = (half_BHL1.view(B, H, n, C) + run_BHn.detach().unsqueeze(-1)).unsqueeze(-1)
        phik_XCM = wk_BHLM.view(B, H, n, C, M).sub_(shift_BHnC1).exp_().reshape(X, C, M)

        # across chunks: the state of all earlier chunks, in the frame of the current running max
        s_BHnF = (phik_XCM.transpose(-2, -1) @ v_XCK).view(B, H, n, M * K)  # each chunk's phi(K)^T V ...
        z_BHnM = phik_XCM.sum(-2).view(B, H, n, M)  # ... and sum of phi(K)
        if carry is None and not more_blocks:  # all chunks in one block
            p_BHnF, pz_BHnM = decayed_prefix(s_BHnF, run_BHn), decayed_prefix(z_BHnM, run_BHn)
        else:
            (p_BHnF, pz_BHnM), carry = block_prefix((s_BHnF, z_BHnM), run_BHn, carry)
        # inside each chunk: lower-triangular (incl. diagonal) linear-attention scores, plus the prefix
        a_XCC = torch.bmm(phiq_XCM, phik_XCM.transpose(-2, -1)).tril_()
        num_XCK = torch.baddbmm(torch.bmm(phiq_XCM, p_BHnF.reshape(X, M, K)), a_XCC, v_XCK)
        den_XC = a_XCC.sum(-1) + torch.bmm(phiq_XCM, pz_BHnM.reshape(X, M, 1)).squeeze(-1)
        # in place on the fresh baddbmm output, which its backward does not need
        y_BHLK = num_XCK.div_(den_XC.clamp_min(torch.finfo(den_XC.dtype).tiny).unsqueeze(-1)).view(B, H, L, K)
        return y_BHLK, carry

    # --- decoding: the running sums of the causal form ----------------------------
    # S = sum_j phi(k_j) v_j^T (B, H, M, K) and z = sum_j phi(k_j) (B, H, M), both in the frame
    # of the running max R (B, H) of the key logits so far: phi(k_j) = exp(l_j - R). A step
    # raises R to max(R, max l_i) and rescales S, z by exp(R_old - R_new) <= 1 first: the
    # causal forward's stabiliser, per token instead of per chunk (a constant of each key frame,
    # so the outputs agree up to rounding). Kept in float32 at least: they sum over the context.
    @staticmethod
    def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.promote_types(dtype, torch.float32)

    def _new_state(self, batch, max_len, device, dtype):
        X, M, K, acc = (batch, self.n_heads), self.features, self.head_dim, self._sum_dtype(dtype)
        return {"S": torch.zeros(*X, M, K, device=device, dtype=acc),
                "z": torch.zeros(*X, M, device=device, dtype=acc),
                "R": torch.full(X, float("-inf"), device=device, dtype=acc)}, {}

    def state_bytes(self, batch: int, max_len: int, dtype_bytes: int = 4) -> int:
        M, K = self.features, self.head_dim
        return batch * self.n_heads * (M * K + M + 1) * max(dtype_bytes, 4)

    def _sum_prompt(self, state, k_BHTK: torch.Tensor, v_BHTK: torch.Tensor) -> None:
        """S, z, R of the whole prompt (O(T M K), as the forward's chunk states), R = the max."""
        st = state.tensors
        lk_BHTM = self._logits(k_BHTK).to(st["S"].dtype)
        r_BH = lk_BHTM.amax(dim=(-2, -1))
        phik_BHTM = self._exp_minus(lk_BHTM, r_BH[..., None, None])
        st["S"].copy_(phik_BHTM.transpose(-2, -1) @ v_BHTK.to(st["S"].dtype))
        st["z"].copy_(phik_BHTM.sum(-2))
        st["R"].copy_(r_BH)

    def _prefill(self, x_BTD: torch.Tensor, state) -> torch.Tensor:
        y_BTD = self._forward(x_BTD, state)
        state.pos = x_BTD.shape[1]
        return y_BTD

    def _step(self, x_B1D: torch.Tensor, state) -> torch.Tensor:
        st = state.tensors
        S, z, R = st["S"], st["z"], st["R"]
        q_BH1K, k_BH1K, v_BH1K = self.split_heads(x_B1D)
        phiq_BHM = self._query_features(q_BH1K)[:, :, 0].to(S.dtype)
        lk_BHM = self._logits(k_BH1K)[:, :, 0].to(S.dtype)
        r_new = torch.maximum(R, lk_BHM.amax(-1))
        decay_BH = torch.exp(R - r_new)  # 0 for the first token (R = -inf), else <= 1
        phik_BHM = self._exp_minus(lk_BHM, r_new[..., None])
        S.mul_(decay_BH[..., None, None]).add_(phik_BHM.unsqueeze(-1) * v_BH1K.to(S.dtype))  # (M,1)*(1,K)
        z.mul_(decay_BH[..., None]).add_(phik_BHM)
        R.copy_(r_new)
        num_BHK = (phiq_BHM.unsqueeze(-2) @ S).squeeze(-2)
        den_BH = (phiq_BHM * z).sum(-1)
        y_BHK = num_BHK / den_BH.clamp_min(torch.finfo(den_BH.dtype).tiny).unsqueeze(-1)
        self.backend = "favor+-running-sums"
        return self.merge_heads(y_BHK.unsqueeze(2).to(x_B1D.dtype))

    def mixing_flops(self, batch: int, seq_len: int) -> float:
        T, M, K = seq_len, self.features, self.head_dim
        J = K + 1
        f = 2 * 2 * T * M * K  # W q and W k
        if self.causal:
            C = min(self.chunk_size, T)
            full, rest = divmod(T, C)
            tri = full * C * (C + 1) // 2 + rest * (rest + 1) // 2  # useful (i, j) pairs in chunks
            f += 2 * tri * (M + J) + 2 * 2 * T * M * J
        else:
            f += 2 * 2 * T * M * J
        return float(batch * self.n_heads * f)

    def memory_bytes(self, batch: int, seq_len: int, dtype_bytes: int = 4) -> int:
        T, M, K, X = seq_len, self.features, self.head_dim, batch * self.n_heads
        feats = 4 * X * T * M  # logits and features of q and k (kept for backward)
        if self.causal:
            C = min(self.chunk_size, T)
            nc = -(-T // C)
            # padded copies of the features, the (C, C) chunk scores, chunk states and prefixes
            feats += 2 * X * nc * C * M + X * nc * C * C + 3 * X * nc * M * (K + 1)
        linear = 8 * batch * T * self.d_model + 3 * X * T * (K + 1)
        return int((feats + linear) * dtype_bytes)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, features={self.features}, redraw={self.redraw}, "
                f"chunk_size={self.chunk_size}, seed={self.seed}, norm_cap={self.norm_cap}")
