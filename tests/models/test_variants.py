"""Tests of the sequence mixers: each fast path against its slow reference (forward and
gradients), the analytic models' orders and bad knobs. The contract every variant keeps (shapes,
causality, no T x T tensor, ...) is the conformance checks': tests/models/test_conformance.py.

    .venv/bin/pytest tests/test_variants.py -q
"""
from __future__ import annotations

import math

import pytest
import torch

from models.base import repeat_kv
from models.longformer import LongformerAttention, pattern_pairs
from models.performer import PerformerAttention, decayed_prefix
from models.ssm import S4DMixer
from models.vanilla import VanillaAttention
from models.xformers_attn import XformersAttention, load_xformers_ops
from pipeline.registry import build_mixer, discover_variants, load_variant_cfg

VARIANTS = discover_variants()
D, H = 32, 4
# knobs shrunk so blocks, windows and chunks are all exercised at toy lengths (matched by knob
# name, never by variant name): T = 37 is then a multiple of no block size
SMALL = {"window": 5, "global_tokens": 1, "chunk_size": 8, "features": 32, "state_size": 8}


def build(name: str, causal: bool = True, d: int = D, h: int = H, small: bool = True,
          seq_len: int = 2048, **knobs):
    cfg = load_variant_cfg(name, seq_len=seq_len)
    if small:
        cfg.update({k: v for k, v in SMALL.items() if k in cfg})
    cfg.update(knobs)
    return build_mixer(cfg, d_model=d, n_heads=h, causal=causal)


def grads(y: torch.Tensor, inputs: list[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    return list(torch.autograd.grad(y, inputs, g))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_discovery_lists_the_five_variants():
    assert {"vanilla", "xformers", "longformer", "performer", "ssm"} <= set(VARIANTS)


# ----------------------------------------------------------------------------- contract
# (shapes, batch, determinism, gradients, causality, no T x T tensor: tests/models/test_conformance.py)
@pytest.mark.parametrize("name", VARIANTS)
def test_analytic_models_follow_the_declared_orders(name):
    m = build(name, causal=True, small=False, d=256, h=4, seq_len=1 << 16)
    for fn, order in ((m.mixing_flops, m.time_order), (m.memory_bytes, m.memory_order)):
        a, b = fn(1, 1 << 16), fn(1, 1 << 17)
        assert 0 < a < b
        # doubling T multiplies the cost by ~2^order (T log T counts as order 1, hence the slack)
        assert 2 ** (order - 0.25) < b / a < 2 ** (order + 0.25), (fn.__name__, b / a)


# ------------------------------------------------------------------ bad parameters
@pytest.mark.parametrize("name", VARIANTS)
def test_d_model_not_divisible_by_heads(name):
    from hydra.errors import InstantiationException  # hydra wraps the constructor's ValueError

    with pytest.raises((ValueError, InstantiationException), match="d_model=30 is not divisible by n_heads=4"):
        build(name, d=30, h=4)


@pytest.mark.parametrize("window", [0, -3])
def test_longformer_rejects_nonpositive_window(window):
    with pytest.raises(ValueError, match="window"):
        LongformerAttention(D, H, window=window)


def test_longformer_rejects_negative_globals_and_too_many_at_forward():
    with pytest.raises(ValueError, match="global_tokens"):
        LongformerAttention(D, H, global_tokens=-1)
    m = LongformerAttention(D, H, window=4, global_tokens=8)
    m(torch.randn(1, 8, D))  # g == T is fine: every position is global
    with pytest.raises(ValueError, match="global_tokens=8 exceeds the sequence length T=7"):
        m(torch.randn(1, 7, D))


@pytest.mark.parametrize("features", [0, -1])
def test_performer_rejects_nonpositive_features(features):
    with pytest.raises(ValueError, match="features"):
        PerformerAttention(D, H, features=features)


def test_other_bad_knobs():
    with pytest.raises(ValueError, match="state_size"):
        S4DMixer(D, H, state_size=7)
    with pytest.raises(ValueError, match="backend"):
        XformersAttention(D, H, backend="triton")
    with pytest.raises(ValueError, match="chunk_size"):
        PerformerAttention(D, H, chunk_size=0)


# ------------------------------------------------------------------------ xformers
def _pair(cls, causal, **kw):
    torch.manual_seed(0)
    ref = VanillaAttention(D, H, causal=causal)
    m = cls(D, H, causal=causal, **kw)
    m.load_state_dict(ref.state_dict(), strict=False)
    return ref, m


@pytest.mark.parametrize("causal", [True, False])
def test_xformers_variant_equals_vanilla(causal):
    ref, m = _pair(XformersAttention, causal)
    x = torch.randn(2, 37, D, requires_grad=True)
    y, y_ref = m(x), ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads(y, [x, *m.parameters()]), grads(y_ref, [x, *ref.parameters()])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if x.device.type == "cpu":
        # the fused CPU kernel ran, and why xFormers did not is on record
        assert m.backend == "sdpa-flash"
        assert "CUDA" in m.fallback_reason


def test_xformers_forced_backends():
    x = torch.randn(1, 9, D)
    m = XformersAttention(D, H, backend="sdpa")
    m(x)
    assert m.backend.startswith("sdpa-") and "requested" in m.fallback_reason
    with pytest.raises(RuntimeError, match="backend='xformers' cannot run here: .*CUDA"):
        XformersAttention(D, H, backend="xformers")(x)


def test_xformers_refusal_keeps_every_operators_reason():
    """When xFormers' dispatcher has no operator, the recorded reason is one line that still
    names why each operator refused (here: CPU tensors), not just the first line."""
    if load_xformers_ops()[0] is None:
        pytest.skip("xformers not installed")
    m = XformersAttention(D, H, causal=True)
    y, reason = m._xformers(torch.randn(1, 16, D))
    assert y is None and "\n" not in reason
    assert reason.startswith("xformers has no operator for these inputs: No operator found")
    assert "is not supported because: | device=cpu" in reason  # each refused operator's why


def test_xformers_build_note_enables_pytorch_backed_operators(monkeypatch):
    """The installed xFormers wheel, as a CUDA build of PyTorch would see it: when its C++
    extension did not load, only operators that call PyTorch's own kernels are enabled, and
    the note says so; with the extension loaded nothing is touched."""
    import models.xformers_attn as xformers_attn
    try:
        from xformers import _cpp_lib
        from xformers.ops.fmha import common, cutlass
    except ImportError:
        pytest.skip("xformers not installed")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(common, "_built_with_cuda", False)
    for fn in (xformers_attn.load_xformers_ops, xformers_attn.xformers_build_note):
        fn.cache_clear()
    try:
        monkeypatch.setattr(_cpp_lib, "_cpp_library_load_exception", OSError("built for another torch\nline 2"))
        note = xformers_attn.xformers_build_note()
        assert "C++ extension not loaded (built for another torch | line 2)" in note
        assert cutlass.FwOp.NAME in note and common._built_with_cuda is True

        xformers_attn.xformers_build_note.cache_clear()
        monkeypatch.setattr(common, "_built_with_cuda", False)
        monkeypatch.setattr(_cpp_lib, "_cpp_library_load_exception", None)
        assert xformers_attn.xformers_build_note() is None and common._built_with_cuda is False
    finally:
        for fn in (xformers_attn.load_xformers_ops, xformers_attn.xformers_build_note):
            fn.cache_clear()


# ---------------------------------------------------------------------- longformer
def dense_longformer(m: LongformerAttention, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The pattern of the docstring as a dense (T, T) mask over vanilla scores, key/value heads
    repeated (reference only; tests/models/test_flex.py holds FlexAttention to it too)."""
    q, k, v = m.split_heads(x)
    k, v = repeat_kv(k, m.n_heads), repeat_kv(v, m.n_heads)
    T, w, g = x.shape[1], m.window, m.global_tokens
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    glob = (i < g) | (j < g)
    if m.causal:
        ok = (j <= i) & ((i - j <= w) | glob)
    else:
        ok = ((i - j).abs() <= w) | glob
    s = (q @ k.transpose(-2, -1)) / math.sqrt(m.head_dim)
    y = s.masked_fill(~ok, float("-inf")).softmax(-1) @ v
    return m.merge_heads(y), int(ok.sum())


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T,window,globals_,chunk", [
    (1, 3, 0, 4), (1, 3, 1, 4), (7, 2, 1, 4), (37, 5, 3, 8), (37, 5, 0, 8), (64, 16, 4, 16),
    (33, 4, 6, 3), (40, 9, 2, 32), (203, 16, 4, 16),
])
@pytest.mark.parametrize("split", [True, False], ids=["lse-merge", "one-softmax"])
def test_longformer_equals_dense_masked_reference(causal, T, window, globals_, chunk, split):
    """Both paths: window and globals as two fused calls merged by log-sum-exp (CPU), and one
    softmax over the gathered keys (every device)."""
    torch.manual_seed(0)
    m = LongformerAttention(D, H, causal=causal, window=window, global_tokens=globals_, chunk_size=chunk)
    m.split_globals = split
    x = torch.randn(2, T, D, requires_grad=True)
    y = m(x)
    y_ref, pairs = dense_longformer(m, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads(y, [x, *m.parameters()]), grads(y_ref, [x, *m.parameters()])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert pattern_pairs(T, window, globals_, causal) == pairs  # the FLOP count is exact
    assert m.mixing_flops(2, T) == 4 * 2 * H * (D // H) * pairs
    assert m.backend == ("blockwise-band:sdpa-flash-lse-merge" if split else "blockwise-band:sdpa-flash")
    # masks cover every chunk once; interior chunks share one broadcast (1, 1, C, G+L) mask
    runs = m._chunk_masks(T, x.device, x.dtype)
    n0, n1 = m._interior(T)
    assert [lo for lo, _, _ in runs][0] == 0 and runs[-1][1] == -(-T // min(chunk, T))
    assert all(hi == lo2 for (_, hi, _), (lo2, _, _) in zip(runs, runs[1:]))
    assert all(mask.shape[1] == (1 if (lo, hi) == (n0, n1) else hi - lo) for lo, hi, mask in runs)
    if T == 203:
        assert n1 - n0 >= 8  # this case has a long interior


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [36, 37, 100])
def test_longformer_with_window_at_least_T_is_vanilla(causal, window):
    ref, m = _pair(LongformerAttention, causal, window=window, global_tokens=3, chunk_size=8)
    x = torch.randn(2, 37, D, requires_grad=True)
    y, y_ref = m(x), ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads(y, [x, *m.parameters()]), grads(y_ref, [x, *ref.parameters()])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------- performer
def test_decayed_prefix_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    for N in (1, 2, 5, 16, 17, 50):
        s = torch.randn(2, 3, N, 7, generator=g, dtype=torch.float64)
        r = (3 * torch.randn(2, 3, N, generator=g, dtype=torch.float64)).cummax(-1).values
        ref = torch.zeros_like(s)
        for n in range(N):
            for k in range(n):
                ref[:, :, n] += s[:, :, k] * torch.exp(r[:, :, k] - r[:, :, n]).unsqueeze(-1)
        torch.testing.assert_close(decayed_prefix(s, r), ref)


@pytest.mark.parametrize("block_rows", [None, 1, 3 * 2 * H * 8])
@pytest.mark.parametrize("T,chunk", [(1, 4), (7, 4), (37, 8), (64, 16), (100, 7)])
def test_performer_chunked_causal_equals_quadratic_form(T, chunk, block_rows):
    """Same random features: the chunked prefix sums equal the masked (T, T) linear attention,
    with all chunks at once, a block per chunk, or blocks of several chunks."""
    torch.manual_seed(0)
    m = PerformerAttention(D, H, causal=True, features=16, chunk_size=chunk).double()
    m.cpu_block_rows = block_rows
    x = torch.randn(2, T, D, dtype=torch.float64, requires_grad=True)
    y = m(x)
    q, k, v = m.split_heads(x)
    a = (torch.exp(m._logits(q)) @ torch.exp(m._logits(k)).transpose(-2, -1)).tril()
    y_ref = m.merge_heads((a @ v) / a.sum(-1, keepdim=True))
    torch.testing.assert_close(y, y_ref)
    for u, w in zip(grads(y, [x, *m.parameters()]), grads(y_ref, [x, *m.parameters()])):
        torch.testing.assert_close(u, w)


def test_performer_blocks_carry_the_stabiliser_across_blocks():
    """Keys that grow along T move the running max in every block: blocks of one or three chunks
    (each rescaling the state carried from the blocks before) equal all chunks at once, fp32."""
    torch.manual_seed(0)
    m = PerformerAttention(D, H, causal=True, features=32, chunk_size=8)
    x = torch.randn(2, 100, D) * torch.linspace(0.5, 4.0, 100).view(1, 100, 1)
    x.requires_grad_(True)
    m.cpu_block_rows = None
    y_ref = m(x)
    assert m.backend == "favor+-chunked"
    g_ref = grads(y_ref, [x, *m.parameters()])
    for rows in (1, 3 * 2 * H * 8):
        m.cpu_block_rows = rows
        y = m(x)
        assert m.backend == "favor+-chunked:cpu-blocks"
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads(y, [x, *m.parameters()]), g_ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_performer_error_falls_with_more_features(causal):
    """Relative error vs exact softmax attention, averaged over seeds, shrinks 64 -> 256 -> 1024
    features (~1/sqrt(M)), and beats the uniform-attention baseline (mean of the visible values).

    FAVOR+'s variance grows like exp(|q|^2 + |k|^2) / M (paper, Lemma 2), so sharp attention
    made of large random q, k would need far more features; the default-initialised projections
    give logits of std ~0.3, attention that the uniform mean misses by > 30 %.
    """
    torch.manual_seed(0)
    d, h, T = 64, 2, 128
    ref = VanillaAttention(d, h, causal=causal)
    x = torch.randn(2, T, d)
    with torch.no_grad():
        y_ref = ref(x)
        _, _, v = ref.split_heads(x)
        if causal:
            mean_v = v.cumsum(2) / torch.arange(1, T + 1).view(1, 1, T, 1)
        else:
            mean_v = v.mean(2, keepdim=True).expand_as(v)
        baseline = rel(ref.merge_heads(mean_v), y_ref)
        assert baseline > 0.3  # the attention is far enough from uniform for the test to mean something
        errs = {}
        for feats in (64, 256, 1024):
            e = []
            for seed in range(4):
                m = PerformerAttention(d, h, causal=causal, features=feats, seed=seed, chunk_size=32)
                m.load_state_dict(ref.state_dict(), strict=False)
                e.append(rel(m(x), y_ref))
            errs[feats] = sum(e) / len(e)
    assert errs[64] > 1.2 * errs[256] > 1.2 * 1.2 * errs[1024], errs
    assert errs[1024] < 0.75 * baseline, (errs, baseline)


def test_performer_features_are_orthogonal_blocks_and_redraw_is_seeded():
    m = PerformerAttention(D, H, features=20, redraw=True, seed=3)  # K = 8: blocks of 8 rows
    w = m.proj_MK.double()
    unit = w / w.norm(dim=1, keepdim=True)
    torch.testing.assert_close(unit[:8] @ unit[:8].T, torch.eye(8, dtype=torch.float64), atol=1e-6, rtol=0)
    before = m.proj_MK.clone()
    m.train()(torch.randn(1, 5, D))
    assert not torch.equal(before, m.proj_MK)  # redrawn in training
    m2 = PerformerAttention(D, H, features=20, redraw=True, seed=3)
    m2.train()(torch.randn(1, 5, D))
    torch.testing.assert_close(m.proj_MK, m2.proj_MK)  # ... from the seeded generator
    m.eval()(torch.randn(1, 5, D))
    assert torch.equal(m.proj_MK, m2.proj_MK)  # not in eval


# ----------------------------------------------------------------------------- ssm
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T", [1, 7, 37, 128])
def test_ssm_fft_equals_recurrence(causal, T):
    torch.manual_seed(0)
    m = S4DMixer(D, H, causal=causal, state_size=8)
    x = torch.randn(2, T, D)
    y = m(x)
    assert m.backend == "fft-conv"
    torch.testing.assert_close(y, m.forward_recurrent(x), rtol=1e-4, atol=1e-5)
