"""The record's names: every MLflow tag, metric and param that a writer and a reader share is
defined here once, with its unit and meaning. Nothing else spells them.

    from pipeline import record as R
    result.metrics[R.KERNEL_FWD_MS] = 12.3
    frame[R.col(R.KERNEL_FWD_MS)]            # "metrics.kernel/fwd_ms" in the report's table

Metric names carry their unit (`_ms`, `_mb`, `_s`, `_per_s`); `describe(name)` gives the line.
The config itself is recorded flattened (`seq_len`, `model.window`, ...): those params are named
by the config schema (pipeline/schema.py), and the few that readers use are listed at the end.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Name:
    key: str
    kind: str  # "tag", "metric" or "param"
    unit: str
    meaning: str


NAMES: dict[str, Name] = {}


def _name(kind: str, key: str, unit: str, meaning: str) -> str:
    if key in NAMES and NAMES[key].kind == kind:
        raise ValueError(f"record name {key!r} defined twice")
    NAMES[key] = Name(key, kind, unit, meaning)
    return key


def _tag(key: str, meaning: str) -> str:
    return _name("tag", key, "", meaning)


def _metric(key: str, unit: str, meaning: str) -> str:
    return _name("metric", key, unit, meaning)


def _param(key: str, unit: str, meaning: str) -> str:
    return _name("param", key, unit, meaning)


def describe(key: str) -> str:
    """One line: the name, its unit and what it means."""
    n = NAMES[key]
    return f"{n.key} [{n.unit or '-'}]: {n.meaning}"


# the report's table (pipeline/report/load.py) prefixes each kind as MLflow's search does
_PREFIX = {"tag": "tags.", "metric": "metrics.", "param": "params."}


def col(key: str, kind: str | None = None) -> str:
    """The column of a name in the report's run table: `tags.status`, `metrics.kernel/fwd_ms`.
    Config params not listed here (schema fields) need kind="param"."""
    return _PREFIX[kind or NAMES[key].kind] + key


# ---------------------------------------------------------------- tags: identity of a cell run
MODEL = _tag("model", "the variant's name (conf/model/<name>.yaml); a user's class (model=custom): its class name, "
                     "or the model.name given")
SCENARIO = _tag("scenario", "what the cell measures: kernel, infer, train, full, decode")
TASK = _tag("task", "the task's name (conf/task/)")
STATUS = _tag("status", "the cell's outcome: one of STATUSES, or running while it runs")
FAILURE_REASON = _tag("failure_reason", "one line: why a cell is not ok (empty when it is)")
CONFIG_HASH = _tag("config_hash", "sha256 prefix of the measurement fields of the config: a cell's identity")
FAMILY_HASH = _tag("family_hash", "config_hash without seq_len: the cell's line across lengths")
SWEEP_ID = _tag("sweep_id", "the sweep a run belongs to (parent and children)")
SKIPPED_AFTER = _tag("skipped_after", "run id of the shorter cell of the same line that ran out of memory")

# ---------------------------------------------------------------- tags: the sweep's parent run
ROLE = _tag("attnbench.role", "`sweep` on a sweep's parent run")
ROLE_SWEEP = "sweep"
GRID = _tag("grid", "the grid config a sweep ran (conf/grid/), or custom")
CELLS = _tag("cells", "a finished sweep's cell counts by status, e.g. `30 ok, 2 oom` (plus `(3 waiting in <spool>)` "
                      "until make replay records those and counts again)")
REUSED = _tag("reused", "how many cells a sweep reused from earlier runs")
REUSED_PREFIX = "reused/"  # parent tag reused/<config_hash> = the run id a cell reused
REPORT_DIR = _tag("report_dir", "where the sweep's report was written")
REPORT_ERROR = _tag("report_error", "why the sweep's report could not be built")

# ---------------------------------------------------------------- tags: provenance
DEVICE = _tag("device", "torch device type the cell ran on: cpu or cuda")
DEVICE_NAME = _tag("device_name", "the processor or GPU model")
NUM_THREADS = _tag("num_threads", "torch intra-op threads in the measuring process")
WORLD_SIZE = _tag("world_size", "processes (ranks) of the cell")
TORCH_VERSION = _tag("torch_version", "torch.__version__ of the measuring process")
XFORMERS_VERSION = _tag("xformers_version", "installed xformers version, or none")
GIT_SHA = _tag("git_sha", "the code's commit (with -dirty for local changes)")
HOST = _tag("host", "the machine that wrote the run")
PID = _tag("pid", "the process that wrote the run (orphan detection)")
ALLOCATOR = _tag("allocator", "the allocator environment of the measuring process")
SLURM_JOB_ID = _tag("slurm_job_id", "the SLURM job that ran the cell: <array job>_<task> for a task of an array")
SLURM_CLUSTER = _tag("slurm_cluster", "the SLURM cluster of slurm_job_id (SLURM_CLUSTER_NAME)")
HEARTBEAT = _tag("heartbeat", "unix time the run's writer last said it was alive (runs on a tracking server)")
FP32_MATMUL = _tag("fp32_matmul", "torch's float32 matmul precision: highest is true fp32")
# which mixer class ran and where it came from (a built-in variant's or a user's, model=custom)
MIXER_CLASS = _tag("mixer_class", "dotted path of the mixer class that ran (the model config's _target_)")
MIXER_FILE = _tag("mixer_file", "the source file of the mixer class's module")
MIXER_DIST = _tag("mixer_dist", "name==version of the installed distribution the mixer's module belongs to "
                                "(absent for a module outside every installed distribution)")
MIXER_TAGS = (MIXER_CLASS, MIXER_FILE, MIXER_DIST)

# ---------------------------------------------------------------- tags: what ran, and notes
BACKEND = _tag("backend", "the kernel that actually ran (e.g. sdpa-flash, xformers-cutlassF)")
BACKEND_NOTE = _tag("backend_note", "why a preferred kernel did not run")
BACKEND_DETAIL = _tag("backend_detail", "the operator that ran and how its library loaded")
MEMORY_METHOD = _tag("memory_method", "how peak memory was measured (cuda allocator, rss high-water)")
INFER_MEMORY_METHOD = _tag("infer_memory_method", "memory_method of a full cell's infer phase")
FLOPS_COUNTED_NOTE = _tag("flops_counted_note", "why no counted FLOPs were recorded")
FWDBWD_SKIPPED = _tag("fwdbwd_skipped", "why a kernel cell's forward+backward was not timed")
QUALITY_NOTE = _tag("quality_note", "why a quality figure means something other than usual")
# the variant's capability flags (models/base.py), recorded as "True"/"False" or the order
EXACT = _tag("exact", "the variant computes exact softmax attention")
IS_ATTENTION = _tag("is_attention", "the variant approximates softmax attention")
MATERIALISES_SCORES = _tag("materialises_scores", "the variant builds the n x n score matrix")
TIME_ORDER = _tag("time_order", "the variant's promised time order in n, e.g. n^2")
MEMORY_ORDER = _tag("memory_order", "the variant's promised memory order in n")
CAPABILITY_TAGS = (EXACT, IS_ATTENTION, MATERIALISES_SCORES, TIME_ORDER, MEMORY_ORDER)
# the variant's analytic models (flops, memory_bytes, state_bytes) it does not have: their
# figures (analytic FLOPs and the rates from them, pre-flight's predicted memory, the analytic
# state) are absent from the record, never guessed; a cell without memory_bytes is not judged
# against the budget before it runs (its own process bounds an out-of-memory)
ANALYTIC_ABSENT = _tag("analytic_absent", "comma-separated analytic models the variant lacks (flops, memory_bytes, "
                                          "state_bytes): their figures are not recorded")

# ---------------------------------------------------------------- the experiment
# MLflow's own tag that nests a cell's run under its sweep's run
PARENT_RUN = "mlflow.parentRunId"
# MLflow 3's UI opens an experiment by its kind: a model-training one on its runs table
EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND_TRAINING = "custom_model_development"

# ---------------------------------------------------------------- statuses
STATUSES = ("ok", "oom", "timeout", "error", "diverged", "skipped")
RUNNING = "running"
# MLflow run status for each cell status: only ok (and skipped) is FINISHED, so resume never
# reuses a failure
RUN_STATUS = {"ok": "FINISHED", "skipped": "FINISHED", "oom": "FAILED", "timeout": "FAILED",
              "error": "FAILED", "diverged": "FAILED"}

# ---------------------------------------------------------------- metrics: kernel
KERNEL_FWD_MS = _metric("kernel/fwd_ms", "ms", "median forward time of the mixer alone (no grad)")
KERNEL_FWD_MS_IQR = _metric("kernel/fwd_ms_iqr", "ms", "interquartile range of the forward times")
KERNEL_FWD_MS_MIN = _metric("kernel/fwd_ms_min", "ms", "fastest forward")
KERNEL_FWD_REPEATS = _metric("kernel/fwd_repeats", "count", "timed forward calls")
KERNEL_PEAK_MEM_MB = _metric("kernel/peak_mem_mb", "MiB", "peak memory of one forward above the baseline")
KERNEL_FWDBWD_MS = _metric("kernel/fwdbwd_ms", "ms", "median forward+backward time")
KERNEL_FWDBWD_MS_IQR = _metric("kernel/fwdbwd_ms_iqr", "ms", "interquartile range of forward+backward")
KERNEL_FWDBWD_MS_MIN = _metric("kernel/fwdbwd_ms_min", "ms", "fastest forward+backward")
KERNEL_PEAK_MEM_FWDBWD_MB = _metric("kernel/peak_mem_fwdbwd_mb", "MiB", "peak memory of one forward+backward")
KERNEL_FLOPS_FWD = _metric("kernel/flops_fwd", "FLOP", "forward FLOPs counted by torch.utils.flop_counter")
KERNEL_FLOPS_FWD_ANALYTIC = _metric("kernel/flops_fwd_analytic", "FLOP", "forward FLOPs from the variant's formula")
KERNEL_FLOPS_FWD_PROJECTION = _metric("kernel/flops_fwd_projection", "FLOP", "analytic FLOPs of the projections")
KERNEL_FLOPS_FWD_MIXING = _metric("kernel/flops_fwd_mixing", "FLOP", "analytic FLOPs of the mixing core")
KERNEL_TFLOPS = _metric("kernel/tflops", "TFLOP/s", "analytic forward FLOPs over the median forward time")
KERNEL_PEAK_FRACTION = _metric("kernel/peak_fraction", "ratio", "kernel/tflops over the machine's GEMM peak")
KERNEL_PROJ_MS = _metric("kernel/proj_ms", "ms", "median time of the mixer's projections alone")
KERNEL_MIX_MS = _metric("kernel/mix_ms", "ms", "forward median minus the projections': the mixing core")
KERNEL_MIXING_TFLOPS = _metric("kernel/mixing_tflops", "TFLOP/s", "mixing FLOPs over kernel/mix_ms")
KERNEL_MIXING_PEAK_FRACTION = _metric("kernel/mixing_peak_fraction", "ratio", "kernel/mixing_tflops over the GEMM peak")
# written only when the forward's time minus the projections' is more than noise (5% of it)
KERNEL_MIXING_ONLY_WHEN_MEASURABLE = (KERNEL_MIX_MS, KERNEL_MIXING_TFLOPS, KERNEL_MIXING_PEAK_FRACTION)

# ---------------------------------------------------------------- metrics: train / validation
TRAIN_STEP_MS = _metric("train/step_ms", "ms", "median training step, warm-up steps excluded")
TRAIN_STEP_MS_IQR = _metric("train/step_ms_iqr", "ms", "interquartile range of the step times")
TRAIN_STEP_MS_MIN = _metric("train/step_ms_min", "ms", "fastest training step")
TRAIN_STEPS = _metric("train/steps", "count", "training steps run")
TRAIN_TOKENS_PER_S = _metric("train/tokens_per_s", "tokens/s", "tokens per median step time")
TRAIN_PEAK_MEM_MB = _metric("train/peak_mem_mb", "MiB", "peak memory of the fit (max over ranks)")
TRAIN_FINAL_LOSS = _metric("train/final_loss", "nats", "the last training step's loss")
TRAIN_LOSS_FALL = _metric("train/loss_fall_last_quarter", "fraction",
                          "(mean loss of the third quarter of steps - of the last) / the last's: above ~1 % "
                          "a language model was still learning (near a loss of 0 it says little)")
TRAIN_WORLD_SIZE = _metric("train/world_size", "count", "ranks of the fit")
TRAIN_FIT_S = _metric("train/fit_s", "s", "the whole fit: steps, data, Lightning's own work")
TRAIN_LOSS = _metric("train/loss", "nats", "training loss, one value per step (a series)")
VAL_ACC = _metric("val/acc", "fraction", "accuracy on the scored (query) positions")
VAL_ACC_CHANCE = _metric("val/acc_chance", "fraction", "accuracy of guessing: 1 / num_values")
VAL_LOSS = _metric("val/loss", "nats", "validation cross-entropy")
VAL_BPC = _metric("val/bpc", "bits/byte", "validation loss in bits per character (byte-level LM)")
VAL_BPC_UNIGRAM = _metric("val/bpc_unigram", "bits/byte", "entropy of the unigram baseline")
VAL_WALL_S = _metric("val/wall_s", "s", "wall time of validation")

# ---------------------------------------------------------------- metrics: fidelity (no training)
QUALITY_REL_ERR_VS_EXACT = _metric("quality/rel_err_vs_exact", "ratio", "||y - y_exact|| / ||y_exact|| on the same inputs")
QUALITY_REL_ERR_UNIFORM_MEAN = _metric("quality/rel_err_uniform_mean", "ratio", "the same error of uniform (mean-of-values) attention")
QUALITY_ATTN_EFF_KEYS = _metric("quality/attn_eff_keys", "keys", "effective number of keys a query attends to (exp of entropy)")
QUALITY_SCORE_STD = _metric("quality/score_std", "logits", "standard deviation of the exact scores")
# precision (fidelity cells whose backbone.dtype is not float32): pipeline/fidelity.py precision_errors
QUALITY_REL_ERR_VS_FP32_REF = _metric("quality/rel_err_vs_fp32_ref", "ratio",
                                      "||y_dtype - y_fp32|| / ||y_fp32||: the variant in backbone.dtype against the same "
                                      "variant in float32, same weights (cast) and inputs")
QUALITY_REL_ERR_TORCH_SAME_DTYPE = _metric("quality/rel_err_torch_same_dtype", "ratio",
                                           "the same error of plain PyTorch exact attention (the task's reference, "
                                           "scores materialised) in backbone.dtype: FlashAttention's baseline")
PRECISION_RULE = _tag("precision_rule", "exact variants: pass/fail of rel_err_vs_fp32_ref <= 2 x rel_err_torch_same_dtype "
                      "+ floor (FlashAttention's test rule), with the ratio; approximate ones: not judged")

# ---------------------------------------------------------------- metrics: infer
INFER_LATENCY_MS = _metric("infer/latency_ms", "ms", "median predict latency per batch")
INFER_LATENCY_MS_IQR = _metric("infer/latency_ms_iqr", "ms", "interquartile range of the latencies")
INFER_LATENCY_MS_MIN = _metric("infer/latency_ms_min", "ms", "fastest predict batch")
INFER_TOKENS_PER_S = _metric("infer/tokens_per_s", "tokens/s", "tokens per median latency")
INFER_PEAK_MEM_MB = _metric("infer/peak_mem_mb", "MiB", "peak memory of the predict loop")

# ---------------------------------------------------------------- metrics: decode
DECODE_PREFILL_MS = _metric("decode/prefill_ms", "ms", "median init_state + prefill of the n-token prompt (the full forward, filling the state)")
DECODE_PREFILL_MS_IQR = _metric("decode/prefill_ms_iqr", "ms", "interquartile range of the prefill times")
DECODE_MS_PER_TOKEN = _metric("decode/ms_per_token", "ms", "median time of one generated token (one step of every sequence), device synchronised")
DECODE_MS_PER_TOKEN_IQR = _metric("decode/ms_per_token_iqr", "ms", "interquartile range of the per-token times")
DECODE_TOKENS_PER_S = _metric("decode/tokens_per_s", "tokens/s", "batch_size tokens per median step time")
DECODE_STATE_MB = _metric("decode/state_mb", "MiB", "measured bytes of the cache or state tensors for n + k tokens (every block with the backbone)")
DECODE_STATE_MB_ANALYTIC = _metric("decode/state_mb_analytic", "MiB", "the variant's state_bytes(batch_size, n + k)")
DECODE_PEAK_MEM_MB = _metric("decode/peak_mem_mb", "MiB", "peak memory of init_state + prefill + k steps above the baseline")
DECODE_CONTEXT_AT_BUDGET = _metric("decode/context_at_budget", "tokens", "longest context whose state fits the memory budget (absent: a constant-size state fits at any length)")
PREFILL_BACKEND = _tag("prefill_backend", "the kernel the decode scenario's prefill (the full forward) ran")

# ---------------------------------------------------------------- metrics: the harness
CELL_WALL_S = _metric("cell/wall_s", "s", "wall time of the cell, process start to result")
CELL_SCENARIO_S = _metric("cell/scenario_s", "s", "time inside the scenario function (the measurement itself)")
CELL_OVERHEAD_S = _metric("cell/overhead_s", "s", "the cell's wall time, validation to record, minus cell/scenario_s")
ISOLATION = _tag("isolation", "how the cell's process was started: fork (warm server), spawn, or inline")

# ---------------------------------------------------------------- trust: uncertainty and stability
# (pipeline/stability.py owns the rules; docs/measurement.md explains them)
STABILITY = _tag("stability", "stable, unstable or contaminated: whether the cell's timings can be trusted")
STABILITY_REASON = _tag("stability_reason", "the evidence behind a stability other than stable, per timed figure")
STABILITIES = ("stable", "unstable", "contaminated")  # best first
STABLE = STABILITIES[0]
CELL_ATTEMPTS = _metric("cell/attempts", "count", "times the cell was measured (again, in a new process, while not stable)")
CELL_ATTEMPT = _metric("cell/attempt", "index", "which attempt the recorded figures come from (1 = the first)")
CELL_OTHERS_CORES = _metric("cell/others_cores", "cores", "the most CPU other processes used over one of the cell's timed loops")
CELL_STEAL_FRAC = _metric("cell/steal_frac", "fraction", "the most hypervisor steal over one of the cell's timed loops")

# every timed figure: the median above, and beside it the 95 % CI of that median and the calls
# left out as disturbed (`<metric>_ci_lo`, `<metric>_ci_hi`, `<metric>_left_out`)
TIMED = (KERNEL_FWD_MS, KERNEL_FWDBWD_MS, KERNEL_PROJ_MS, TRAIN_STEP_MS, INFER_LATENCY_MS,
         DECODE_PREFILL_MS, DECODE_MS_PER_TOKEN)
_CI: dict[str, tuple[str, str, str]] = {}
for _m in TIMED:
    _CI[_m] = (_metric(f"{_m}_ci_lo", "ms", f"lower end of the 95 % CI of the median of {_m}"),
               _metric(f"{_m}_ci_hi", "ms", f"upper end of the 95 % CI of the median of {_m}"),
               _metric(f"{_m}_left_out", "count", f"calls of {_m} left out of the median as disturbed by another process"))


def ci_names(metric: str) -> tuple[str, str]:
    """(`<metric>_ci_lo`, `<metric>_ci_hi`) of a timed metric."""
    return _CI[metric][0], _CI[metric][1]


def left_out_name(metric: str) -> str:
    return _CI[metric][2]


# ---------------------------------------------------------------- params written by the cell
BUDGET_MEM_MB = _param("budget_mem_mb", "MiB", "the memory budget pre-flight judged against (logged, so a report on another host uses it)")
DEVICE_MEMORY_GB = _param("device_memory_gb", "GiB", "total memory of the cell's device")
PREDICTED_MEM_MB = _param("predicted_mem_mb", "MiB", "pre-flight's predicted peak from the variant's analytic model")
PREDICTED_MEM_FWDBWD_MB = _param("predicted_mem_fwdbwd_mb", "MiB", "pre-flight's predicted forward+backward peak (kernel cells)")
GEMM_PEAK_TFLOPS = _param("gemm_peak_tflops", "TFLOP/s", "the machine's measured GEMM peak at the cell's dtype")
# params of the sweep's parent run
N_CELLS = _param("n_cells", "count", "cells the sweep planned")
ARGUMENTS = _param("arguments", "", "the sweep's command-line overrides")

# ---------------------------------------------------------------- config params readers use
# (written by flattening the config; the schema in pipeline/schema.py owns them)
SEQ_LEN = "seq_len"
SEED = "seed"
ROUND = "round"  # which round of a sweep with rounds > 1 a cell is (a replicate, like the seed)
BATCH_SIZE = "batch_size"
D_MODEL = "backbone.d_model"
N_HEADS = "backbone.n_heads"
N_KV_HEADS = "backbone.n_kv_heads"  # key/value heads (grouped-query attention); absent: as many as N_HEADS
DTYPE = "backbone.dtype"
PRECISION = "trainer.precision"
GRAD_CHECKPOINTING = "trainer.grad_checkpointing"
CAUSAL = "causal"  # true: causal attention (half the score work is useful), false: bidirectional
KERNEL_FWDBWD = "scenario.fwdbwd"  # whether a kernel cell also timed forward+backward (not its forward)
# the variant's own config (conf/model/<name>.yaml) is recorded as model.<knob> params: its knobs
# (model.window, model.features, ...) name a setting; these two identify the variant, not a setting
MODEL_PARAM_PREFIX = "model."
MODEL_IDENTITY_PARAMS = ("model.name", "model._target_")


def run_name(model: str, seq_len: int, scenario: str, checkpointing: bool, round_: int | None = None) -> str:
    """`{model}-n{seq_len}-{scenario}`, plus `-ckpt` with gradient checkpointing, plus `-r{k}`
    for round k of a sweep with `rounds` > 1."""
    return f"{model}-n{seq_len}-{scenario}" + ("-ckpt" if checkpointing else "") + (f"-r{round_}" if round_ else "")
