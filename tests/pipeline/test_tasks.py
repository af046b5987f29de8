"""The quality tasks' data: MQAR sequences are well-formed and answerable, code_lm's split is
deterministic and by file, the fidelity helpers compute what they claim."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline import record as R
from pipeline.fidelity import Fidelity, effective_keys, uniform_average
from pipeline.tasks import (
    IGNORE,
    MQAR,
    CodeLM,
    build_task,
    stdlib_files,
    unigram_entropy_bits,
)

# ----------------------------------------------------------------------------- mqar


def _mqar(**kw) -> MQAR:
    base = {"num_pairs": 4, "num_keys": 16, "num_values": 16, "num_noise": 8, "min_distance": None}
    return MQAR(**{**base, **kw})


@pytest.mark.parametrize("seq_len,kw", [
    (64, {}),
    (128, {"num_pairs": 8, "num_keys": 64, "num_values": 64}),
    (96, {"num_pairs": 6, "num_queries": 3, "min_distance": 70}),
    (40, {"min_distance": 2}),
])
def test_mqar_answers_recoverable_and_far(seq_len, kw):
    task = _mqar(**kw)
    g = torch.Generator().manual_seed(0)
    tokens, targets = task.generate(32, seq_len, g)
    assert tokens.shape == targets.shape == (32, seq_len)
    assert tokens.dtype == targets.dtype == torch.long
    assert 0 <= int(tokens.min()) and int(tokens.max()) < task.vocab_size
    values = range(task.num_keys, task.num_keys + task.num_values)
    d_min = task.min_distance(seq_len)
    for row_tok, row_tgt in zip(tokens.tolist(), targets.tolist()):
        queries = [t for t, y in enumerate(row_tgt) if y != IGNORE]
        assert len(queries) == task.Q
        assert len({row_tok[t] for t in queries}) == task.Q  # each query asks a different pair
        for t in queries:
            key = row_tok[t]
            assert key < task.num_keys
            # brute force: every earlier occurrence of the key that is followed by a value
            hits = [j for j in range(t - 1) if row_tok[j] == key and row_tok[j + 1] in values]
            assert len(hits) == 1, (t, key, hits)
            j = hits[0]
            assert row_tok[j + 1] == row_tgt[t]  # the answer is the value after the key
            assert t - j >= d_min


def test_mqar_deterministic_under_seed():
    task = _mqar()
    a = task.generate(8, 64, torch.Generator().manual_seed(3))
    b = task.generate(8, 64, torch.Generator().manual_seed(3))
    c = task.generate(8, 64, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    s1 = next(iter(task.train_loader(64, 8, seed=1)))
    s2 = next(iter(task.train_loader(64, 8, seed=1)))
    s3 = next(iter(task.train_loader(64, 8, seed=2)))
    assert torch.equal(s1[0], s2[0]) and not torch.equal(s1[0], s3[0])
    v1 = next(iter(task.val_loader(64, seed=1)))[0]
    assert not torch.equal(v1[:8], s1[0])  # validation is not the training stream


def test_mqar_rejects_too_short():
    task = _mqar(num_pairs=8, num_keys=16)
    with pytest.raises(ValueError, match="need seq_len"):
        task.check(40)
    with pytest.raises(ValueError, match="num_queries"):
        _mqar(num_queries=9)
    with pytest.raises(ValueError, match="keys"):
        _mqar(num_pairs=20, num_keys=16)


def test_mqar_queries_beyond_window_reach():
    """The default distance keeps every query further from its key than a window of n/8 over
    2 layers can reach (the separation the quality grid relies on)."""
    task = _mqar(num_pairs=8, num_keys=64, num_values=64)
    for n in (64, 128):
        _, targets = task.generate(64, n, torch.Generator().manual_seed(0))
        q_pos = (targets != IGNORE).nonzero()[:, 1]
        assert int(q_pos.min()) - 2 * (task.P - 1) >= n // 2 > 2 * (n // 8)


def test_build_task_from_config():
    t = build_task({"name": "mqar", "num_pairs": 2, "num_keys": 8, "num_values": 8})
    assert isinstance(t, MQAR) and t.vocab_size == 8 + 8 + 16
    with pytest.raises(ValueError, match="unknown task"):
        build_task({"name": "nope"})


# ----------------------------------------------------------------------------- code_lm


@pytest.fixture
def fake_stdlib(tmp_path):
    root = tmp_path / "lib"
    for i in range(40):
        sub = root / ("pkg" if i % 3 else "") / f"mod{i:02d}.py"
        sub.parent.mkdir(parents=True, exist_ok=True)
        sub.write_text(f"# module {i}\n" + f"def f(x):\n    return x + {i}\n" * 20)
    (root / "site-packages" / "third").mkdir(parents=True)
    (root / "site-packages" / "third" / "party.py").write_text("THIRD_PARTY = 1\n" * 100)
    return root


def test_stdlib_files_skip_site_packages(fake_stdlib):
    files = stdlib_files(fake_stdlib)
    assert len(files) == 40
    assert all("site-packages" not in p.parts for p in files)
    assert files == sorted(files, key=lambda p: p.relative_to(fake_stdlib).as_posix())


def test_code_lm_split_deterministic_and_by_file(fake_stdlib):
    kw = {"max_train_chars": 10_000, "max_val_chars": 3_000, "val_fraction": 0.25, "stdlib": str(fake_stdlib)}
    a, b = CodeLM(**kw).corpus(), CodeLM(**kw).corpus()
    assert torch.equal(a["train"], b["train"]) and torch.equal(a["val"], b["val"])
    assert a["paths"] == b["paths"]
    assert a["paths"]["val"] and not set(a["paths"]["train"]) & set(a["paths"]["val"])
    assert a["train"].numel() <= 10_000 + len(a["paths"]["train"]) and a["val"].numel() <= 3_000 + len(a["paths"]["val"])
    other = CodeLM(**{**kw, "split_seed": 1}).corpus()
    assert other["paths"] != a["paths"]  # the salt changes the split


def test_code_lm_windows_are_next_bytes(fake_stdlib):
    task = CodeLM(max_train_chars=10_000, max_val_chars=3_000, val_fraction=0.25, stdlib=str(fake_stdlib))
    tokens, targets = next(iter(task.val_loader(32, seed=0)))
    assert torch.equal(tokens[:, 1:], targets[:, :-1])
    val = task.corpus()["val"].long()
    assert torch.equal(tokens[0], val[:32]) and torch.equal(targets[0], val[1:33])
    assert torch.equal(tokens[1], val[32:64])  # consecutive windows, each byte scored once
    x, y = next(iter(task.train_loader(32, 4, seed=0)))
    assert x.shape == y.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1])


def test_unigram_entropy():
    assert unigram_entropy_bits(torch.tensor([7] * 100)) == 0.0
    assert unigram_entropy_bits(torch.arange(4).repeat(25)) == pytest.approx(2.0)
    assert unigram_entropy_bits(torch.tensor([0, 0, 0, 1])) == pytest.approx(
        -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)))


def test_code_lm_real_stdlib_entropy_in_range():
    task = CodeLM(max_train_chars=50_000, max_val_chars=20_000)
    h = unigram_entropy_bits(task.val_targets(128))
    # source code: far from uniform bytes (8 bits), far from constant
    assert 3.5 < h < 6.0
    d = task.describe()
    assert d["data.val_files"] >= 1 and d["data.train_bytes"] >= 50_000


# ----------------------------------------------------------------------------- fidelity helpers


def test_uniform_average_is_running_mean():
    v = torch.randn(2, 3, 10, 4)
    causal = uniform_average(v, causal=True)
    for t in range(10):
        assert torch.allclose(causal[:, :, t], v[:, :, : t + 1].mean(dim=2), atol=1e-6)
    full = uniform_average(v, causal=False)
    assert torch.allclose(full, v.mean(dim=2, keepdim=True).expand_as(v))


def test_effective_keys_limits():
    T = 16
    zeros = torch.zeros(1, 1, T, 4)
    assert effective_keys(zeros, zeros, causal=False) == pytest.approx(T)
    assert effective_keys(zeros, zeros, causal=True, chunk=5) == pytest.approx((T + 1) / 2)
    # one key far more aligned with every query than the rest: ~1 key
    k = torch.zeros(1, 1, T, 4)
    k[..., 0, 0] = 100.0
    q = torch.zeros(1, 1, T, 4)
    q[..., 0] = 1.0
    assert effective_keys(q, k, causal=False) == pytest.approx(1.0, abs=1e-3)


def test_fidelity_inputs_hit_the_score_std():
    from models.vanilla import VanillaAttention

    torch.manual_seed(0)
    ref = VanillaAttention(64, 2)
    task = Fidelity(score_std=2.0)
    x = task.inputs(ref, 1, 512, seed=0, device="cpu")
    m = task.evaluate(ref, ref, x)
    assert m[R.QUALITY_SCORE_STD] == pytest.approx(2.0, rel=1e-3)
    assert m[R.QUALITY_REL_ERR_VS_EXACT] == 0.0
    # peaked: a query spreads over far fewer keys than the ~n/2 of uniform causal weights
    assert m[R.QUALITY_ATTN_EFF_KEYS] < 0.2 * 512 / 2
    assert 0.5 < m[R.QUALITY_REL_ERR_UNIFORM_MEAN] <= 1.5
