"""Whether a timed figure can be trusted: the confidence interval of its median, which of its
samples another process disturbed, and the cell's verdict `stable`, `unstable` or
`contaminated` with the evidence. Pure Python (no torch, no numpy): the measuring loop
(pipeline/measure.py) gathers the evidence, this module judges it.

    lo, hi = median_ci(samples_ms)                   # 95 % CI of the median (order statistics)
    a = assess(timing, noise_target=0.03)            # Assessment: label, reason, estimate, CI
    label, reason = combine([a_fwd, a_fwdbwd])       # the cell's stability from its figures

The rules, and why (docs/measurement.md says the same for users):

- **A disturbed call.** Linux accounts, per thread, the nanoseconds a runnable thread waited
  for a CPU (`/proc/<pid>/task/<tid>/schedstat`, field 2). On a quiet machine a call's threads
  wait for well under 1 % of its wall time; beside a CPU hog they wait for most of it. A call
  whose threads together waited more than `WAIT_FRAC` of its wall time was preempted: it is a
  contaminated sample. Measured here (2-core Xeon, 2 threads, 4-head attention): quiet, 2-3 %
  of calls pass 5 %; beside a continuous `yes`, 46-100 %.
- **Leaving samples out.** Contaminated samples are left out of the estimate when at least
  `MIN_CLEAN` clean ones remain and they are more than `CLEAN_SHARE` of all. Where they are not
  more than half, the figure is `contaminated`: the clean rest is too small a part to stand for
  the whole. A short series (fewer than `MIN_CLEAN` clean calls) with a disturbed minority keeps
  every call: its median still lies among the clean ones.
- **The machine.** Other processes' CPU time over the measurement (/proc/stat's busy time less
  this process's own) in cores, steal time, and the run queue before and after. Where the cell
  leaves cores idle, a process on those cores slows it without preempting it (caches, memory
  bandwidth): then `OTHERS_CORES` of other work marks the figure contaminated. Steal above
  `STEAL_FRAC` does too (a hypervisor took the CPU away).
- **Unstable.** The figure is a median, so what decides whether it can be trusted is the CI of
  that median: wider than ±`CI_MAX` of it is unstable, and so are fewer calls than a 95 % CI
  needs (6). pyperf warns when the standard deviation is over 10 % of the mean, because it
  reports a mean, which one slow call moves. The robust equivalent here, the IQR over 1.349 (a
  normal distribution's IQR in standard deviations) over the median, is held to `SPREAD_MAX`
  = 25 %: a tight CI over a series that wide is the sign of two modes (a kernel that runs
  fast or slow by the turn of its threads), between which the median of another run can jump.
  Measured here on a quiet machine, sub-millisecond kernels have a robust spread of 10-23 %
  with a CI of ±2-4 %: pyperf's 10 % would flag every toy cell for what is the call's own
  variation. Also unstable: a step (the two halves of the series, in time order, have disjoint
  CIs and medians more than `STEP_MIN` apart: the machine changed during the measurement).
  pyperf's "min/max 50 % from the mean" rule is not used: a median is not moved by one slow
  call, and such calls are mostly caught as contaminated.
- **Measured again** (pipeline/cell.py) are the figures that another process may have spoiled:
  `contaminated` ones, and `unstable` ones with a step, with over `DISTURBED_SHARE` of their
  calls left out as disturbed (a quiet machine leaves out 0-5 %), or with other processes using
  `OTHERS_CORES` or more. An unstable figure with none of these is
  the kernel's own variation (or too few calls by the grid's own limits): a new process would
  measure it the same, so it is recorded as it is, once.
"""
from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pipeline import record as R

CONFIDENCE = 0.95
Z95 = 1.959964        # the normal quantile of a two-sided 95 % interval
WAIT_FRAC = 0.05      # a call whose threads waited on the run queue over 5 % of its wall time
MIN_CLEAN = 6         # clean samples needed to leave contaminated ones out (a 95 % CI needs 6) ...
CLEAN_SHARE = 0.5     # ... and the share of all samples they must be
OTHERS_CORES = 0.5    # other processes' CPU use beside a cell that leaves cores idle
STEAL_FRAC = 0.05     # hypervisor steal over the measurement
SPREAD_MAX = 0.25     # robust coefficient of variation: IQR / 1.349 / median (two modes)
CI_MAX = 0.10         # half-width of the median's CI over the median
STEP_MIN = 0.10       # the halves' medians apart by more than this (and disjoint CIs)
DISTURBED_SHARE = 0.10  # an unstable figure with more calls than this left out was disturbed
STEP_MIN_SAMPLES = 12  # the step test needs this many samples (6 per half: a 95 % CI each)

STABLE, UNSTABLE, CONTAMINATED = R.STABILITIES  # the record owns the names
_RANK = {STABLE: 0, UNSTABLE: 1, CONTAMINATED: 2}


# ----------------------------------------------------------------------------- estimators
@functools.lru_cache(maxsize=4096)
def median_ci_ranks(n: int, confidence: float = CONFIDENCE) -> tuple[int, int] | None:
    """0-based ranks (lo, hi) of the sorted samples that bound the median with at least
    `confidence`, distribution-free: the number of samples below the median is Binomial(n, 1/2),
    so [x(j), x(n-1-j)] covers it with probability 1 - 2·P(X <= j). The narrowest such pair;
    None when even [min, max] covers less (n < 6 at 95 %). Cached per n: the timing loop asks
    again as its samples grow."""
    tail = (1 - confidence) / 2  # P(X <= j) may be at most this
    log_half_n = n * math.log(0.5)
    cdf, best = 0.0, None
    for j in range(n // 2):
        cdf += math.exp(math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + log_half_n)
        if cdf > tail * (1 + 1e-12):
            break
        best = j
    return None if best is None else (best, n - 1 - best)


def median_ci(samples: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """A `confidence` CI of the median of `samples` (order statistics). With too few samples for
    that confidence it is [min, max], which then covers less: `ci_covers` says whether it does."""
    s = sorted(samples)
    if not s:
        raise ValueError("no samples")
    ranks = median_ci_ranks(len(s), confidence)
    lo, hi = ranks if ranks else (0, len(s) - 1)
    return s[lo], s[hi]


def ci_covers(n: int, confidence: float = CONFIDENCE) -> bool:
    return median_ci_ranks(n, confidence) is not None


def robust_cv(samples: Sequence[float]) -> float:
    """IQR / 1.349 / median: a standard deviation over a mean that one outlier does not move."""
    if len(samples) < 4:
        return 0.0
    q = statistics.quantiles(samples, n=4, method="inclusive")
    med = statistics.median(samples)
    return (q[2] - q[0]) / 1.349 / med if med > 0 else math.inf


def step_change(samples: Sequence[float]) -> float | None:
    """The relative change of the median from the first half of the series (time order) to the
    second, when the two halves' 95 % CIs do not overlap; None otherwise or when too short."""
    if len(samples) < STEP_MIN_SAMPLES:
        return None
    half = len(samples) // 2
    a, b = samples[:half], samples[half:]
    (alo, ahi), (blo, bhi) = median_ci(a), median_ci(b)
    if ahi < blo or bhi < alo:
        ma, mb = statistics.median(a), statistics.median(b)
        return mb / ma - 1 if ma > 0 else None
    return None


# ----------------------------------------------------------------------------- evidence
@dataclass
class Timing:
    """What a timed loop measured: every call's milliseconds in time order and, per call, the
    share of its wall time its threads waited for a CPU (None: the OS gave no such figure), plus
    the machine around the loop."""

    ms: list[float]
    wait: list[float | None] = field(default_factory=list)
    threads: int = 1               # the measuring process's compute threads
    cpus: int = 1                  # CPUs the process may run on
    others_cores: float | None = None  # other processes' CPU use over the loop, in cores
    steal_frac: float | None = None    # hypervisor steal over the loop, share of all CPU time
    runnable: tuple[int, int] | None = None  # /proc/loadavg's running count before and after
    device_note: str = ""          # a GPU's evidence: other processes, clock throttling
    stop: str = ""                 # why sampling stopped

    def clean_mask(self) -> list[bool]:
        return [w is None or w <= WAIT_FRAC for w in (self.wait or [None] * len(self.ms))]

    def to_dict(self) -> dict:
        return {"ms": self.ms, "wait": self.wait, "threads": self.threads, "cpus": self.cpus,
                "others_cores": self.others_cores, "steal_frac": self.steal_frac,
                "runnable": list(self.runnable) if self.runnable else None,
                "device_note": self.device_note, "stop": self.stop}


@dataclass
class Assessment:
    """One timed figure judged: its estimate (median of the samples used), the CI, how many
    samples were left out, and the label with its reason ("" when stable)."""

    label: str
    reason: str
    median: float
    ci_lo: float
    ci_hi: float
    iqr: float
    minimum: float
    used: int
    excluded: int

    @property
    def rel_half_width(self) -> float:
        return (self.ci_hi - self.ci_lo) / 2 / self.median if self.median > 0 else math.inf


def iqr(s: Sequence[float]) -> float:
    """Interquartile range (0 below 2 samples)."""
    if len(s) < 2:
        return 0.0
    q = statistics.quantiles(s, n=4, method="inclusive")
    return q[2] - q[0]


def log_sigma(lo: float, hi: float) -> float:
    """σ of log(value) from its 95 % interval [lo, hi] (log-normal); NaN without a usable one."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0 or hi < lo:
        return math.nan
    return math.log(hi / lo) / (2 * Z95)


def usable_samples(t: Timing) -> tuple[list[float], int, bool]:
    """(samples the estimate uses, how many were left out, whether enough clean ones remained).
    Disturbed calls are left out while MIN_CLEAN clean ones remain; in a shorter series (a few
    predict batches) a disturbed minority is kept: the median of the whole still lies among the
    clean calls."""
    mask = t.clean_mask()
    clean = [x for x, ok in zip(t.ms, mask) if ok]
    left_out = len(t.ms) - len(clean)
    if left_out == 0:
        return list(t.ms), 0, True
    if len(clean) < CLEAN_SHARE * len(t.ms) or (len(clean) == left_out):
        return list(t.ms), 0, False
    if len(clean) >= MIN_CLEAN:
        return clean, left_out, True
    return list(t.ms), 0, True


def assess(t: Timing) -> Assessment:
    """Judge one timed figure by the rules in the module docstring."""
    if not t.ms:
        raise ValueError("no samples")
    used, excluded, enough = usable_samples(t)
    med = statistics.median(used)
    lo, hi = median_ci(used)
    reasons_c: list[str] = []
    reasons_u: list[str] = []
    disturbed = sum(1 for ok in t.clean_mask() if not ok)
    if not enough:
        reasons_c.append(f"{disturbed} of {len(t.ms)} calls waited for a CPU over {WAIT_FRAC:.0%} of their time")
    if t.others_cores is not None and t.others_cores >= OTHERS_CORES and t.threads < t.cpus:
        reasons_c.append(f"other processes used {t.others_cores:.2f} cores beside its {t.threads} of {t.cpus}")
    if t.steal_frac is not None and t.steal_frac > STEAL_FRAC:
        reasons_c.append(f"hypervisor steal {t.steal_frac:.1%} (limit {STEAL_FRAC:.0%})")
    if t.device_note:
        reasons_c.append(t.device_note)
    cv = robust_cv(used)
    if cv > SPREAD_MAX:
        reasons_u.append(f"spread {cv:.1%} of the median (IQR/1.349; limit {SPREAD_MAX:.0%})")
    half = (hi - lo) / 2 / med if med > 0 else math.inf
    if not ci_covers(len(used)):
        reasons_u.append(f"{len(used)} samples: too few for a {CONFIDENCE:.0%} CI of the median")
    elif half > CI_MAX:
        reasons_u.append(f"CI of the median ±{half:.1%} (limit ±{CI_MAX:.0%})")
    step = step_change(used)
    if step is not None and abs(step) > STEP_MIN:
        reasons_u.append(f"step of {step:+.0%} between the halves of the series")
    label = CONTAMINATED if reasons_c else UNSTABLE if reasons_u else STABLE
    return Assessment(label=label, reason="; ".join(reasons_c + reasons_u), median=med, ci_lo=lo, ci_hi=hi,
                      iqr=iqr(used), minimum=min(used), used=len(used), excluded=excluded)


def noise_reached(t: Timing, target: float) -> bool:
    """Whether the clean samples' median CI is within ±target of their median (the stopping rule)."""
    used, _, enough = usable_samples(t)
    if not enough or not ci_covers(len(used)):
        return False
    med = statistics.median(used)
    lo, hi = median_ci(used)
    return med > 0 and (hi - lo) / 2 <= target * med


def combine(figures: Iterable[tuple[str, Assessment | dict]]) -> tuple[str, str]:
    """The cell's label (the worst of its figures) and the reason, each figure's named.
    A figure is an Assessment or a dict with its `label` and `reason`."""
    label, reasons = STABLE, []
    for name, a in figures:
        lab, why = (a["label"], a["reason"]) if isinstance(a, dict) else (a.label, a.reason)
        if _RANK[lab] > _RANK[label]:
            label = lab
        if why:
            reasons.append(f"{name}: {why}")
    return label, "; ".join(reasons)


def disturbed(a: Assessment | dict) -> bool:
    """Whether a figure that is not stable shows a sign of another process: contaminated, or
    unstable with a step, with calls left out as disturbed, or beside other processes' work."""
    label = a["label"] if isinstance(a, dict) else a.label
    if label == CONTAMINATED:
        return True
    if label != UNSTABLE:
        return False
    reason = a["reason"] if isinstance(a, dict) else a.reason
    left_out = a["left_out"] if isinstance(a, dict) else a.excluded
    calls = (a.get("calls") if isinstance(a, dict) else a.used + a.excluded) or 0
    others = (a.get("others_cores") if isinstance(a, dict) else None) or 0.0
    return "step" in reason or left_out > DISTURBED_SHARE * calls or others >= OTHERS_CORES
