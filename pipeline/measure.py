"""How attnbench measures: wall time with warm-up and repeats, peak memory with a clean start,
FLOPs (analytic and counted) and the machine's GEMM peak.

    timing = time_calls(fn, device, warmup=2, min_repeats=5, min_time_s=1.0)   # timing.ms, timing.wait
    with PeakMemory(device) as pm:
        fn()
    pm.peak_mb, pm.method

Why not `torch.utils.benchmark.Timer`: its `blocked_autorange` reports per-block means, while a
cell here keeps every single call as a raw sample (logged as an artifact), and needs the explicit
"at least N calls and at least S seconds" stopping rule of the scenario config.
"""
from __future__ import annotations

import ctypes
import json
import os
import platform
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.evidence import MachineWatch, SchedWait, cpu_count, gpu_disturbance
from pipeline.registry import cache_dir
from pipeline.stability import Timing, iqr, median_ci, noise_reached, usable_samples

# --- device helpers -----------------------------------------------------------


def sync(device: torch.device | str) -> None:
    """Wait for queued device work, so host clocks measure it (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model_name()


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --- timing -------------------------------------------------------------------


def time_calls(
    fn: Callable[[], object],
    device: torch.device | str,
    warmup: int = 2,
    min_repeats: int = 5,
    min_time_s: float = 1.0,
    max_time_s: float = 30.0,
    warmup_s: float = 0.0,
    noise_target: float = 0.0,
    noise_max_s: float = 0.0,
) -> Timing:
    """Every timed call of `fn` with the evidence of its disturbance (pipeline/stability.py).

    Untimed calls until both `warmup` calls and `warmup_s` seconds are reached; then timed calls
    until both `min_repeats` calls and `min_time_s` seconds are reached, and, with a
    `noise_target`, on until the 95 % CI of the median of the undisturbed calls is within
    ±noise_target of it, for at most `noise_max_s` more seconds; never past `max_time_s` (at
    least one call is always timed). The device is synchronised around every call; on CUDA the
    time comes from CUDA events, which time the device work itself. Around each call, outside
    the timed span, the scheduler's run-queue wait of every thread of this process is read: the
    share of the call's wall time its threads waited for a CPU.

    Why a warm-up by time too: on CPU the first calls of a kernel that allocates large buffers
    fault in fresh pages until the heap has grown to its working set, which takes a few calls
    (measured: an FFT-convolution mixer at n=8192 ran its 2nd-5th calls 20-75% slower than
    the rest), more than a fixed count of 2 covers for fast kernels."""
    device = torch.device(device)
    start = time.perf_counter()
    done = 0
    # the time-based part stops after 100 extra calls: microsecond kernels need no 0.5 s of them
    while done < warmup or (time.perf_counter() - start < warmup_s and done < warmup + 100):
        fn()
        sync(device)
        done += 1
    use_events = device.type == "cuda"
    sched = SchedWait()
    timing = Timing(ms=[], wait=[], threads=torch.get_num_threads(), cpus=cpu_count())
    machine = MachineWatch()
    start = time.perf_counter()
    next_check = 0
    minimums_at = None  # when both minimums were met: the noise target's extra time counts from here
    while True:
        w0 = sched.read()
        if use_events:
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            c0 = time.perf_counter()
            t0.record()
            fn()
            t1.record()
            t1.synchronize()
            wall_ns = (time.perf_counter() - c0) * 1e9
            timing.ms.append(t0.elapsed_time(t1))
        else:
            c0 = time.perf_counter()
            fn()
            wall_ns = (time.perf_counter() - c0) * 1e9
            timing.ms.append(wall_ns * 1e-6)
        w1 = sched.read()
        timing.wait.append(None if w0 is None or w1 is None else max(0, w1 - w0) / max(wall_ns, 1.0))
        elapsed = time.perf_counter() - start
        if len(timing.ms) >= min_repeats and elapsed >= min_time_s:
            minimums_at = elapsed if minimums_at is None else minimums_at
            if noise_target <= 0:
                timing.stop = "minimum count and time"
                break
            if len(timing.ms) >= next_check:  # re-sorting every call would cost microsecond kernels
                next_check = len(timing.ms) + max(1, len(timing.ms) // 10)
                if noise_reached(timing, noise_target):
                    timing.stop = f"CI within ±{noise_target:.0%} of the median"
                    break
                if not usable_samples(timing)[2]:
                    # most calls disturbed: more of them under the same load would not reach the
                    # target; the cell is measured again in a new process instead (pipeline/cell.py)
                    timing.stop = "most calls disturbed: stopped at the minimums"
                    break
            if elapsed >= minimums_at + noise_max_s:
                timing.stop = f"noise target ±{noise_target:.0%} not reached in noise_max_s={noise_max_s:g}"
                break
        if elapsed >= max_time_s:
            timing.stop = f"max_time_s={max_time_s:g}"
            break
    machine.finish(timing)
    if use_events:
        timing.device_note = gpu_disturbance(device)
    return timing


def summarize(samples_ms: list[float]) -> dict[str, float]:
    """Median, interquartile range, min and count of raw samples (never a single mean), with the
    median's 95 % CI (order statistics; [min, max] below 6 samples)."""
    if not samples_ms:
        raise ValueError("no samples")
    s = sorted(samples_ms)
    lo, hi = median_ci(s)
    return {"median": statistics.median(s), "iqr": iqr(s), "min": s[0], "count": float(len(s)),
            "ci_lo": lo, "ci_hi": hi}


def loss_fall_last_quarter(losses: list[float]) -> float | None:
    """How much a fit was still learning when it stopped: the mean loss of the third quarter of
    its steps minus that of the last quarter, over the last quarter's (0.03: the loss still fell
    3 % over the last quarter). None with fewer than 8 steps or a last quarter at or below 0."""
    q = len(losses) // 4
    if q < 2:
        return None
    third, last = statistics.fmean(losses[-2 * q:-q]), statistics.fmean(losses[-q:])
    return (third - last) / last if last > 0 else None


# --- memory -------------------------------------------------------------------

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def malloc_trim() -> bool:
    """Hand freed heap pages back to the OS (glibc), so one phase's leftovers don't count in the
    next phase's peak. Returns False where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a region above what was resident when it began.

    CUDA: `max_memory_allocated` after `reset_peak_stats` (and reserved, for the allocator's
    cache). CPU: the process's resident high-water mark (VmHWM), reset through clear_refs after a
    malloc_trim; where the reset is refused, the method says the figure is the whole-process
    high-water mark since start, which includes earlier phases.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.peak_mb = float("nan")
        self.reserved_mb = float("nan")
        self.method = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self._base_reserved = torch.cuda.memory_reserved(self.device)
            self.method = "cuda.max_memory_allocated"
        else:
            trimmed = malloc_trim()
            self._base = (_status_kb("VmRSS") or 0) * 1024
            reset = _reset_hwm()
            self.method = "VmHWM+clear_refs" if reset else "VmHWM-since-start"
            if trimmed:
                self.method += "+malloc_trim"
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            self.peak_mb = (peak - self._base) / 2**20
            self.reserved_mb = (torch.cuda.max_memory_reserved(self.device) - self._base_reserved) / 2**20
        else:
            hwm = _status_kb("VmHWM")
            self.peak_mb = ((hwm or 0) * 1024 - self._base) / 2**20 if hwm else float("nan")


def available_memory_bytes(device: torch.device | str) -> int:
    """Memory a cell could use now: free GPU memory, or the OS's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def total_memory_bytes(device: torch.device | str) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    import psutil

    return int(psutil.virtual_memory().total)


# --- FLOPs --------------------------------------------------------------------


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs `torch.utils.flop_counter` sees in one call. A cross-check only: it counts 0 for
    kernels it has no formula for (e.g. SDPA's CPU flash kernel) and the full square for masked
    causal matmuls, so a 0 here means "not counted", never "no work"."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _peak_cache() -> Path:
    return cache_dir() / "gemm_peak.json"


def gemm_peak_tflops(device: torch.device | str, dtype: torch.dtype, size: int = 2048) -> float:
    """The machine's measured dense GEMM rate (TFLOP/s): median of torch.mm size^3 products.
    Cached per host, device, dtype, thread count and torch version, so every cell of a sweep
    compares against the same figure."""
    device = torch.device(device)
    key = "|".join(
        [socket.gethostname(), device_name(device), str(dtype), str(torch.get_num_threads()),
         torch.__version__, str(size)]
    )
    cache, cache_file = {}, _peak_cache()
    if cache_file.exists():
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
    if key in cache:
        return float(cache[key])
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    timing = time_calls(lambda: torch.mm(a, b), device, warmup=3, min_repeats=10, min_time_s=0.5)
    peak = 2 * size**3 / (summarize(timing.ms)["median"] * 1e-3) / 1e12
    cache[key] = peak
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(cache_file)
    except OSError:
        pass
    return peak
