"""The child side of a cell: what runs in the measuring process. Threads, seed and device,
provenance tags, pre-flight (the variant's length check and memory prediction), then the
scenario on its own config section; every failure is classified, never raised.

    result = execute(cell_dict)        # in the child (pipeline/worker.py), or inline (isolate=false)

The parent side (resume, sweep-level skips, isolation, the device lock, the MLflow record) is
pipeline/cell.py; this module is imported only where the cell measures.
"""
from __future__ import annotations

import os
import time
import traceback
from typing import Any

import torch

from pipeline import record as R
from pipeline.allocator import allocator_tag
from pipeline.analytic import analytic
from pipeline.devices import cuda_missing, wants_cuda
from pipeline.measure import available_memory_bytes, device_name, total_memory_bytes
from pipeline.registry import build_mixer
from pipeline.scenarios import load_all
from pipeline.scenarios.base import CellResult, Diverged, Plan, SkipCell, failure_text, is_oom
from pipeline.schema import scenario_section, workload


def execute(d: dict[str, Any]) -> CellResult:
    """Set up threads, seed and device, run the scenario, classify any failure. Never raises
    (but KeyboardInterrupt, after recording it)."""
    result = CellResult()
    try:
        w, sc = workload(d), scenario_section(d)
        device = _device(d)
        # several ranks share the cores: each gets its share, never the whole machine
        world = int(w.trainer.devices) if str(w.trainer.strategy).startswith("ddp") else 1
        threads = w.trainer.num_threads or max(1, len(os.sched_getaffinity(0)) // world)
        torch.set_num_threads(int(threads))
        torch.manual_seed(w.seed)
        result.tags.update({
            R.DEVICE: device.type, R.DEVICE_NAME: device_name(device),
            R.NUM_THREADS: str(torch.get_num_threads()), R.WORLD_SIZE: str(world), R.TORCH_VERSION: torch.__version__,
            R.ALLOCATOR: allocator_tag(), R.FP32_MATMUL: fp32_matmul_tag(),
        })
        plan = preflight(d, device, w, sc)
        result.tags.update(plan.tags)
        result.params.update(plan.params())
        if plan.skip_reason:
            raise SkipCell(plan.skip_reason)
        t0 = time.perf_counter()
        try:
            load_all()[sc.name](sc, w, plan, device, result)
        finally:
            result.metrics[R.CELL_SCENARIO_S] = time.perf_counter() - t0
    except SkipCell as e:
        result.status, result.failure_reason = "skipped", str(e)
    except Diverged as e:
        result.status, result.failure_reason = "diverged", str(e) or "non-finite loss"
    except BaseException as e:
        result.status = "oom" if is_oom(e) else "error"
        result.failure_reason = failure_text(e)
        result.artifacts["traceback.txt"] = traceback.format_exc()
        if isinstance(e, KeyboardInterrupt):
            raise
    return result


def fp32_matmul_tag() -> str:
    """The precision fp32 matmuls run at: "highest" is full fp32; "high"/"medium" let CUDA use TF32
    (bf16 on some CPUs). The getter refuses once the newer per-backend setting has been used."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return f"cuda matmul fp32_precision={torch.backends.cuda.matmul.fp32_precision}"


def _device(d) -> torch.device:
    if wants_cuda(d):
        why = cuda_missing()
        if why is not None:
            raise RuntimeError(why)
        return torch.device("cuda", 0)
    return torch.device("cpu")


def preflight(d: dict[str, Any], device: torch.device, w=None, sc=None) -> Plan:
    """Check the variant accepts this length and predict the cell's memory from the variant's
    analytic model, before any compute. The plan says whether to skip, and why. `w` and `sc`:
    the cell's workload and scenario section where the caller has built them already."""
    w = w or workload(d)
    sc = sc or scenario_section(d)
    bb = w.backbone
    mixer = build_mixer(w.model, d_model=bb.d_model, n_heads=bb.n_heads, causal=w.causal, n_kv_heads=bb.n_kv_heads)
    mixer.check_seq_len(w.seq_len)
    tags = {flag: str(getattr(mixer, flag)) for flag in R.CAPABILITY_TAGS}
    dtype_bytes = torch.empty((), dtype=getattr(torch, bb.dtype)).element_size()
    B, T = w.batch_size, w.seq_len
    # a variant without an analytic memory model is not judged against the budget here (nothing
    # is guessed): its own process bounds an out-of-memory, recorded as oom
    per_mixer = analytic(mixer.memory_bytes, B, T, dtype_bytes, absent=tags)
    budget_gb = (d.get("budget") or {}).get("memory_gb")
    budget = float(budget_gb) * 2**30 if budget_gb else 0.8 * available_memory_bytes(device)
    fwdbwd = predicted = None
    if hasattr(sc, "new_tokens"):
        # decoding: every layer's state for n + k tokens, plus one prefill forward
        from pipeline.scenarios.decode import predicted_decode_bytes

        layers = bb.n_layers if sc.with_backbone else 1
        state = analytic(mixer.state_bytes, B, T + sc.new_tokens, dtype_bytes, absent=tags)
        if per_mixer is not None and state is not None:
            predicted = predicted_decode_bytes(mixer, B, T, sc.new_tokens, dtype_bytes, n_layers=layers,
                                               d_model=bb.d_model if sc.with_backbone else 0, mlp_ratio=bb.mlp_ratio,
                                               vocab_size=sc.vocab_size if sc.with_backbone else 0)
    elif per_mixer is not None and not sc.uses_task:
        # the mixer alone: the forward must fit; forward+backward (activations kept, plus their
        # gradients: about twice) is a separate phase the scenario drops, with a tag, when it would not
        predicted, fwdbwd = per_mixer, 2 * per_mixer
    elif per_mixer is not None:
        # every block keeps its mixer's and MLP's activations for backward; x2 for gradients
        mlp = B * T * bb.d_model * (2 * bb.mlp_ratio + 6) * dtype_bytes
        predicted = bb.n_layers * (per_mixer + mlp) * 2
    skip = None
    if predicted is not None and predicted > budget:
        skip = f"predicted peak {predicted / 2**30:.2f} GiB exceeds the memory budget {budget / 2**30:.2f} GiB"
    return Plan(budget_bytes=budget, device_memory_bytes=total_memory_bytes(device), predicted_bytes=predicted,
                predicted_fwdbwd_bytes=fwdbwd, tags=tags, skip_reason=skip)
