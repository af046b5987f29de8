"""The backbone around every discovered variant: activation checkpointing changes memory, never
gradients; it only acts while training with grad on; the token model stays causal."""
from __future__ import annotations

import functools

import pytest
import torch
from hydra import compose, initialize_config_dir

from models.blocks import Block
from models.lm import TokenModel
from pipeline.registry import CONF_DIR, discover_variants, mixer_factory
from tests.support import variant_params

T = 32
VARIANTS = discover_variants()


pytestmark = pytest.mark.usefixtures("one_thread")


def model_cfg(name: str) -> dict:
    return dict(_model_cfg(name))


@functools.cache
def _model_cfg(name: str) -> dict:
    """The variant's config composed at seq_len=T; a window knob, where the variant has one, is
    set below T so the windowed path (not its exact special case) is the one tested."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=[f"model={name}", f"seq_len={T}"])
    d = dict(cfg.model)
    if "window" in d:
        d["window"] = T // 4
    if "global_tokens" in d:
        d["global_tokens"] = min(d["global_tokens"], 2)
    return d


def cpu_refusal(name: str, backward: bool = False) -> str | None:
    """Why the variant cannot run this test on CPU in float32 (its `refusal`), or None."""
    from hydra.utils import get_class

    return get_class(model_cfg(name)["_target_"]).refusal("cpu", "float32", backward=backward)


def _model(name: str, ckpt: bool, causal: bool = True) -> TokenModel:
    torch.manual_seed(0)
    return TokenModel(vocab_size=40, d_model=32, n_layers=2, n_heads=2, mlp_ratio=2,
                      mixer_factory=mixer_factory(model_cfg(name), causal=causal),
                      grad_checkpointing=ckpt, prev_token=True)


@pytest.mark.parametrize("name", VARIANTS)
def test_checkpointing_same_gradients(name):
    if why := cpu_refusal(name, backward=True):
        pytest.skip(why)
    tokens = torch.randint(0, 40, (3, T), generator=torch.Generator().manual_seed(1))
    grads, losses = [], []
    for ckpt in (False, True):
        model = _model(name, ckpt).train()
        loss = model(tokens).logsumexp(-1).mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert torch.equal(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=n: f"{n}: {m}")


class _CountingMixer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


def test_checkpoint_recomputes_only_when_training_with_grad():
    mixer = _CountingMixer()
    block = Block(mixer, d_model=8, mlp_ratio=2, grad_checkpointing=True)
    x = torch.randn(2, 5, 8, requires_grad=True)
    block.train()
    block(x).sum().backward()
    assert mixer.calls == 2  # forward + recompute in backward
    mixer.calls = 0
    block.eval()
    block(x).sum().backward()
    assert mixer.calls == 1
    mixer.calls = 0
    block.train()
    with torch.no_grad():
        block(x)
    assert mixer.calls == 1


@pytest.mark.parametrize("name", variant_params())
def test_token_model_is_causal(name):
    """Changing the last token leaves every earlier position's output untouched."""
    model = _model(name, ckpt=False).eval()
    tokens = torch.randint(0, 40, (2, T), generator=torch.Generator().manual_seed(2))
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 40
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[:, -1], b[:, -1])
    assert model.backend and model.backend != "unset"


def test_token_model_options():
    # any variant serves (grad stays on below): the first that has a CPU backward
    cfg = model_cfg(next(name for name in VARIANTS if cpu_refusal(name, backward=True) is None))
    m = TokenModel(vocab_size=10, d_model=16, n_layers=1, n_heads=2, mlp_ratio=2,
                   mixer_factory=mixer_factory(cfg), max_len=8, prev_token=False)
    assert m.prev_emb is None and m.pos_emb.num_embeddings == 8
    assert m(torch.randint(0, 10, (2, 8))).shape == (2, 8, 10)
    with pytest.raises(ValueError, match="max_len"):
        m(torch.randint(0, 10, (2, 9)))
    m2 = TokenModel(vocab_size=10, d_model=16, n_layers=3, n_heads=2, mlp_ratio=2,
                    mixer_factory=mixer_factory(cfg), prev_token=True)
    assert m2.pos_emb is None and m2.prev_emb.num_embeddings == 11 and len(m2.mixers) == 3
    m2.set_grad_checkpointing(True)
    assert all(b.grad_checkpointing for b in m2.blocks)
