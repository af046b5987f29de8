"""Grouped-query and multi-query attention (`n_kv_heads` < `n_heads`): every variant that takes
it equals multi-head attention with its key and value heads repeated over their groups, in the
forward, the backward and decoding; its KV cache shrinks by exactly H / H_kv; a variant that
does not take it refuses in one line, before anything runs.

    .venv/bin/pytest -q tests/models/test_gqa.py
"""
from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError, to_dict
from pipeline.registry import build_mixer, discover_variants, load_variant_cfg
from pipeline.schema import check
from tests.models.test_decode import SMALL, decode
from tests.support import compose

D, H = 32, 4
VARIANTS = discover_variants()

pytestmark = pytest.mark.usefixtures("one_thread")


def build(name: str, n_kv_heads: int | None, causal: bool = True):
    cfg = load_variant_cfg(name, seq_len=2048)
    cfg.update({k: v for k, v in SMALL.items() if k in cfg})
    torch.manual_seed(0)
    return build_mixer(cfg, d_model=D, n_heads=H, causal=causal, n_kv_heads=n_kv_heads).double()


def grouped(name: str) -> bool:
    from hydra.utils import get_class

    return getattr(get_class(load_variant_cfg(name)["_target_"]), "grouped_kv", False)


def skip_if_refused(name: str, backward: bool) -> None:
    """These tests run in float64 on CPU: skip a variant that refuses that (its `refusal`)."""
    from hydra.utils import get_class

    if why := get_class(load_variant_cfg(name)["_target_"]).refusal("cpu", "float64", backward=backward):
        pytest.skip(why)


def as_multi_head(m, name: str, causal: bool):
    """The same variant with H key/value heads whose weights are m's, repeated over the groups."""
    mha = build(name, None, causal)
    K, h = m.head_dim, m.n_kv_heads
    w = m.qkv.weight.detach()
    q, k, v = w.split([D, m.kv_dim, m.kv_dim])
    rep = lambda x: x.view(h, K, D).repeat_interleave(H // h, dim=0).reshape(H * K, D)  # noqa: E731
    with torch.no_grad():
        mha.qkv.weight.copy_(torch.cat([q, rep(k), rep(v)]))
        mha.out.weight.copy_(m.out.weight)
    return mha


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_kv_heads", [2, 1])
@pytest.mark.parametrize("name", [v for v in VARIANTS if grouped(v)])
def test_grouped_equals_multi_head_with_repeated_keys_and_values(name, n_kv_heads, causal):
    skip_if_refused(name, backward=True)
    m = build(name, n_kv_heads, causal)
    assert m.qkv.weight.shape == (D + 2 * n_kv_heads * (D // H), D)
    ref = as_multi_head(m, name, causal)
    x = torch.randn(2, 21, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = m(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = ref(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    assert m.n_kv_heads == n_kv_heads and f"n_kv_heads={n_kv_heads}" in repr(m)


@pytest.mark.parametrize("n_kv_heads", [2, 1])
@pytest.mark.parametrize("name", [v for v in VARIANTS if grouped(v)])
def test_grouped_decoding_equals_its_forward_and_its_cache_shrinks_by_the_groups(name, n_kv_heads):
    skip_if_refused(name, backward=False)
    m = build(name, n_kv_heads)
    x = torch.randn(2, 13, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y_ref = m(x)
        for prompt in (0, 6, 13):
            torch.testing.assert_close(decode(m, x, prompt, max_len=16), y_ref, rtol=1e-10, atol=1e-12)
    state = m.init_state(2, 64)
    assert state.nbytes() == m.state_bytes(2, 64, dtype_bytes=8)
    mha = build(name, None)
    assert mha.state_bytes(2, 64) == m.state_bytes(2, 64) * (H // n_kv_heads)  # exactly H / H_kv
    # the K and V projections shrink with the heads; Q and the output do not
    assert mha.projection_flops(1, 100) - m.projection_flops(1, 100) == 2 * 100 * D * 2 * (D - n_kv_heads * D // H)


@pytest.mark.parametrize("name", [v for v in VARIANTS if not grouped(v)])
def test_a_variant_without_grouped_heads_refuses_them_in_one_line(name):
    from hydra.utils import get_class

    with pytest.raises(ValueError, match=r"does not take n_kv_heads=2 < n_heads=4 \(grouped-query attention\): "):
        get_class(load_variant_cfg(name)["_target_"])(d_model=D, n_heads=H, n_kv_heads=2)
    build(name, H)  # as many key/value heads as query heads is plain multi-head: accepted
    with pytest.raises(ConfigError) as e:
        check(to_dict(compose([f"model={name}", "backbone.n_heads=4", "backbone.n_kv_heads=2"])))
    assert "\n" not in str(e.value) and "grouped-query" in str(e.value)


@pytest.mark.parametrize("bad", [3, 0, 8])
def test_n_kv_heads_must_divide_n_heads(bad):
    with pytest.raises(ConfigError, match="must divide|positive"):
        check(to_dict(compose(["model=vanilla", "backbone.n_heads=4", f"backbone.n_kv_heads={bad}"])))
    from models.vanilla import VanillaAttention

    with pytest.raises(ValueError, match="positive divisor"):
        VanillaAttention(d_model=D, n_heads=H, n_kv_heads=bad)


def test_unset_kv_heads_keep_the_cells_identity():
    """Multi-head cells keep the config_hash they had before n_kv_heads existed."""
    from pipeline.config import config_hash

    d = to_dict(compose(["model=vanilla"]))
    assert "n_kv_heads" not in d["backbone"]
    assert config_hash(d) != config_hash(to_dict(compose(["model=vanilla", "backbone.n_kv_heads=1"])))
