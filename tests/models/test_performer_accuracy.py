"""Performer's accuracy on real mixers: its relative error vs exact softmax attention (same
projections, same inputs) falls as the random features grow, and beats the uniform mean of the
values (what attention with equal weights outputs), on plain random inputs and on the fidelity
task's sharper ones.

    .venv/bin/pytest -q tests/models/test_performer_accuracy.py
"""
from __future__ import annotations

import pytest
import torch

from models.performer import PerformerAttention, norm_cap_value
from models.vanilla import VanillaAttention
from pipeline.fidelity import Fidelity, uniform_average

D, H, T = 256, 4, 1024  # 4 heads of 64, as in the benchmark's fidelity cells

pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def setting(causal: bool, inputs: str):
    """The exact reference, its input, its output and the uniform-mean baseline's error."""
    torch.manual_seed(0)
    ref = VanillaAttention(D, H, causal=causal)
    if inputs == "fidelity":  # scores of std 2: ~peaked attention (see pipeline/fidelity.py)
        x = Fidelity().inputs(ref, 1, T, seed=0, device="cpu")
    else:  # default-initialised projections of unit inputs: scores of std ~0.3
        x = torch.randn(1, T, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_ref = ref(x)
        _, _, v = ref.split_heads(x)
        baseline = rel(ref.merge_heads(uniform_average(v, causal)), y_ref)
    return ref, x, y_ref, baseline


def error(ref, x, y_ref, causal: bool, **knobs) -> float:
    m = PerformerAttention(D, H, causal=causal, **knobs)
    m.load_state_dict(ref.state_dict(), strict=False)
    with torch.no_grad():
        return rel(m(x), y_ref)


@pytest.mark.parametrize("causal", [True, False])
def test_error_falls_as_features_grow(causal):
    """Same inputs, same seed: 16 -> 64 -> 256 features, each step clearly better."""
    ref, x, y_ref, _ = setting(causal, "plain")
    errs = [error(ref, x, y_ref, causal, features=f, seed=0) for f in (16, 64, 256)]
    assert errs[0] > 1.1 * errs[1] > 1.1 * 1.1 * errs[2], errs


@pytest.mark.parametrize("inputs", ["plain", "fidelity"])
@pytest.mark.parametrize("causal", [True, False])
def test_default_beats_the_uniform_mean_and_the_uncapped_estimator(causal, inputs):
    """The default (norm cap "auto") is below the uniform mean's error, where plain FAVOR+
    (no cap: unbiased, but with a variance exp(|x + y|^2) / M that these norms blow up) is not."""
    ref, x, y_ref, baseline = setting(causal, inputs)
    capped = error(ref, x, y_ref, causal)
    uncapped = error(ref, x, y_ref, causal, norm_cap=None)
    margin = 0.85 if inputs == "plain" else 0.98  # sharp attention: every estimator ends near the mean
    assert capped < margin * baseline, (capped, baseline)
    assert capped < uncapped, (capped, uncapped)


def test_norm_cap_values():
    assert norm_cap_value("auto", 256) == pytest.approx(torch.log(torch.tensor(256.0)).item() / 4)
    assert norm_cap_value(None, 256) is None and norm_cap_value("off", 256) is None
    assert norm_cap_value(2, 256) == 2.0
    for bad in (0, -1.0, True, "big"):
        with pytest.raises(ValueError, match="norm_cap"):
            PerformerAttention(32, 4, norm_cap=bad)
