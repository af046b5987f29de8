"""The conformance checks (pipeline/conformance) over every variant in conf/model/, and one broken
mixer per check (tests/faults.py) that the check must fail with its one-line reason.

    .venv/bin/pytest -q tests/models/test_conformance.py
"""
from __future__ import annotations

import pytest

from pipeline.conformance import CHECKS, Subject, run_check
from pipeline.conformance.__main__ import main
from pipeline.registry import build_mixer, discover_variants, load_variant_cfg
from tests.support import variant_params

VARIANTS = discover_variants()

PARAMS = variant_params()  # a variant that runs only compiled: in the slow suite
# knobs shrunk (matched by knob name, never by variant name) so windows, chunks and global tokens
# end inside the behavioural checks' short lengths (7, 37, 260)
SMALL = {"window": 5, "global_tokens": 2, "chunk_size": 8, "features": 32, "state_size": 8}
COST = ("no-TxT", "memory-order", "time-order")  # at the shipped knobs, T = 1024 ... 4096
BEHAVIOUR = [c for c in CHECKS if c not in COST]

pytestmark = pytest.mark.usefixtures("one_thread")


def subject(name: str, causal: bool = True, small: bool = True, **shape) -> Subject:
    cfg = load_variant_cfg(name, seq_len=4096)
    if small:
        cfg.update({k: v for k, v in SMALL.items() if k in cfg})
    return Subject(model=cfg, causal=causal, **({"d_model": 32} | shape))


def fault(cls: str) -> Subject:
    return Subject(model={"name": cls, "_target_": f"tests.faults.{cls}"})


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name", PARAMS)
@pytest.mark.parametrize("check", BEHAVIOUR)
def test_every_variant_conforms(check, name, causal):
    out = run_check(check, subject(name, causal))
    assert out.status != "fail", out.line()
    m = build_mixer(subject(name).model, d_model=32, n_heads=4, causal=causal)
    if check == "exactness" and m.exact:
        assert out.status == "pass", out.line()  # an exact variant is judged, never only measured
    if check == "causality":
        assert out.status == "pass", out.line()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name", PARAMS)
@pytest.mark.parametrize("check", ["no-TxT", "memory-order"])
def test_every_variant_keeps_its_cost_claims(check, name, causal):
    """The shipped knobs at T = 2048 (no T x T tensor) and 1024 ... 4096 (memory exponent, from the
    bytes ops return: deterministic, so a fast test)."""
    out = run_check(check, subject(name, causal, small=False, d_model=64))
    assert out.status != "fail", out.line()


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_keeps_its_time_claim(name):
    """Measured time: slow, since a shared machine's noise can push a narrow exponent over."""
    out = run_check("time-order", subject(name, small=False))
    assert out.status != "fail", out.line()


@pytest.mark.parametrize("check,cls,reason", [
    ("shapes", "UpcastsOutput", "T=37 float64: returns float32"),
    ("batch", "MixesTheBatch", "the sequences of a batch mix"),
    ("determinism", "DropoutInEval", "two builds under one seed differ by"),
    ("gradients", "DetachedGate", "parameter gate gets no gradient"),
    ("exactness", "Unscaled", "output in float32: error 1."),
    ("causality", "PeeksAhead", "outputs before position 1 change when inputs from 1 on change"),
    ("causality", "LeaksInBackward", "the backward sees the future"),
    ("no-TxT", "MaskedWindow", "returns a (2048, 2048) tensor at T=2048"),
    ("memory-order", "RowChunkedDense", "declared T^1"),
    ("decoding", "PrefillForgetsTheCache", "differ from the causal forward"),
])
def test_each_check_catches_its_defect(check, cls, reason):
    out = run_check(check, fault(cls))
    assert out.status == "fail" and reason in out.reason, out.line()
    assert "\n" not in out.line()


@pytest.mark.slow
def test_time_order_catches_quadratic_work_declared_linear():
    out = run_check("time-order", fault("RowChunkedDense"))
    assert out.status == "fail" and "declared T^1" in out.reason, out.line()


def test_a_broken_mixer_passes_the_checks_it_does_not_break():
    """The checks test one thing each: a mixer that sees the future still has the right shapes,
    mixes no batch and is deterministic."""
    s = fault("PeeksAhead")
    assert [run_check(c, s).status for c in ("shapes", "batch", "determinism", "gradients")] == ["pass"] * 4


def test_an_exception_is_the_checks_failure_in_one_line():
    out = run_check("shapes", fault("Raising"))
    assert out.status == "fail" and out.reason == "raised ValueError: injected failure in forward", out.line()


def test_the_command_line_prints_a_line_per_check_and_its_exit_status(capsys):
    assert main(["model=longformer", "model.window=5", "model.global_tokens=2", "--checks", "causality,decoding"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("conformance of models.longformer.LongformerAttention as model=longformer")
    assert out[1].split()[:2] == ["pass", "causality"] and out[2].split()[:2] == ["pass", "decoding"]
    assert out[3].startswith("2 passed, 0 failed")
    assert main(["model=vanilla", "--checks", "nosuch"]) == 2
    assert "unknown check(s) nosuch" in capsys.readouterr().err


@pytest.mark.parametrize("target,flags", [
    ("examples.my_attention.MyAttention", ["model.exact=true", "model.memory_order=1"]),
    ("examples.local_attention_mixer.LocalAttentionMixer", ["+model.window=32", "model.time_order=1", "model.memory_order=1"]),
])
def test_the_examples_conform(target, flags, capsys):
    """The documented examples (docs/custom_attention.md), a plain nn.Module each, through
    model=custom: every check but the timed one passes."""
    checks = ",".join(c for c in CHECKS if c != "time-order")
    assert main(["model=custom", f"model._target_={target}", *flags, "--checks", checks]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert f"conformance of {target} as model={target.rpartition('.')[2]}" in out and " 0 failed" in out


def test_a_users_broken_mixer_fails_on_the_command_line(capsys):
    assert main(["model=custom", "model._target_=tests.faults.PeeksAhead", "--checks", "shapes,causality"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:2] == ["pass", "shapes"]
    assert lines[2].split()[:2] == ["fail", "causality"] and "the mixer sees the future" in lines[2]
    assert lines[3].startswith("1 passed, 1 failed")
