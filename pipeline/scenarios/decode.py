"""The `decode` scenario: autoregressive generation, where attention's cost is paid per token.

A prompt of n = seq_len tokens is prefilled (timed: `init_state` + `prefill`, the variant's full
forward filling its cache or state), then k = scenario.new_tokens tokens are generated one
`step` at a time, each step timed alone with the device synchronised. By default the mixer
alone, on random inputs (every generated position gets a fresh random input vector);
`with_backbone=true` runs the small token model (models/lm.py: embedding, blocks with
norm / mixer.step / MLP, head) with greedy sampling, the argmax inside each timed step.

What a token costs, per variant: exact attention reads its KV cache of n D per layer (O(n D)
time and memory per token); the sliding window its g + w + 1 slots; Performer updates its M x K
running sums; the SSM its (D, N/2) state. decode/state_mb is measured from the state tensors,
next to the variant's analytic `state_bytes`; no step builds anything n x n, and neither does
the prefill of a variant that does not materialise the scores in its forward.

Order of work: one untimed prefill and `warmup` untimed steps on a throwaway state (lazy init,
kernel choice, this context length), the timed prefills (time_calls with the scenario's timing
knobs), then one measured decode: init_state + prefill + k timed steps inside PeakMemory.

    python -m pipeline.run scenario=decode model=performer seq_len=4096 scenario.new_tokens=64
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline import record as R
from pipeline.scenarios.base import CellResult, Diverged, failure_text, register


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_decode(d: Mapping[str, Any]) -> None:
    """Refuse a decode cell that cannot run, before any compute: ValueError with a one-line
    message. Checks the scenario's knobs, causality, the variant's step interface (from its
    class, so a variant without `step` is named here), and n + k against the variant's
    `max_context` and `check_seq_len`. Imports torch (through the variant's module)."""
    sc = d.get("scenario") or {}
    k = sc.get("new_tokens")
    if not _is_int(k) or k < 1:
        raise ValueError(f"scenario.new_tokens must be an integer >= 1 (tokens to generate), got {k!r}")
    warmup = sc.get("warmup", 0)
    if not _is_int(warmup) or warmup < 0:
        raise ValueError(f"scenario.warmup must be an integer >= 0, got {warmup!r}")
    with_backbone = sc.get("with_backbone", False)
    if not isinstance(with_backbone, bool):
        raise ValueError(f"scenario.with_backbone must be true or false, got {with_backbone!r}")
    if with_backbone and (not _is_int(sc.get("vocab_size")) or sc["vocab_size"] < 1):
        raise ValueError(f"scenario.vocab_size must be a positive integer with_backbone, got {sc.get('vocab_size')!r}")
    if not d.get("causal", True):
        raise ValueError("scenario=decode needs causal=true: a bidirectional mixer's output depends on later tokens")
    n = d.get("seq_len")
    if not _is_int(n) or n < 1:
        raise ValueError(f"seq_len (the prompt length) must be a positive integer, got {n!r}")

    from hydra.utils import get_class

    from models.base import SequenceMixer
    from pipeline.registry import build_mixer

    model = d.get("model") or {}
    name, target = model.get("name", "?"), model.get("_target_")
    try:
        cls = get_class(target)
    except Exception as e:  # noqa: BLE001 - any import failure is a bad model config here
        raise ValueError(f"model={name}: cannot import {target!r} ({failure_text(e)})") from None
    if not (isinstance(cls, type) and issubclass(cls, SequenceMixer)):
        raise ValueError(f"model={name}: {target} is not a SequenceMixer")
    if not cls.has_step():
        raise ValueError(f"model={name} ({cls.__name__}) has no step interface (init_state/step): "
                         "it cannot run scenario=decode")
    bb = d.get("backbone") or {}
    try:
        mixer = build_mixer(model, d_model=int(bb["d_model"]), n_heads=int(bb["n_heads"]), causal=True,
                            n_kv_heads=bb.get("n_kv_heads"))
    except Exception as e:  # noqa: BLE001 - hydra wraps the constructor's error in several lines
        raise ValueError(f"model={name}: {failure_text(e)}") from None
    total = n + k
    if mixer.max_context is not None and total > mixer.max_context:
        raise ValueError(f"seq_len + scenario.new_tokens = {n} + {k} = {total} exceeds model={name}'s "
                         f"max_context={mixer.max_context}")
    mixer.check_seq_len(total)


def predicted_decode_bytes(mixer, batch: int, seq_len: int, new_tokens: int, dtype_bytes: int,
                           n_layers: int = 1, d_model: int = 0, mlp_ratio: int = 0, vocab_size: int = 0) -> int:
    """A pre-flight estimate of a decode cell's peak: the state of every layer for n + k tokens,
    plus one layer's prefill forward (no autograd, so layers do not keep theirs; the variant's
    `memory_bytes` counts autograd's too, an upper bound), plus with the backbone the residual
    stream, the MLP's hidden activations and the prompt's logits."""
    state = n_layers * mixer.state_bytes(batch, seq_len + new_tokens, dtype_bytes)
    forward = mixer.memory_bytes(batch, seq_len, dtype_bytes)
    backbone = batch * seq_len * (d_model * (mlp_ratio + 2) + vocab_size) * dtype_bytes
    return int(state + forward + backbone)


@register("decode")
def run_decode(sc, w, plan, device, result: CellResult) -> None:
    decode(sc, w.model, w.backbone, batch=w.batch_size, seq_len=w.seq_len, seed=w.seed, device=device,
           result=result, budget_bytes=plan.budget_bytes)


def decode(sc, model_cfg: Mapping[str, Any], bb, batch: int, seq_len: int, seed: int, device,
           result: CellResult, budget_bytes: float | None = None) -> None:
    """The measurement itself, from the scenario section `sc` (new_tokens, with_backbone,
    vocab_size and the timing knobs), the variant's config, the backbone section (d_model,
    n_heads, n_layers, mlp_ratio, dtype) and the workload; fills `result`."""
    import torch

    from pipeline.measure import PeakMemory, time_calls
    from pipeline.registry import build_mixer, mixer_factory
    from pipeline.stability import Timing

    dtype = getattr(torch, bb.dtype)
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    B, n, k, D = batch, seq_len, int(sc.new_tokens), int(bb.d_model)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if sc.with_backbone:
        from models.lm import TokenModel

        V = int(sc.vocab_size)
        model = TokenModel(vocab_size=V, d_model=D, n_layers=int(bb.n_layers), n_heads=int(bb.n_heads),
                           mlp_ratio=int(bb.mlp_ratio),
                           mixer_factory=mixer_factory(model_cfg, causal=True, n_kv_heads=bb.n_kv_heads))
        mixers = model.mixers
        prompt = torch.randint(0, V, (B, n), generator=gen).to(device)

        def step(out, state, t):  # greedy: the next token is the argmax of the last logits
            return model.step(out[:, -1:].argmax(-1), state)[0]
    else:
        model = build_mixer(model_cfg, d_model=D, n_heads=int(bb.n_heads), causal=True, n_kv_heads=bb.n_kv_heads)
        mixers = [model]
        prompt = torch.randn(B, n, D, generator=gen).to(device=device, dtype=dtype)
        new_x = torch.randn(B, k, D, generator=gen).to(device=device, dtype=dtype)

        def step(out, state, t):
            return model.step(new_x[:, t:t + 1], state)[0]
    model.to(device=device, dtype=dtype).eval()
    from pipeline.scenarios.kernel import timing_knobs

    timing = timing_knobs(sc)

    def prefill():
        return model.prefill(prompt, model.init_state(B, n + k, device, dtype))

    def finite(out, where: str) -> None:
        if not torch.isfinite(out).all():
            raise Diverged(f"non-finite output from {model_cfg.get('name')} in decode {where} at n={n}")

    with torch.no_grad():
        out, state = prefill()  # untimed: lazy init, kernel choice, then steps at this context length
        finite(out, "prefill")
        for t in range(min(int(sc.warmup), k)):
            out = step(out, state, t)
        finite(out, "step")
        del out, state
        prefill_t = time_calls(prefill, device, **timing)
        token_t: Timing | None = None  # each step timed alone: one Timing of k single calls
        with PeakMemory(device) as pm:
            out, state = prefill()
            prefill_backend = model.backend
            for t in range(k):
                one, out = _time_one(lambda: step(out, state, t), device, time_calls)  # noqa: B023 - called at once
                if token_t is None:
                    token_t = one
                else:
                    token_t.ms += one.ms
                    token_t.wait += one.wait
        finite(out, "step")

    result.add_timing(R.DECODE_PREFILL_MS, prefill_t, iqr=R.DECODE_PREFILL_MS_IQR)
    per_token = result.add_timing(R.DECODE_MS_PER_TOKEN, token_t, iqr=R.DECODE_MS_PER_TOKEN_IQR).median
    from pipeline.analytic import analytic

    state_analytic = analytic(model.state_bytes, B, n + k, dtype_bytes, absent=result.tags)  # None: absent
    m = result.metrics
    m.update({
        R.DECODE_TOKENS_PER_S: B / (per_token * 1e-3),
        R.DECODE_STATE_MB: state.nbytes() / 2**20, R.DECODE_PEAK_MEM_MB: pm.peak_mb,
    })
    if state_analytic is not None:
        m[R.DECODE_STATE_MB_ANALYTIC] = state_analytic / 2**20
    if budget_bytes and state_analytic is not None:
        # every layer holds the same variant's state: the context at which they fill the budget
        ctx = mixers[0].context_for_budget(B, budget_bytes / len(mixers), dtype_bytes)
        if ctx is not None:
            m[R.DECODE_CONTEXT_AT_BUDGET] = float(ctx)
    result.tags[R.MEMORY_METHOD] = pm.method
    result.tags[R.PREFILL_BACKEND] = str(prefill_backend)
    result.note_backend(model.backend, mixers)
    result.artifacts["timings.json"] = {"prefill_ms": prefill_t.to_dict(), "token_ms": token_t.to_dict()}


def _time_one(fn, device, time_calls) -> tuple[Any, Any]:
    """One timed call of fn through time_calls (synchronised, CUDA events on a GPU): (its
    Timing, the value fn returned)."""
    box: list[Any] = []
    timing = time_calls(lambda: box.append(fn()), device, warmup=0, warmup_s=0.0, min_repeats=1,
                        min_time_s=0.0, max_time_s=0.0)
    return timing, box[0]
