"""FlexWindowAttention (models/flex.py): compiled FlexAttention on Longformer's pattern equals the
dense masked reference and LongformerAttention on the same weights; grouped heads equal repeated
ones; the block mask is built without a T x T tensor; where it cannot run it says so in one line,
in the mixer, in the schema and in a kernel cell.

Each new (shape, pattern) compiles the kernel (~4-5 s on a 2-core CPU, less from inductor's
on-disk cache), so the cases share shapes where they can.

    .venv/bin/pytest -q tests/models/test_flex.py
"""
from __future__ import annotations

import pytest
import torch

from models.flex import FlexWindowAttention, block_pattern, window_block_mask
from models.longformer import LongformerAttention
from pipeline.config import ConfigError, to_dict
from pipeline.probes import ShapeRecorder, quadratic
from pipeline.schema import check
from tests.models.test_variants import dense_longformer
from tests.support import compose

D, H = 32, 4


def dense_pattern(m, x_BTD: torch.Tensor) -> torch.Tensor:
    return dense_longformer(m, x_BTD)[0]  # the pattern as a dense mask, Longformer's reference


def flex(causal=True, window=5, global_tokens=3, block_size=16, n_kv_heads=None, d=D, h=H):
    torch.manual_seed(0)
    return FlexWindowAttention(d, h, causal=causal, window=window, global_tokens=global_tokens,
                               block_size=block_size, n_kv_heads=n_kv_heads)


# (causal, T, window, global tokens, block): T = 1; T a multiple of no block (37 over blocks of 16,
# 300 over 128); T below one block (100 < 128); globals 0 and > 0, both directions
# (each case is a compile, 4-5 s on 2 cores: two in the fast suite, the rest with the slow tests)
_slow = pytest.mark.slow
CASES = [pytest.param(True, 1, 3, 0, 128, marks=_slow), (True, 37, 5, 3, 16),
         pytest.param(False, 37, 5, 3, 16, marks=_slow), pytest.param(True, 100, 20, 0, 128, marks=_slow),
         pytest.param(False, 100, 20, 4, 128, marks=_slow), pytest.param(True, 300, 40, 0, 128, marks=_slow),
         (False, 300, 40, 3, 128)]


@pytest.mark.parametrize("causal,T,window,g,block", CASES)
def test_flex_equals_the_dense_reference_and_longformer(causal, T, window, g, block):
    m = flex(causal, window, g, block)
    ours = LongformerAttention(D, H, causal=causal, window=window, global_tokens=g, chunk_size=8)
    ours.load_state_dict(m.state_dict())  # the same parameter names: fidelity copies vanilla's weights so
    x = torch.randn(2, T, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = m(x)
        torch.testing.assert_close(y, dense_pattern(m, x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y, ours(x), rtol=1e-5, atol=1e-6)
    assert m.backend == f"flex-compiled:block{block}"
    assert m.mixing_flops(2, T) == ours.mixing_flops(2, T)  # the analytic models are Longformer's


@pytest.mark.parametrize("causal", [True, False])
def test_block_tables_agree_with_the_pattern(causal):
    """Partial and full blocks, from block arithmetic, against the dense pattern cut into blocks
    (a test-only (T, T) grid): full blocks are all allowed, skipped ones none, partial ones mixed."""
    for T, w, g, b in [(37, 5, 3, 16), (300, 40, 3, 128), (200, 7, 20, 16), (64, 63, 0, 16)]:
        partial, full = block_pattern(T, w, g, causal, b, torch.device("cpu"))
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        glob = (i < g) | (j < g)
        ok = (j <= i) & ((i - j <= w) | glob) if causal else ((i - j).abs() <= w) | glob
        nb = -(-T // b)
        pad = torch.zeros(nb * b, nb * b, dtype=torch.int64)
        pad[:T, :T] = ok
        real = torch.zeros_like(pad)
        real[:T, :T] = 1
        allowed = pad.view(nb, b, nb, b).sum((1, 3))
        cells = real.view(nb, b, nb, b).sum((1, 3))
        assert torch.equal(full, allowed == cells)
        assert torch.equal(partial, (allowed > 0) & (allowed < cells))


def test_grouped_heads_equal_repeated_keys_and_values():
    m = flex(n_kv_heads=2)
    x = torch.randn(2, 37, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(m(x), dense_pattern(m, x), rtol=1e-5, atol=1e-6)


def test_no_T_by_T_tensor_at_2048():
    """The block mask at T = 2048 is built from (T/b)^2 block tables, nothing of T x T (the shape
    recorder sees every aten op); the kernel itself runs only compiled, where a dispatch mode
    cannot see in, so it is held to its memory instead: a forward's peak stays far below one
    (B, H, T, T) fp32 score tensor, which the dense eager path would build several of."""
    from pipeline.measure import PeakMemory

    T, d, h = 2048, 256, 8
    window_block_mask.cache_clear()
    with ShapeRecorder() as rec:
        mask = window_block_mask(T, 512, 16, True, 128, "cpu", True)  # with the backward's tables too
    assert rec.shapes and not quadratic(rec.shapes, T), quadratic(rec.shapes, T)
    assert mask.kv_indices.shape == (1, 1, T // 128, T // 128)

    m = flex(window=512, global_tokens=16, block_size=128, d=d, h=h).eval()
    x = torch.randn(1, T, d)
    with torch.no_grad():
        m(x)  # compiles
        with ShapeRecorder(), pytest.raises(RuntimeError, match="TorchDispatchMode") as e:
            m(x)  # under a dispatch mode torch.compile would skip it: refused, never run eagerly
        assert "\n" not in str(e.value)
        with PeakMemory("cpu") as pm:
            m(x)
    if "clear_refs" not in pm.method:
        pytest.skip(f"no resettable high-water mark here ({pm.method})")
    score_mb = h * T * T * 4 / 2**20  # 128 MiB
    assert pm.peak_mb < score_mb / 4, (pm.peak_mb, score_mb)


def test_cpu_refusals_are_one_line():
    m = flex()
    x = torch.randn(2, 37, D)
    with pytest.raises(RuntimeError) as e:
        m(x)  # grad on: a backward would follow, and CPU has none
    assert str(e.value) == FlexWindowAttention.refusal("cpu", "float32", backward=True)
    assert "no backward on cpu" in str(e.value)
    with torch.no_grad(), pytest.raises(RuntimeError) as e:
        m.double()(x.double())
    assert str(e.value) == FlexWindowAttention.refusal("cpu", "float64") and "not float64" in str(e.value)
    assert FlexWindowAttention.refusal("cuda", "float64", backward=True) is None
    assert FlexWindowAttention.refusal("cpu", "bfloat16") is None


def test_schema_refuses_training_on_cpu_and_accepts_fidelity():
    with pytest.raises(ConfigError) as e:
        check(to_dict(compose(["scenario=full", "task=mqar", "model=flex", "seq_len=64"])))
    msg = str(e.value)
    assert "\n" not in msg and "model=flex" in msg and "no backward on cpu" in msg
    with pytest.raises(ConfigError, match="not float64"):
        check(to_dict(compose(["scenario=kernel", "model=flex", "backbone.dtype=float64"])))
    check(to_dict(compose(["scenario=train", "task=fidelity", "model=flex"])))  # no backward: accepted
    check(to_dict(compose(["scenario=kernel", "model=flex"])))  # forward+backward is skipped in the cell
    check(to_dict(compose(["scenario=full", "task=mqar", "model=flex", "seq_len=64", "trainer=gpu"])))  # CUDA has one


def test_kernel_cell_measures_the_forward_and_skips_the_backward():
    from pipeline import record as R
    from pipeline.execute import preflight
    from pipeline.scenarios.base import CellResult
    from pipeline.scenarios.kernel import run_kernel
    from pipeline.schema import scenario_section, workload

    # the shapes of the equality test's (causal, 37, 5, 3, 16) case: its compiled kernel is reused
    d = to_dict(compose(["scenario=kernel", "model=flex", "seq_len=37", "batch_size=2", f"backbone.d_model={D}",
                         f"backbone.n_heads={H}", "model.window=5", "model.global_tokens=3", "model.block_size=16",
                         "scenario.warmup=1", "scenario.warmup_s=0", "scenario.min_repeats=2", "scenario.min_time_s=0",
                         "scenario.noise_max_s=0"]))
    check(d)
    device, result = torch.device("cpu"), CellResult()
    run_kernel(scenario_section(d), workload(d), preflight(d, device), device, result)
    assert result.tags[R.FWDBWD_SKIPPED] == FlexWindowAttention.refusal("cpu", "float32", backward=True)
    assert result.metrics[R.KERNEL_FWD_MS] > 0 and R.KERNEL_FWDBWD_MS not in result.metrics
    assert result.tags[R.BACKEND] == "flex-compiled:block16"
    assert "TorchDispatchMode" in result.tags[R.FLOPS_COUNTED_NOTE]  # the counter cannot see a compiled kernel
