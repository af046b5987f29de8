"""The evidence that another process disturbed a measurement, as the OS reports it: every
thread's run-queue wait (Linux schedstat), other processes' CPU use and hypervisor steal
(/proc/stat), the run queue (/proc/loadavg), and on CUDA other processes and clock throttling
(NVML, where pynvml is installed). pipeline/measure.py reads it around its timed calls;
pipeline/stability.py judges it.

    sched = SchedWait(); w0 = sched.read(); ...; waited_ns = sched.read() - w0
    watch = MachineWatch(); ...; watch.finish(timing)     # fills others_cores, steal_frac, runnable
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from pipeline.stability import Timing


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class SchedWait:
    """Nanoseconds the threads of this process have waited on a run queue, summed: field 2 of
    /proc/self/task/<tid>/schedstat. `read()` gives None where the kernel does not expose it."""

    def __init__(self) -> None:
        self.available = Path("/proc/self/schedstat").exists()

    def read(self) -> int | None:
        if not self.available:
            return None
        total = 0
        try:
            tids = os.listdir("/proc/self/task")
        except OSError:
            return None
        for tid in tids:
            try:
                with open(f"/proc/self/task/{tid}/schedstat", "rb") as f:
                    total += int(f.read().split()[1])
            except (OSError, ValueError, IndexError):
                continue  # a thread that ended between the listing and the read
        return total


def _proc_stat() -> tuple[float, float] | None:
    """(busy, steal) seconds of all CPUs since boot, from /proc/stat's first line."""
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()
        v = [int(x) for x in parts[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq) / hz, steal / hz


def _running() -> int | None:
    """Runnable scheduling entities now (/proc/loadavg's 4th field, before the slash)."""
    try:
        return int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


class MachineWatch:
    """The machine around a timed loop: other processes' CPU use (all CPUs' busy time less this
    process's own), hypervisor steal, and the run queue before and after."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.stat0 = _proc_stat()
        self.own0 = time.process_time()
        self.run0 = _running()

    def finish(self, timing: Timing) -> None:
        wall = time.perf_counter() - self.t0
        stat1, own = _proc_stat(), time.process_time() - self.own0
        run1 = _running()
        if self.stat0 and stat1 and wall > 0:
            busy = stat1[0] - self.stat0[0]
            # /proc/stat counts in clock ticks (10 ms): below a few ticks the figure is noise
            timing.others_cores = max(0.0, busy - own) / wall if wall >= 0.2 else None
            timing.steal_frac = (stat1[1] - self.stat0[1]) / (wall * cpu_count())
        if self.run0 is not None and run1 is not None:
            timing.runnable = (self.run0, run1)


def loop_timing(ms: list[float], wait: list[float | None], watch: MachineWatch, world: int = 1) -> Timing:
    """A Timing of a loop timed elsewhere (Lightning's steps), with the machine watched around
    it. Several ranks share the cores: the other ranks are the cell's own work, not others'."""
    threads = torch.get_num_threads()
    t = Timing(ms=list(ms), wait=list(wait), threads=cpu_count() if world > 1 else threads, cpus=cpu_count())
    watch.finish(t)
    return t


def gpu_disturbance(device: torch.device) -> str:
    """Other processes on the GPU and clock throttling other than idle, from NVML when pynvml
    is installed; the note says so where it is not (nothing checked is never "clean")."""
    try:
        import pynvml
    except ImportError:
        return ""
    try:
        pynvml.nvmlInit()
        idx = device.index if device.index is not None else torch.cuda.current_device()
        h = pynvml.nvmlDeviceGetHandleByIndex(idx)
        others = [p for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h) if p.pid != os.getpid()]
        reasons = pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(h)
        idle = getattr(pynvml, "nvmlClocksThrottleReasonGpuIdle", 1)
        app = getattr(pynvml, "nvmlClocksThrottleReasonApplicationsClocksSetting", 2)
        notes = []
        if others:
            notes.append(f"{len(others)} other process(es) on the GPU")
        if reasons & ~(idle | app):
            notes.append(f"clocks throttled (NVML reasons 0x{reasons:x})")
        return "; ".join(notes)
    except Exception:  # noqa: BLE001 - NVML is evidence, never a reason to fail a cell
        return ""
