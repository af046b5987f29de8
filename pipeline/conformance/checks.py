"""The checks: each takes a `Subject` and returns one `Outcome` (the package's docstring lists them)."""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import torch

from pipeline.conformance.subject import LEAK, Outcome, Subject, _moved, dtype_name, rel
from pipeline.fidelity import (
    PRECISION_FACTOR,
    PRECISION_FLOOR,
    calibrated,
    copy_shared_weights,
    uniform_average,
    within_rule,
)
from pipeline.probes import LiveBytes, ShapeRecorder, quadratic


def check_shapes(s: Subject) -> Outcome:
    m, done = s.build(), []
    ok, skipped = s.lengths(m, (1, 7, 37))
    if not ok:
        return Outcome("shapes", "skip", "; ".join(skipped))
    for dtype, lengths in ((torch.float32, ok), (torch.float64, ok[-1:]), (torch.bfloat16, ok[-1:])):
        why = s.refusal(m, dtype)
        if why:
            skipped.append(why)
            continue
        mm = m.to(dtype)
        for T in lengths:
            x = s.x(2, T, dtype)
            if hasattr(mm, "backend"):
                mm.backend = "unset"
            with torch.no_grad():
                y = mm(x)
            where = f"T={T} {dtype_name(dtype)}"
            if not isinstance(y, torch.Tensor) or y.shape != x.shape:
                return Outcome("shapes", "fail", f"{where}: output {getattr(y, 'shape', type(y).__name__)}, "
                                                 f"expected (B, T, D) = {tuple(x.shape)}")
            if y.dtype != dtype:
                return Outcome("shapes", "fail", f"{where}: returns {dtype_name(y.dtype)}")
            if not torch.isfinite(y).all():
                return Outcome("shapes", "fail", f"{where}: non-finite output")
            backend = getattr(mm, "backend", None)
            if not isinstance(backend, str) or backend in ("", "unset"):
                return Outcome("shapes", "fail", f"{where}: sets no `backend` (the record must say which kernel ran)")
        done.append(f"T = {', '.join(map(str, lengths))} in {dtype_name(dtype)}")
    note = f"; skipped: {'; '.join(skipped)}" if skipped else ""
    return Outcome("shapes", "pass", f"(B, T, D) in and out, finite, backend {m.backend}: {'; '.join(done)}{note}")


def check_batch(s: Subject) -> Outcome:
    m, x = s.build(), s.x(3, 37)
    with torch.no_grad():
        y = m(x)
        for i in range(3):
            moved = _moved(m(x[i:i + 1]), y[i:i + 1])
            if moved > LEAK:
                return Outcome("batch", "fail", f"sequence {i}'s output alone differs from its output in a batch of 3 "
                                                f"(by {moved:.2g} of its largest entry): the sequences of a batch mix")
    return Outcome("batch", "pass", "each of 3 sequences gives the same output alone as in the batch")


def check_determinism(s: Subject) -> Outcome:
    x = s.x(2, 37)
    with torch.no_grad():
        a, b = s.build(seed=123), s.build(seed=123)
        ya, yb, ya2 = a(x), b(x), a(x)
    if not torch.equal(ya, yb):
        return Outcome("determinism", "fail", f"two builds under one seed differ by {_moved(yb, ya):.2g} of the largest output")
    if not torch.equal(ya, ya2):
        return Outcome("determinism", "fail", f"two calls on the same input differ by {_moved(ya2, ya):.2g} of the largest output")
    return Outcome("determinism", "pass", "two builds under one seed, and two calls, give identical outputs")


def check_gradients(s: Subject) -> Outcome:
    m = s.build()
    why = s.refusal(m, torch.float32, backward=True)
    if why:
        return Outcome("gradients", "skip", why)
    x = s.x(2, 37).requires_grad_(True)
    m(x).square().mean().backward()
    if not (torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0):
        return Outcome("gradients", "fail", "the input's gradient is zero or not finite")
    for name, p in m.named_parameters():
        if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0):
            return Outcome("gradients", "fail", f"parameter {name} gets {'no' if p.grad is None else 'a zero or non-finite'} gradient")
    return Outcome("gradients", "pass", f"finite, non-zero gradients for the input and {sum(1 for _ in m.parameters())} parameter(s)")


def _exact_reference(s: Subject, T: int):
    """Plain exact attention (vanilla) with scores of std ~2 on its inputs, float64 copy, inputs."""
    from models.vanilla import VanillaAttention

    torch.manual_seed(1)
    ref = VanillaAttention(s.d_model, s.n_heads, causal=s.causal, n_kv_heads=s.n_kv_heads).to(s.device)
    x = calibrated(ref, s.x(2, T), score_std=2.0)  # far from uniform attention (pipeline/fidelity.py says why)
    return ref, copy.deepcopy(ref).double(), x


def _forward(m, x, dtype, g=None):
    """Output (float64) and, with `g`, the input's gradient of <y, g> (float64)."""
    m = copy.deepcopy(m).to(dtype)
    xd = x.detach().to(dtype).requires_grad_(g is not None)
    with torch.set_grad_enabled(g is not None):
        y = m(xd)
        dx = torch.autograd.grad(y, xd, g.to(dtype))[0].double() if g is not None else None
    return y.detach().double(), dx


def check_exactness(s: Subject) -> Outcome:
    m = s.build()
    if not getattr(m, "is_attention", True):
        return Outcome("exactness", "skip", "not an attention approximation (is_attention false): no exact reference")
    exact = bool(getattr(m, "exact", False))
    T = 128 if exact else 1024  # an approximation's error shows where windows and chunks do not cover n
    ref, ref64, x = _exact_reference(s, T)
    try:
        copy_shared_weights(ref, m)
    except ValueError as e:
        return Outcome("exactness", "fail" if exact else "skip", f"cannot put the reference's weights in: {e}")
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(s.device)
    y64, dx64 = _forward(ref64, x, torch.float64, g)
    if not exact:
        y, _ = _forward(m, x, torch.float32)
        with torch.no_grad():
            _, _, v = ref64.split_heads(x.double())
            uni = ref64.merge_heads(uniform_average(v.repeat_interleave(s.n_heads // v.shape[1], 1), s.causal))
        return Outcome("exactness", "info", f"approximate: error {rel(y, y64):.3g} against exact attention at T={T}; "
                                            f"the uniform mean's {rel(uni, y64):.3g} (not judged)")
    parts = []
    for dtype, with_grad in ((torch.float32, True), (torch.bfloat16, False)):
        why = s.refusal(m, dtype)
        if why:
            parts.append(f"{dtype_name(dtype)} skipped ({why})")
            continue
        grad = with_grad and not s.refusal(m, dtype, backward=True)
        y, dx = _forward(m, x, dtype, g if grad else None)
        y0, dx0 = _forward(ref, x, dtype, g if grad else None)
        pairs = [("output", rel(y, y64), rel(y0, y64))] + ([("input gradient", rel(dx, dx64), rel(dx0, dx64))] if grad else [])
        for what, err, base in pairs:
            if not within_rule(err, base):
                return Outcome("exactness", "fail", f"{what} in {dtype_name(dtype)}: error {err:.3g} against float64 exact "
                                                    f"attention, plain PyTorch's {base:.3g} (rule <= {PRECISION_FACTOR:g}x + {PRECISION_FLOOR:g})")
            parts.append(f"{what} {dtype_name(dtype)} {err:.2g} (plain {base:.2g})")
    return Outcome("exactness", "pass", f"within {PRECISION_FACTOR:g}x plain PyTorch's error + {PRECISION_FLOOR:g} at T={T}: {', '.join(parts)}")


CUTS = (1, 7, 8, 63, 64, 65, 127, 128, 129, 255, 256, 257)  # both sides of blocks of 8, 64, 128, 256


def check_causality(s: Subject) -> Outcome:
    m, T = s.build(), 260
    x = s.x(2, T)
    if not s.causal:
        x2 = x.clone()
        x2[:, 130:] += 1.0
        with torch.no_grad():
            seen = _moved(m(x2)[:, :130], m(x)[:, :130])
        return (Outcome("causality", "pass", f"bidirectional: the first 130 outputs see later inputs (change {seen:.2g})")
                if seen > 1e-4 else Outcome("causality", "fail", "bidirectional mixer whose outputs ignore later inputs"))
    why = s.refusal(m, torch.float32, backward=True)
    for t in CUTS:
        x2 = x.clone()
        x2[:, t:] = 3 * torch.randn(x2[:, t:].shape, generator=torch.Generator().manual_seed(t)).to(x2)
        outs = []
        for xi in (x, x2):
            xi = xi.clone().requires_grad_(why is None)
            with torch.set_grad_enabled(why is None):
                y = m(xi)
                dx = None
                if why is None:
                    g = torch.randn(y[:, :t].shape, generator=torch.Generator().manual_seed(7)).to(y)
                    dx = torch.autograd.grad((y[:, :t] * g).sum(), xi)[0]
            outs.append((y.detach(), dx))
        (y, dx), (y2, dx2) = outs
        if _moved(y2[:, :t], y[:, :t]) > LEAK:
            return Outcome("causality", "fail", f"outputs before position {t} change when inputs from {t} on change "
                                                f"(by {_moved(y2[:, :t], y[:, :t]):.2g} of the largest): the mixer sees the future")
        if _moved(y2[:, t:], y[:, t:]) == 0:
            return Outcome("causality", "fail", f"changing inputs from position {t} on changed no output: the check sees nothing")
        if dx is not None:
            scale = float(dx.abs().max().clamp_min(1e-30))
            leak = float(dx[:, t:].abs().max()) / scale
            if leak > LEAK:
                return Outcome("causality", "fail", f"the gradient of outputs before {t} reaches inputs at >= {t} "
                                                    f"({leak:.2g} of the largest): the backward sees the future")
            if _moved(dx2[:, :t], dx[:, :t]) > LEAK:
                return Outcome("causality", "fail", f"input gradients before {t} change when inputs from {t} on change")
    grads = "outputs and input gradients" if why is None else f"outputs (gradients not checked: {why})"
    return Outcome("causality", "pass", f"{grads} before t unchanged by inputs from t on, t = {', '.join(map(str, CUTS))} of {T}")


def _peak(s: Subject, m: torch.nn.Module, T: int, grad: bool) -> tuple[int, list]:
    """Peak bytes of one forward (with its backward when `grad`) at length T, and the shapes ops
    returned: the dispatcher's view (`LiveBytes`, `ShapeRecorder`), or for a mixer that runs only
    compiled, which the dispatcher cannot see into, the process's peak (no shapes)."""
    x = s.x(1, T).requires_grad_(grad)
    if getattr(m, "runs_compiled", False):
        from pipeline.measure import PeakMemory

        with torch.set_grad_enabled(grad):
            m(x)  # compiles outside the measurement
            with PeakMemory(s.device) as pm:
                y = m(x)
                if grad:
                    y.sum().backward()
                del y
        return int(pm.peak_mb * 2**20), []
    with LiveBytes() as lb, ShapeRecorder() as rec, torch.set_grad_enabled(grad):
        y = m(x)
        if grad:
            y.sum().backward()
        del y
    return lb.peak, rec.shapes


def check_no_square(s: Subject) -> Outcome:
    m, T = s.build(), 2048
    if getattr(m, "materialises_scores", False):
        return Outcome("no-TxT", "skip", "declares materialises_scores: builds the T x T scores by design")
    grad = s.refusal(m, torch.float32, backward=True) is None
    scope = "forward and backward" if grad else "forward (no backward here)"
    peak, shapes = _peak(s, m, T, grad)
    if getattr(m, "runs_compiled", False):  # held to its memory: far below one (1, H, T, T) float32 score tensor
        scores = s.n_heads * T * T * 4
        ok = peak < scores / 4
        return Outcome("no-TxT", "pass" if ok else "fail",
                       f"runs compiled (no op-level view): the {scope} at T={T} peaks at {peak / 2**20:.3g} MiB of the "
                       f"process, {'below' if ok else 'not below'} a quarter of one T x T score tensor ({scores / 2**20:.3g} MiB)")
    found = quadratic(shapes, T)
    if found:
        op, shape = found[0]
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        return Outcome("no-TxT", "fail", f"{op} returns a {shape} tensor at T={T}{more}, and the mixer does not declare "
                                         "materialises_scores")
    largest = max((sh for _, sh in shapes), key=math.prod, default=())
    return Outcome("no-TxT", "pass", f"{len(shapes)} tensors in {scope} at T={T}, none T x T; the largest {largest}")


LENGTHS = (1024, 2048, 4096)


def check_memory_order(s: Subject) -> Outcome:
    m = s.build()
    declared = float(getattr(m, "memory_order", 2.0))
    grad = s.refusal(m, torch.float32, backward=True) is None
    peaks = [_peak(s, m, T, grad)[0] for T in LENGTHS]
    if min(peaks) <= 0:
        return Outcome("memory-order", "skip", f"no memory measured ({', '.join(map(str, peaks))} bytes)")
    order = math.log2(peaks[-1] / peaks[-2])
    what = "process peak" if getattr(m, "runs_compiled", False) else "peak bytes held by op outputs"
    text = (f"{what} {' -> '.join(f'{p / 2**20:.3g}' for p in peaks)} MiB at T = {', '.join(map(str, LENGTHS))}"
            f" ({'forward and backward' if grad else 'forward only: no backward here'}): T^{order:.2f}, "
            f"declared T^{declared:g}")
    return Outcome("memory-order", "pass" if order <= declared + 0.2 else "fail", text)


def _fastest(calls: list[Callable[[], object]], rounds: int = 9, budget_s: float = 2.0) -> list[float]:
    """The fastest time of each call over interleaved rounds (one call of each per round, after a
    warm-up of each): a burst of load then slows every length alike instead of one."""
    for fn in calls:
        fn()
    best, start = [math.inf] * len(calls), time.perf_counter()
    for r in range(rounds):
        for i, fn in enumerate(calls):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return best


def check_time_order(s: Subject) -> Outcome:
    m = s.build()
    declared = float(getattr(m, "time_order", 2.0))
    xs = [s.x(1, T) for T in LENGTHS]
    with torch.no_grad():
        times = _fastest([lambda x=x: m(x) for x in xs])
    order = math.log2(times[-1] / times[-2])  # the longest pair: below it caches and fixed costs bend the line
    text = (f"forward {' -> '.join(f'{t * 1e3:.3g}' for t in times)} ms (fastest of interleaved rounds) at T = "
            f"{', '.join(map(str, LENGTHS))}: T^{order:.2f}, declared T^{declared:g}")
    return Outcome("time-order", "pass" if order <= declared + 0.3 else "fail", text)


def check_decoding(s: Subject) -> Outcome:
    m = s.build()
    if not (hasattr(m, "has_step") and m.has_step()):
        return Outcome("decoding", "skip", "no step: the mixer does not decode token by token")
    if not s.causal:
        return Outcome("decoding", "skip", "bidirectional: decoding needs a causal mixer")
    lengths, refused = s.lengths(m, (2, 7, 9, 13, 37))
    if not lengths:
        return Outcome("decoding", "skip", "; ".join(refused))
    for T in lengths:
        x = s.x(2, T, seed=T)
        with torch.no_grad():
            y_ref = m(x)
            for prompt in sorted({0, *s.lengths(m, (1, T // 2, T - 1, T))[0]}):
                state = m.init_state(2, T + 3)
                ys = []
                if prompt:
                    ys.append(m.prefill(x[:, :prompt], state)[0])
                ys += [m.step(x[:, t:t + 1], state)[0] for t in range(prompt, T)]
                moved = _moved(torch.cat(ys, dim=1), y_ref)
                if moved > LEAK:
                    return Outcome("decoding", "fail", f"prefill of {prompt} then steps to T={T} differ from the causal "
                                                       f"forward by {moved:.2g} of its largest output")
        try:
            analytic = m.state_bytes(2, T + 3, torch.empty((), dtype=torch.float32).element_size())
        except NotImplementedError:
            analytic = None
        if analytic is not None and state.nbytes() != analytic:
            return Outcome("decoding", "fail", f"the state holds {state.nbytes()} bytes at max_len={T + 3}, "
                                               f"state_bytes says {analytic}")
    size = "state bytes as state_bytes says" if analytic is not None else "no analytic state size (state_bytes absent)"
    note = f"; {'; '.join(refused)}" if refused else ""
    return Outcome("decoding", "pass", f"prefill + steps equal the causal forward at T = {', '.join(map(str, lengths))} "
                                       f"(prompts 0, 1, T/2, T-1, T where accepted); {size}{note}")


CHECKS: dict[str, Callable[[Subject], Outcome]] = {
    "shapes": check_shapes, "batch": check_batch, "determinism": check_determinism, "gradients": check_gradients,
    "exactness": check_exactness, "causality": check_causality, "no-TxT": check_no_square,
    "memory-order": check_memory_order, "time-order": check_time_order, "decoding": check_decoding,
}


def run_check(name: str, s: Subject) -> Outcome:
    """One check; an exception the mixer raises is that check's failure, in one line."""
    try:
        return CHECKS[name](s)
    except Exception as e:  # noqa: BLE001 - the mixer's own error is the finding
        first = (str(e).strip().splitlines() or [""])[0]
        return Outcome(name, "fail", f"raised {type(e).__name__}: {first}")
