"""The `fidelity` task: no training; one mixer's output against exact attention on the same
weights and inputs (`quality/rel_err_vs_exact`), next to the error of the uniform average of the
values, the baseline an approximation must beat. Shape legend as in pipeline/tasks.py.

    task = build_task({"name": "fidelity", ...}); task.evaluate(reference, variant, x_BTD)
"""
from __future__ import annotations

import math

import torch

from pipeline import record as R
from pipeline.tasks import Task, _stream_seed


def uniform_average(v_BHTK: torch.Tensor, causal: bool) -> torch.Tensor:
    """What attention with all-equal weights outputs: the mean of v over the keys each query may
    see (the running mean when causal). (B, H, T, K)."""
    if not causal:
        return v_BHTK.mean(dim=2, keepdim=True).expand_as(v_BHTK)
    T = v_BHTK.shape[2]
    counts_T1 = torch.arange(1, T + 1, device=v_BHTK.device, dtype=v_BHTK.dtype)[:, None]
    return v_BHTK.cumsum(dim=2) / counts_T1


def effective_keys(q_BHTK: torch.Tensor, k_BHTK: torch.Tensor, causal: bool, chunk: int = 1024) -> float:
    """Mean over queries of 1 / sum_j p_ij^2, the number of keys a query's softmax is spread over
    (n for uniform weights, 1 for one-hot). Computed in query chunks so it never holds T x T."""
    B, H, T, K = q_BHTK.shape
    total = 0.0
    for s in range(0, T, chunk):
        q_BHCK = q_BHTK[:, :, s : s + chunk]
        s_BHCT = (q_BHCK @ k_BHTK.transpose(-2, -1)) / math.sqrt(K)
        if causal:
            qi_C1 = torch.arange(s, s + q_BHCK.shape[2], device=q_BHTK.device)[:, None]
            s_BHCT = s_BHCT.masked_fill(torch.arange(T, device=q_BHTK.device)[None, :] > qi_C1, float("-inf"))
        p = s_BHCT.softmax(dim=-1)
        total += float((1.0 / (p * p).sum(dim=-1)).sum())
    return total / (B * H * T)


def calibrated(reference, x_BTD: torch.Tensor, score_std: float, calib_tokens: int = 1024) -> torch.Tensor:
    """x scaled so that the reference's scores q.k/sqrt(K) have standard deviation `score_std`
    (measured on its first `calib_tokens` positions). Scores are bilinear in x (the projections
    have no bias by default), so scaling x by s scales them by s^2."""
    from models.base import grouped_scores

    with torch.no_grad():
        q_BHTK, k_BhTK, _ = reference.split_heads(x_BTD[:, :calib_tokens])
        std0 = float(grouped_scores(q_BHTK, k_BhTK).std() / math.sqrt(reference.head_dim))
    return x_BTD * math.sqrt(score_std / std0)


class Fidelity(Task):
    """How far a mixer's output is from exact attention with the same weights on the same input.

    No training. The reference is the model config named by `reference` (the exact,
    score-materialising one); the variant under test gets the reference's parameters copied in
    by name (the Q/K/V and output projections), so only the mixing differs.

    Inputs: x ~ N(0, s^2) per entry, with s chosen so that the attention scores q.k/sqrt(K) have
    standard deviation `score_std`. The scale matters: with a default-initialised projection and
    unit inputs the scores have std ~0.1, the softmax is nearly uniform, and every approximation
    (and the plain mean of v) looks exact. For one query with Gaussian scores of std sigma, a
    softmax over n keys spreads over about n * exp(-sigma^2) of them (participation ratio);
    averaged over queries, whose norms differ, the spread is wider. The achieved figure is logged
    as `quality/attn_eff_keys` (tiny backbone, sigma = 2: ~40 of 1024 keys on average). The keys
    a query prefers are random here, not local: a window sees only part of them, which is what a
    long-range pattern costs a local approximation. Large scores are also where positive random
    features are noisy (their mean squared error grows like exp(|q + k|^2); Choromanski et al.
    2021, "Rethinking Attention with Performers"), so this is a hard setting for them; lower
    `score_std` to see the near-uniform regime.

    `quality/rel_err_uniform_mean` is the error of outputting the (running) mean of v, i.e.
    attention with equal weights: an approximation is only useful well below it.
    """

    name = "fidelity"
    trains = False

    def __init__(self, reference: str = "vanilla", score_std: float = 2.0, vocab_size: int = 256,
                 calib_tokens: int = 1024, **common):
        super().__init__(**common)
        if score_std <= 0:
            raise ValueError(f"task.score_std must be positive, got {score_std}")
        self.reference, self.score_std = reference, score_std
        self.vocab_size = vocab_size  # tokens for the inference timing (random ids)
        self.calib_tokens = calib_tokens

    def inputs(self, reference, batch: int, seq_len: int, seed: int, device) -> torch.Tensor:
        """x_BTD with the score standard deviation calibrated on the reference's projections."""
        g = torch.Generator().manual_seed(_stream_seed(seed, "fidelity"))
        x_BTD = torch.randn(batch, seq_len, reference.d_model, generator=g).to(device)
        return calibrated(reference, x_BTD, self.score_std, self.calib_tokens)

    def evaluate(self, reference, variant, x_BTD: torch.Tensor) -> dict[str, float]:
        """Metrics of `variant` against `reference` (already holding the same weights) on x."""
        with torch.no_grad():
            y_ref = reference(x_BTD)
            y = variant(x_BTD)
            q_BHTK, k_BHTK, v_BHTK = reference.split_heads(x_BTD)
            y_uni = reference.merge_heads(uniform_average(v_BHTK, reference.causal))
            ref_norm = y_ref.norm()
            return {
                R.QUALITY_REL_ERR_VS_EXACT: float((y - y_ref).norm() / ref_norm),
                R.QUALITY_REL_ERR_UNIFORM_MEAN: float((y_uni - y_ref).norm() / ref_norm),
                R.QUALITY_ATTN_EFF_KEYS: effective_keys(q_BHTK, k_BHTK, reference.causal),
                R.QUALITY_SCORE_STD: float(
                    (q_BHTK[..., : self.calib_tokens, :] @ k_BHTK[..., : self.calib_tokens, :].transpose(-2, -1)).std()
                    / math.sqrt(reference.head_dim)
                ),
            }


# FlashAttention's tests accept a kernel whose error in a dtype is at most twice plain PyTorch's
# in that dtype, plus a small floor (flash-attention tests/test_flash_attn.py, issue 1849)
PRECISION_FACTOR, PRECISION_FLOOR = 2.0, 1e-5


def within_rule(err: float, baseline: float) -> bool:
    """FlashAttention's rule: an error at most PRECISION_FACTOR x plain PyTorch's plus the floor."""
    return err <= PRECISION_FACTOR * baseline + PRECISION_FLOOR


def precision_errors(reference, variant, x_BTD: torch.Tensor, dtype: torch.dtype) -> tuple[dict[str, float], str]:
    """The variant run in `dtype` against itself in float32 (its weights cast, the same inputs
    cast), next to the same error of plain exact attention (`reference`, float32 weights shared
    with the variant), and the rule's verdict for an exact variant. Both modules stay float32."""
    import copy

    def err(m) -> float:
        with torch.no_grad():
            y32 = m(x_BTD).double()
            low = copy.deepcopy(m).to(dtype)
            y = low(x_BTD.to(dtype)).double()
        return float((y - y32).norm() / y32.norm())

    e_var, e_base = err(variant), err(reference)
    metrics = {R.QUALITY_REL_ERR_VS_FP32_REF: e_var, R.QUALITY_REL_ERR_TORCH_SAME_DTYPE: e_base}
    ratio = e_var / e_base if e_base > 0 else float("inf")
    if not variant.exact:
        return metrics, f"not judged: {type(variant).__name__} is not exact attention ({ratio:.2f}x plain PyTorch's error)"
    word = "pass" if within_rule(e_var, e_base) else "fail"
    return metrics, (f"{word}: {e_var:.3g} vs plain PyTorch {e_base:.3g} in {str(dtype).removeprefix('torch.')} "
                     f"({ratio:.2f}x; rule <= {PRECISION_FACTOR:g}x + {PRECISION_FLOOR:g})")


def copy_shared_weights(src: torch.nn.Module, dst: torch.nn.Module) -> list[str]:
    """Copy every parameter of `src` into the same-named, same-shaped one of `dst`. Raises when
    `dst` lacks one: a fidelity figure on weights that differ would be meaningless."""
    dst_state = dst.state_dict()
    missing = [k for k, v in src.state_dict().items() if k not in dst_state or dst_state[k].shape != v.shape]
    if missing:
        raise ValueError(
            f"{type(dst).__name__} has no parameter matching {missing} of {type(src).__name__}; "
            "fidelity needs the reference's Q/K/V/output projections under the same names"
        )
    dst.load_state_dict(src.state_dict(), strict=False)
    return list(src.state_dict())


