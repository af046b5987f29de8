"""The report's Decoding section (pipeline/report/decoding.py) on the fixture store's decode cells
(tests/report/conftest.py: exact attention's per-token time c·n and a KV cache linear in n + k,
the constant-state variants flat): fitted exponents, crossovers, the predicted context at the
memory budget, and no section at all for a sweep without decode cells.

    .venv/bin/pytest tests/report/test_decoding.py
"""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import record as R
from pipeline.report import build_report
from pipeline.report.decoding import (
    fit_state,
    latency_crossover,
    line_state_fit,
    logged_context,
    new_tokens,
    section_decoding,
)
from pipeline.report.document import Doc
from pipeline.report.lines import kernel_lines, memory_budget_mb
from pipeline.report.load import load_runs
from tests.report.conftest import BUDGET_MB, DECODE_K, DECODE_LENGTHS, build_fixture_store
from tests.support import table_row


@pytest.fixture(scope="module")
def decode_lines(store):
    frame = load_runs(store.experiment, store.sweep_id, store.uri).frame
    return {ln.label: ln for ln in kernel_lines(frame, "decode")}


def _decoding(md: str) -> str:
    return md.split("\n## Decoding\n")[1].split("\n## ")[0]


def test_decode_lines_are_their_own(store, decode_lines):
    assert set(decode_lines) == set(store.decode)
    for ln in decode_lines.values():
        assert set(ln.rows[R.col(R.SCENARIO)]) == {"decode"}
        assert new_tokens(ln) == DECODE_K
    frame = load_runs(store.experiment, store.sweep_id, store.uri).frame
    assert {ln.label for ln in kernel_lines(frame)} == set(store.kernel)  # kernel lines unchanged


def test_per_token_exponents(store, decode_lines):
    for model, (_, exponent, _, _) in store.decode.items():
        fit = decode_lines[model].fit(R.DECODE_MS_PER_TOKEN)
        assert fit.exponent == pytest.approx(exponent, abs=1e-6)
        assert fit.lengths == DECODE_LENGTHS[-3:]


def test_state_fit_and_context_at_budget(store, decode_lines):
    for model, (_, _, state, grows) in store.decode.items():
        ln = decode_lines[model]
        fit = line_state_fit(ln)
        assert fit.constant is (not grows)
        budget, _ = memory_budget_mb(ln, None)
        assert budget == BUDGET_MB
        if grows:
            assert fit.per_token_mb == pytest.approx(state) and fit.base_mb == pytest.approx(0, abs=1e-9)
            assert fit.lengths == tuple(n + DECODE_K for n in DECODE_LENGTHS)
            want = store.expected[("vanilla", "decode_context_logged")]
            assert fit.tokens_at(budget) == pytest.approx(want)
            assert logged_context(ln) == pytest.approx(want)  # the cells' own figure agrees
        else:
            assert fit.base_mb == pytest.approx(state)
            assert fit.tokens_at(budget) is None and logged_context(ln) is None


def test_latency_crossovers(store, decode_lines):
    for eff in ("longformer", "performer"):
        for ex in ("vanilla", "xformers"):
            co = latency_crossover(decode_lines[eff], decode_lines[ex])
            assert co.verdict == "crosses"
            assert co.n == pytest.approx(store.expected[(eff, ex, "decode")], rel=1e-9)


def test_fit_state_pure():
    n = np.array([100, 200, 400])
    assert fit_state(n, 3.0 + 0.5 * n).tokens_at(203.0) == pytest.approx(400.0)
    flat = fit_state(n, [2.0, 2.0001, 2.0])  # within the relative tolerance: constant
    assert flat.constant and flat.tokens_at(1.0) is None
    assert fit_state([100], [1.0]) is None  # one length cannot tell growth from a constant
    assert fit_state(n, 1.0 + n).tokens_at(0.5) == 0.0  # over budget at any length


def test_decoding_section_in_report(built, store):
    path, md, _ = built
    assert md.index("## 5.") < md.index("## Decoding") < md.index("## 6.")
    sec = _decoding(md)
    assert "| vanilla | yes | 2 / 2 | grows: 512 B per token | 1.00 |" in sec  # KV heads / query heads
    assert "| longformer | no | 2 / 2 | constant (1 MiB) | 0.00 |" in sec
    for (eff, ex) in (("longformer", "vanilla"), ("performer", "xformers")):
        n = store.expected[(eff, ex, "decode")]
        assert f"n ≈ {n:,.0f}" in table_row(sec, eff, ex)
    at_budget = sec.split("### Context at the memory budget (predicted)")[1]
    vanilla = table_row(at_budget, "vanilla")  # the report was built with --budget-gb 1
    assert f"predicted ≈ {store.expected[('vanilla', 'decode_context_1gb')]:,.0f} tokens" in vanilla
    assert "1 GiB (--budget-gb)" in vanilla
    assert vanilla.endswith(f"| {store.expected[('vanilla', 'decode_context_logged')]:,.0f} |")
    assert "never: constant state" in table_row(at_budget, "performer")
    state = sec.split("### State memory")[1].split("\n### ")[0]
    assert "| n = 8,192 |" in state
    assert table_row(state, "vanilla").endswith("| 4.02 / 4.02 |")  # (8192 + 32) / 2048 MiB
    assert table_row(state, "longformer").endswith("| 1 / 1 |")
    for name in ("decode_latency.png", "decode_state.png"):
        assert (path / name).stat().st_size > 0, name
    # deployed shapes: Llama-3-8B's cache is 128 KiB a token in bf16 (2 x 32 layers x 8 heads x 128
    # x 2 B); multi-head would be 4x that, multi-query 1/8
    shapes = sec.split("### KV cache of deployed shapes (analytic)")[1]
    assert "| Llama-3-8B-like, grouped (GQA) | 32 | 8 / 32 | 128 | 128 KiB | 1.00 GiB |" in shapes
    assert "| the same, multi-head | 32 | 32 / 32 | 128 | 512 KiB | 4.00 GiB |" in shapes
    assert "| the same, multi-query (MQA) | 32 | 1 / 32 | 128 | 16 KiB |" in shapes


def test_no_decode_cells_no_section(tmp_path):
    st = build_fixture_store(tmp_path / "store", decode=False)
    out = build_report(st.experiment, st.sweep_id, tmp_path / "report", tracking_uri=st.uri)
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "## Decoding" not in md and "## 5." in md and "## 6." in md
    assert not (out / "decode_latency.png").exists()
    doc = Doc()
    section_decoding(doc, [], None, {}, tmp_path)
    assert doc.blocks == []
