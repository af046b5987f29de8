"""Tests of token-by-token decoding: every discovered variant's step (and prefill + step) equals
its causal forward over the whole sequence, the measured state equals the analytic size, bad
use is refused in one line, the token model decodes as it forwards, and the decode scenario
records its figures without building anything n x n.

    .venv/bin/pytest -q tests/models/test_decode.py
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from models.base import SequenceMixer
from models.lm import TokenModel
from models.longformer import LongformerAttention
from models.performer import PerformerAttention
from pipeline.probes import ShapeRecorder, quadratic
from pipeline.registry import build_mixer, discover_variants, load_variant_cfg, mixer_factory
from tests.support import variant_params

VARIANTS = discover_variants()
PARAMS = variant_params()  # a variant that runs only compiled: its cases in the slow suite
D, H = 32, 4
# knobs shrunk (matched by knob name, never by variant name) so windows (w + 1 = 6 ring slots),
# causal chunks (8) and the global tokens (2) all end mid-sequence at the lengths below
SMALL = {"window": 5, "global_tokens": 2, "chunk_size": 8, "features": 32, "state_size": 8}

pytestmark = pytest.mark.usefixtures("one_thread")


def build(name: str, causal: bool = True, d: int = D, h: int = H, small: bool = True, seq_len: int = 2048, **knobs):
    cfg = load_variant_cfg(name, seq_len=seq_len)
    if small:
        cfg.update({k: v for k, v in SMALL.items() if k in cfg})
    cfg.update(knobs)
    torch.manual_seed(0)
    return build_mixer(cfg, d_model=d, n_heads=h, causal=causal)


def decode(m: SequenceMixer, x: torch.Tensor, prompt: int, max_len: int | None = None) -> torch.Tensor:
    """Prefill the first `prompt` positions (none: step from an empty state), step the rest."""
    B, T, _ = x.shape
    state = m.init_state(B, max_len or T)
    ys = []
    if prompt:
        y, state = m.prefill(x[:, :prompt], state)
        ys.append(y)
    for t in range(prompt, T):
        y, state = m.step(x[:, t:t + 1], state)
        ys.append(y)
    assert state.pos == T
    return torch.cat(ys, dim=1)


# ----------------------------------------------------------------------------- contract
@pytest.mark.parametrize("name", PARAMS)
def test_every_variant_can_decode(name):
    """A new variant without step fails here, by name."""
    m = build(name)
    assert m.has_step(), f"{name} ({type(m).__name__}) implements no step: add _new_state/_step/state_bytes"
    assert isinstance(m.constant_state, bool)
    assert m.state_bytes(1, 64) > 0


# (prefill + steps against the causal forward at short lengths: the conformance check "decoding",
# tests/models/test_conformance.py)
@pytest.mark.parametrize("name", variant_params())
def test_long_decode_with_the_shipped_knobs(name):
    """n = 1100 with the shipped knobs (window 512, chunks of 128 / 256 ending mid-sequence):
    stepping from the start and after a 700-token prefill stay within fp32 tolerance of the
    forward (assert_close's float32 defaults: the SSM's complex64 recurrence accumulates
    ~1e-6 relative over a thousand steps)."""
    T = 1100
    m = build(name, d=64, h=2, small=False, seq_len=T)
    x = torch.randn(1, T, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y_ref = m(x)
        for prompt in (0, 700):
            torch.testing.assert_close(decode(m, x, prompt), y_ref)


@pytest.mark.parametrize("name", PARAMS)
def test_decoding_in_float64(name):
    m = build(name)
    if why := m.refusal("cpu", "float64"):
        pytest.skip(why)
    m = m.double()
    x = torch.randn(1, 13, D, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(decode(m, x, 5), m(x))


@pytest.mark.parametrize("name", PARAMS)
def test_measured_state_equals_the_analytic_size(name):
    m = build(name)
    for B, max_len in ((1, 1), (2, 5), (3, 40)):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            st = m.to(dtype).init_state(B, max_len)
            bytes_ = torch.empty((), dtype=dtype).element_size()
            assert st.nbytes() == m.state_bytes(B, max_len, bytes_), (B, max_len, dtype)
            assert all(t.dtype in (dtype, torch.float32, torch.complex64, torch.complex128)
                       for t in st.tensors.values())


@pytest.mark.parametrize("name", PARAMS)
def test_constant_state_flag_matches_the_size_formula(name):
    m = build(name, small=False, d=256, h=4)
    a, b = m.state_bytes(1, 1 << 16), m.state_bytes(1, 1 << 17)
    if m.constant_state:
        assert a == b
        assert m.context_for_budget(1, 2 * a) is None  # it never fills the budget
    else:
        assert b == 2 * a  # a KV cache: linear in the context
        L = m.context_for_budget(1, a)
        assert m.state_bytes(1, L) <= a < m.state_bytes(1, L + 1)
        assert L == 1 << 16
    assert m.context_for_budget(1, 0.5) == 0


@pytest.mark.parametrize("name", PARAMS)
def test_bidirectional_mixer_refuses_to_decode(name):
    m = build(name, causal=False)
    with pytest.raises(ValueError, match="needs a causal mixer: .*causal=False"):
        m.init_state(1, 8)


@pytest.mark.parametrize("name", PARAMS)
def test_step_past_max_len_and_other_misuse(name):
    m = build(name)
    x = torch.randn(1, 4, D)
    with torch.no_grad():
        st = m.init_state(1, 4)
        m.prefill(x[:, :3], st)
        m.step(x[:, 3:4], st)
        with pytest.raises(ValueError, match=r"decoding past max_len: 1 token\(s\) at position 4 exceed the state's max_len=4"):
            m.step(x[:, 3:4], st)
        with pytest.raises(ValueError, match="prefill needs an empty state"):
            m.prefill(x, st)
        with pytest.raises(ValueError, match="past max_len"):
            m.prefill(torch.randn(1, 5, D), m.init_state(1, 4))
        with pytest.raises(ValueError, match=r"one token per sequence"):
            m.step(x[:, :2], m.init_state(1, 4))
        with pytest.raises(ValueError, match="expected input"):
            m.step(torch.randn(2, 1, D), m.init_state(1, 4))
        with pytest.raises(ValueError, match="max_len must be a positive integer"):
            m.init_state(1, 0)


def test_a_mixer_without_step_fails_loudly():
    class NoStep(SequenceMixer):
        def forward(self, x):
            return x

    m = NoStep(D, H)
    assert not NoStep.has_step()
    with pytest.raises(NotImplementedError, match="NoStep has no step interface"):
        m.init_state(1, 4)
    with pytest.raises(NotImplementedError, match="NoStep has no analytic decoding-state size"):
        m.state_bytes(1, 4)


# ------------------------------------------------------------------- variant specifics
@pytest.mark.parametrize("T,window,globals_,chunk,max_len", [
    (20, 1, 0, 4, 20), (20, 3, 5, 8, 25), (37, 36, 3, 8, 37), (30, 100, 2, 8, 30),
    (24, 4, 0, 5, 9000), (40, 7, 1, 16, 40),
])
def test_longformer_ring_buffer_edges(T, window, globals_, chunk, max_len):
    """No globals, a window of one, a window >= T (exact attention; ring clipped to max_len),
    and prompts ending before, inside and after the ring's first wrap."""
    torch.manual_seed(0)
    m = LongformerAttention(D, H, window=window, global_tokens=globals_, chunk_size=chunk)
    x = torch.randn(2, T, D)
    with torch.no_grad():
        y_ref = m(x)
        for prompt in (0, globals_, window, window + 1, T - 2):
            if 0 <= prompt <= T:
                torch.testing.assert_close(decode(m, x, prompt, max_len=max_len if prompt else T), y_ref,
                                           rtol=1e-5, atol=1e-6)
    G, R = min(globals_, max_len), min(window + 1, max_len)
    assert m.state_bytes(1, max_len) == 2 * (G + R) * D * 4


@pytest.mark.parametrize("block_rows", [None, 3 * 2 * H * 8])
@pytest.mark.parametrize("growth", ["rising", "falling", "spike"])
def test_performer_running_max_matches_the_chunked_stabiliser(growth, block_rows):
    """Key logits that rise along T move the running max at (almost) every token, falling ones
    never after the first, a spike mid-chunk at once: the rescaled running sums still equal the
    chunked causal forward (one block, or blocks carrying their own running max) at fp32."""
    torch.manual_seed(0)
    m = PerformerAttention(D, H, causal=True, features=32, chunk_size=8)
    m.cpu_block_rows = block_rows
    T = 53
    scale = {"rising": torch.linspace(0.5, 4.0, T), "falling": torch.linspace(4.0, 0.5, T),
             "spike": torch.ones(T).index_fill_(0, torch.tensor([20]), 5.0)}[growth]
    x = torch.randn(2, T, D) * scale.view(1, T, 1)
    with torch.no_grad():
        y_ref = m(x)
        for prompt in (0, 8, 21, 40):
            torch.testing.assert_close(decode(m, x, prompt), y_ref, rtol=1e-5, atol=1e-6)


def test_ssm_step_equals_the_recurrence_oracle():
    m = build("ssm")
    x = torch.randn(2, 37, D)
    with torch.no_grad():
        torch.testing.assert_close(decode(m, x, 11), m.forward_recurrent(x), rtol=1e-5, atol=1e-6)


def test_xformers_step_names_its_kernel_and_why_not_xformers():
    m = build("xformers")
    with torch.no_grad():
        st = m.init_state(1, 8)
        m.step(torch.randn(1, 1, D), st)
    if m.backend != "xformers":  # a CPU run: the fused SDPA kernel, and the reason on record
        assert m.backend.startswith("sdpa-") and m.fallback_reason
    sdpa = build("xformers", backend="sdpa")
    with torch.no_grad():
        sdpa.step(torch.randn(1, 1, D), sdpa.init_state(1, 8))
    assert sdpa.backend.startswith("sdpa-") and "requested" in sdpa.fallback_reason


# --------------------------------------------------------------------------- backbone
@pytest.mark.parametrize("name", variant_params())
def test_token_model_decodes_as_it_forwards(name):
    """Embedding (token, previous token, learned position) -> blocks -> head, step by step,
    equals the full forward's logits; greedy decoding equals re-running the forward."""
    cfg = load_variant_cfg(name, seq_len=64)
    cfg.update({k: v for k, v in SMALL.items() if k in cfg})
    torch.manual_seed(0)
    lm = TokenModel(vocab_size=20, d_model=D, n_layers=2, n_heads=2, mlp_ratio=2,
                    mixer_factory=mixer_factory(cfg), max_len=24, prev_token=True).eval()
    tokens = torch.randint(0, 20, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = lm(tokens)
        st = lm.init_state(2, 24)
        logits, st = lm.prefill(tokens[:, :9], st)
        outs = [logits] + [lm.step(tokens[:, t:t + 1], st)[0] for t in range(9, 24)]
        torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=1e-5, atol=1e-5)
        assert st.nbytes() == lm.state_bytes(2, 24)

        seq = tokens[:, :6]
        st = lm.init_state(2, 12)
        logits, st = lm.prefill(seq, st)
        for _ in range(6):  # greedy, by stepping and by the whole forward of the sequence so far
            nxt = logits[:, -1:].argmax(-1)
            assert torch.equal(nxt, lm(seq)[:, -1:].argmax(-1))
            seq = torch.cat([seq, nxt], dim=1)
            logits, st = lm.step(nxt, st)
        with pytest.raises(ValueError, match="exceeds the position table's max_len=24"):
            lm.init_state(1, 25)


# --------------------------------------------------------------------------- scenario
def _cell(name: str, **scenario) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pipeline.registry import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=[f"model={name}", "scenario=decode", "seq_len=24", "backbone=tiny"])
    d = OmegaConf.to_container(cfg, resolve=True)
    d.pop("hydra", None)
    d["model"].update({k: v for k, v in SMALL.items() if k in d["model"]})
    d["scenario"].update(dict(new_tokens=4, warmup=1, warmup_s=0.0, min_repeats=2, min_time_s=0.0, noise_max_s=0.0), **scenario)
    return d


@pytest.mark.parametrize("with_backbone", [False, True], ids=["mixer", "backbone"])
@pytest.mark.parametrize("name", PARAMS)
def test_decode_scenario_records_its_figures(name, with_backbone):
    from pipeline import record as R
    from pipeline.execute import preflight
    from pipeline.scenarios.base import CellResult
    from pipeline.scenarios.decode import run_decode
    from pipeline.schema import scenario_section, workload

    d = _cell(name, with_backbone=with_backbone)
    d["budget"] = {"memory_gb": 64 / 1024}
    result, device = CellResult(), torch.device("cpu")
    run_decode(scenario_section(d), workload(d), preflight(d, device), device, result)
    m = result.metrics
    for key in (R.DECODE_PREFILL_MS, R.DECODE_MS_PER_TOKEN, R.DECODE_MS_PER_TOKEN_IQR, R.DECODE_TOKENS_PER_S,
                R.DECODE_STATE_MB, R.DECODE_STATE_MB_ANALYTIC, R.DECODE_PEAK_MEM_MB, R.DECODE_PREFILL_MS_IQR):
        assert key in m, key
        assert math.isfinite(m[key]) or key == R.DECODE_PEAK_MEM_MB, key  # NaN where RSS is unreadable
    assert m[R.DECODE_STATE_MB] == m[R.DECODE_STATE_MB_ANALYTIC] > 0
    assert len(result.artifacts["timings.json"]["token_ms"]["ms"]) == 4
    assert result.tags[R.BACKEND] not in ("", "unset") and result.tags[R.PREFILL_BACKEND]
    m0 = build(name)
    assert (R.DECODE_CONTEXT_AT_BUDGET in m) == (not m0.constant_state)


@pytest.mark.parametrize("change,message", [
    ({"scenario": {"new_tokens": 0}}, r"scenario.new_tokens must be an integer >= 1"),
    ({"scenario": {"warmup": -1}}, r"scenario.warmup must be an integer >= 0"),
    ({"causal": False}, r"needs causal=true"),
    ({"model": {"_target_": "models.nope.Missing"}}, r"cannot import 'models.nope.Missing'"),
    ({"model": {"_target_": "torch.nn.Linear"}}, r"is not a SequenceMixer"),
])
def test_check_decode_refuses_bad_cells_in_one_line(change, message):
    from pipeline.scenarios.decode import check_decode

    d = _cell("vanilla")
    for key, value in change.items():
        d[key] = {**d[key], **value} if isinstance(value, dict) else value
    with pytest.raises(ValueError, match=message) as err:
        check_decode(d)
    assert "\n" not in str(err.value)


def test_check_decode_names_a_variant_without_step_and_a_context_limit(monkeypatch):
    from pipeline.scenarios.decode import check_decode

    d = _cell("vanilla")
    check_decode(d)  # the shipped config passes
    monkeypatch.setattr(SequenceMixer, "max_context", 27)
    d["scenario"]["new_tokens"] = 4  # 24 + 4 > 27
    with pytest.raises(ValueError, match=r"seq_len \+ scenario.new_tokens = 24 \+ 4 = 28 exceeds model=vanilla's max_context=27"):
        check_decode(d)
    monkeypatch.setattr(SequenceMixer, "max_context", None)
    from models.vanilla import VanillaAttention
    monkeypatch.setattr(VanillaAttention, "_step", SequenceMixer._step)
    with pytest.raises(ValueError, match=r"model=vanilla \(VanillaAttention\) has no step interface"):
        check_decode(d)


# ----------------------------------------------------------------- no n x n in decoding
@pytest.mark.parametrize("name", PARAMS)
def test_decoding_builds_no_n_by_n_tensor(name):
    """Prefill of n tokens and steps after it, with the shipped knobs: no tensor with two
    trailing dims >= n or as many elements as an n x n matrix, unless the variant's forward
    builds the scores by design (then only the prefill may, never a step)."""
    d, n = 64, 2048
    m = build(name, d=d, h=4, small=False, seq_len=n)
    x = torch.randn(1, n + 2, d)
    with torch.no_grad():
        st = m.init_state(1, n + 2)
        # a compiled prefill is opaque to the recorder (the conformance check "no-TxT" holds it to
        # its peak memory instead); its steps are not
        with ShapeRecorder() if not m.runs_compiled else contextlib.nullcontext(ShapeRecorder()) as pre:
            m.prefill(x[:, :n], st)
        with ShapeRecorder() as steps:
            m.step(x[:, n:n + 1], st)
            m.step(x[:, n + 1:], st)

    assert not quadratic(steps.shapes, n), m.backend
    if not m.materialises_scores:
        assert not quadratic(pre.shapes, n), m.backend
