"""The `kernel` scenario: the sequence mixer alone, no backbone. Forward (no grad) and
forward+backward timed separately, peak memory of each, FLOPs analytic and counted, achieved
FLOP/s against the machine's measured GEMM peak. A mixer with no backward on the cell's device
(`SequenceMixer.refusal`) is measured forward only, its forward+backward recorded skipped with
the mixer's reason.

    python -m pipeline.run scenario=kernel model=vanilla seq_len=4096 backbone=small
"""
from __future__ import annotations

import torch

from pipeline import record as R
from pipeline.analytic import analytic
from pipeline.measure import PeakMemory, count_flops, gemm_peak_tflops, time_calls
from pipeline.registry import build_mixer
from pipeline.scenarios.base import CellResult, Diverged, Plan, failure_text, is_oom, register
from pipeline.schema import KernelScenario, Workload


def timing_knobs(sc) -> dict:
    """time_calls' keyword arguments from a scenario section with the timing fields."""
    return dict(warmup=int(sc.warmup), warmup_s=float(sc.warmup_s), min_repeats=int(sc.min_repeats),
                min_time_s=float(sc.min_time_s), max_time_s=float(sc.max_time_s),
                noise_target=float(sc.noise_target), noise_max_s=float(sc.noise_max_s))


@register("kernel")
def run_kernel(sc: KernelScenario, w: Workload, plan: Plan, device: torch.device, result: CellResult) -> None:
    bb = w.backbone
    dtype = getattr(torch, bb.dtype)
    B, T, D = w.batch_size, w.seq_len, bb.d_model
    mixer = build_mixer(w.model, d_model=D, n_heads=bb.n_heads, causal=w.causal, n_kv_heads=bb.n_kv_heads).to(device=device, dtype=dtype)
    x_BTD = torch.randn(B, T, D, device=device, dtype=dtype)
    timing = timing_knobs(sc)

    def fwd():
        with torch.no_grad():
            return mixer(x_BTD)

    y_BTD = fwd()  # first call outside every measurement: lazy init, backend selection
    if not torch.isfinite(y_BTD).all():
        raise Diverged(f"non-finite output from {w.model['name']} at n={T}")
    del y_BTD
    with PeakMemory(device) as pm:
        fwd()
    fwd_t = time_calls(fwd, device, **timing)
    backend = mixer.backend
    fwd_median = result.add_timing(R.KERNEL_FWD_MS, fwd_t, iqr=R.KERNEL_FWD_MS_IQR, minimum=R.KERNEL_FWD_MS_MIN,
                                   count=R.KERNEL_FWD_REPEATS).median
    m = result.metrics
    m[R.KERNEL_PEAK_MEM_MB] = pm.peak_mb
    result.tags[R.MEMORY_METHOD] = pm.method
    result.note_backend(backend, [mixer])

    flops = analytic(mixer.flops, B, T, absent=result.tags)  # None: no analytic count, and no rates from one
    if flops is not None:
        m.update({R.KERNEL_FLOPS_FWD_ANALYTIC: flops["total"], R.KERNEL_FLOPS_FWD_PROJECTION: flops["projection"],
                  R.KERNEL_FLOPS_FWD_MIXING: flops["mixing"]})
    if sc.count_flops:
        try:
            counted = count_flops(fwd)
        except RuntimeError as e:
            # a kernel that runs only compiled refuses the counter's dispatch mode (torch.compile
            # skips frames under one): the forward above stands, the cross-check is not made
            if is_oom(e):
                raise
            counted = None
            result.tags[R.FLOPS_COUNTED_NOTE] = f"FlopCounterMode could not run the forward: {failure_text(e)}"
        if counted is not None and counted > 0:  # 0: the counter has no formula for the kernel that ran, not "no work"
            m[R.KERNEL_FLOPS_FWD] = float(counted)
        elif counted is not None:
            result.tags[R.FLOPS_COUNTED_NOTE] = f"FlopCounterMode saw no FLOPs in backend {backend}"

    peak = gemm_peak_tflops(device, dtype)
    result.params[R.GEMM_PEAK_TFLOPS] = round(peak, 4)
    if flops is not None:
        achieved = flops["total"] / (fwd_median * 1e-3) / 1e12
        m.update({R.KERNEL_TFLOPS: achieved, R.KERNEL_PEAK_FRACTION: achieved / peak})
    samples = {"fwd_ms": fwd_t.to_dict()}

    # the mixing core alone: the mixer's projections (its nn.Linear layers, on inputs of this
    # shape) are timed by themselves, and the core's time is the forward's median minus theirs;
    # mixing FLOPs over that time is the rate of the attention (or band, or scan) proper
    proj = _projections(mixer, B, T, device, dtype)
    if proj is not None:
        proj_t = time_calls(proj, device, **timing)
        samples["proj_ms"] = proj_t.to_dict()
        result.add_timing(R.KERNEL_PROJ_MS, proj_t)
        mix_ms = fwd_median - m[R.KERNEL_PROJ_MS]
        if mix_ms > 0.05 * fwd_median:  # below that the difference is noise, not a time
            m[R.KERNEL_MIX_MS] = mix_ms
            if flops is not None:
                mix_rate = flops["mixing"] / (mix_ms * 1e-3) / 1e12
                m.update({R.KERNEL_MIXING_TFLOPS: mix_rate, R.KERNEL_MIXING_PEAK_FRACTION: mix_rate / peak})
    # a mixer without a backward on this device (its `refusal`) keeps its forward figures
    no_backward = mixer.refusal(device.type, bb.dtype, backward=True) if hasattr(mixer, "refusal") else None
    if sc.fwdbwd and no_backward is not None:
        result.tags[R.FWDBWD_SKIPPED] = no_backward
    elif sc.fwdbwd and not plan.fwdbwd_fits:
        result.tags[R.FWDBWD_SKIPPED] = (f"predicted {plan.predicted_fwdbwd_bytes / 2**30:.2f} GiB "
                                         f"exceeds the budget {plan.budget_bytes / 2**30:.2f} GiB")
    if sc.fwdbwd and plan.fwdbwd_fits and no_backward is None:
        x_req = x_BTD.detach().clone().requires_grad_(True)
        g_BTD = torch.randn_like(x_BTD)

        def fwdbwd():
            mixer.zero_grad(set_to_none=True)
            x_req.grad = None
            mixer(x_req).backward(g_BTD)

        try:
            fwdbwd()
            with PeakMemory(device) as pm2:
                fwdbwd()
            fb_t = time_calls(fwdbwd, device, **timing)
        except Exception as e:
            # the backward holds more than the forward (vanilla: the probabilities, their gradient
            # and the scores' at once): running out there leaves the forward's figures standing
            if not is_oom(e):
                raise
            result.tags[R.FWDBWD_SKIPPED] = f"out of memory in forward+backward: {failure_text(e)}"
        else:
            result.add_timing(R.KERNEL_FWDBWD_MS, fb_t, iqr=R.KERNEL_FWDBWD_MS_IQR, minimum=R.KERNEL_FWDBWD_MS_MIN)
            m[R.KERNEL_PEAK_MEM_FWDBWD_MB] = pm2.peak_mb
            samples["fwdbwd_ms"] = fb_t.to_dict()
    result.artifacts["timings.json"] = samples


def _projections(mixer: torch.nn.Module, B: int, T: int, device, dtype):
    """A no-grad call of every nn.Linear of the mixer on a (B, T, in_features) input, or None."""
    lins = [mod for mod in mixer.modules() if isinstance(mod, torch.nn.Linear)]
    if not lins:
        return None
    xs = {f: torch.randn(B, T, f, device=device, dtype=dtype) for f in {lin.in_features for lin in lins}}

    def run():
        with torch.no_grad():
            for lin in lins:
                lin(xs[lin.in_features])

    return run
