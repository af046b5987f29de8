"""The `kernel` scenario: the sequence mixer alone, no backbone. Forward (no grad) and
forward+backward timed separately, peak memory of each, FLOPs analytic and counted, achieved
FLOP/s against the machine's measured GEMM peak.

    python -m pipeline.run scenario=kernel model=vanilla seq_len=4096 backbone=small
"""
from __future__ import annotations

import torch

from pipeline.measure import PeakMemory, count_flops, gemm_peak_tflops, summarize, time_calls
from pipeline.registry import build_mixer
from pipeline.scenarios.base import CellResult, Diverged, failure_text, is_oom, register


@register("kernel")
def run_kernel(cfg, device: torch.device, result: CellResult) -> None:
    sc, bb = cfg.scenario, cfg.backbone
    dtype = getattr(torch, bb.dtype)
    B, T, D = int(cfg.batch_size), int(cfg.seq_len), int(bb.d_model)
    mixer = build_mixer(cfg.model, d_model=D, n_heads=bb.n_heads, causal=cfg.causal).to(device=device, dtype=dtype)
    x_BTD = torch.randn(B, T, D, device=device, dtype=dtype)
    timing = dict(warmup=int(sc.warmup), warmup_s=float(sc.get("warmup_s", 0.0)), min_repeats=int(sc.min_repeats),
                  min_time_s=float(sc.min_time_s), max_time_s=float(sc.max_time_s))

    def fwd():
        with torch.no_grad():
            return mixer(x_BTD)

    y_BTD = fwd()  # first call outside every measurement: lazy init, backend selection
    if not torch.isfinite(y_BTD).all():
        raise Diverged(f"non-finite output from {cfg.model.name} at n={T}")
    del y_BTD
    with PeakMemory(device) as pm:
        fwd()
    fwd_ms = time_calls(fwd, device, **timing)
    backend = mixer.backend
    s = summarize(fwd_ms)
    m = result.metrics
    m.update({"kernel/fwd_ms": s["median"], "kernel/fwd_ms_iqr": s["iqr"], "kernel/fwd_ms_min": s["min"],
              "kernel/fwd_repeats": s["count"], "kernel/peak_mem_mb": pm.peak_mb})
    result.tags["memory_method"] = pm.method
    result.note_backend(backend, [mixer])

    flops = mixer.flops(B, T)
    m.update({"kernel/flops_fwd_analytic": flops["total"], "kernel/flops_fwd_projection": flops["projection"],
              "kernel/flops_fwd_mixing": flops["mixing"]})
    if sc.get("count_flops", True):
        counted = count_flops(fwd)
        if counted > 0:  # 0 means the counter has no formula for the kernel that ran, not "no work"
            m["kernel/flops_fwd"] = float(counted)
        else:
            result.tags["flops_counted_note"] = f"FlopCounterMode saw no FLOPs in backend {backend}"

    peak = gemm_peak_tflops(device, dtype)
    result.params["gemm_peak_tflops"] = round(peak, 4)
    achieved = flops["total"] / (s["median"] * 1e-3) / 1e12
    m.update({"kernel/tflops": achieved, "kernel/peak_fraction": achieved / peak})
    samples = {"fwd_ms": fwd_ms}

    # the mixing core alone: the mixer's projections (its nn.Linear layers, on inputs of this
    # shape) are timed by themselves, and the core's time is the forward's median minus theirs;
    # mixing FLOPs over that time is the rate of the attention (or band, or scan) proper
    proj = _projections(mixer, B, T, device, dtype)
    if proj is not None:
        samples["proj_ms"] = time_calls(proj, device, **timing)
        m["kernel/proj_ms"] = summarize(samples["proj_ms"])["median"]
        mix_ms = s["median"] - m["kernel/proj_ms"]
        if mix_ms > 0.05 * s["median"]:  # below that the difference is noise, not a time
            mix_rate = flops["mixing"] / (mix_ms * 1e-3) / 1e12
            m.update({"kernel/mix_ms": mix_ms, "kernel/mixing_tflops": mix_rate,
                      "kernel/mixing_peak_fraction": mix_rate / peak})
    fwdbwd_fits = result.params.get("predicted_mem_fwdbwd_mb", 0) <= result.params.get("budget_mem_mb", float("inf"))
    if sc.get("fwdbwd", True) and not fwdbwd_fits:
        result.tags["fwdbwd_skipped"] = (f"predicted {result.params['predicted_mem_fwdbwd_mb'] / 1024:.2f} GiB "
                                         f"exceeds the budget {result.params['budget_mem_mb'] / 1024:.2f} GiB")
    if sc.get("fwdbwd", True) and fwdbwd_fits:
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
            fb_ms = time_calls(fwdbwd, device, **timing)
        except Exception as e:
            # the backward holds more than the forward (vanilla: the probabilities, their gradient
            # and the scores' at once): running out there leaves the forward's figures standing
            if not is_oom(e):
                raise
            result.tags["fwdbwd_skipped"] = f"out of memory in forward+backward: {failure_text(e)}"
        else:
            s2 = summarize(fb_ms)
            m.update({"kernel/fwdbwd_ms": s2["median"], "kernel/fwdbwd_ms_iqr": s2["iqr"],
                      "kernel/fwdbwd_ms_min": s2["min"], "kernel/peak_mem_fwdbwd_mb": pm2.peak_mb})
            samples["fwdbwd_ms"] = fb_ms
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
