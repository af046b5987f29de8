"""Fixtures of the report tests: a small MLflow store shaped like a real sweep, with known
answers, and one report built from it.

Power laws are exact so fits and crossovers have closed-form answers (`store.expected`):
vanilla forward = 2e-6·n² ms, xformers 1e-6·n², longformer 4e-3·n, performer 5e-2·n.

    def test_x(store, built): store.uri, store.kernel, store.expected; path, md, html = built
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline import record as R

EXPERIMENT = "fixture"
SWEEP = "sweep-a"
OLD_SWEEP = "sweep-old"
D, H, B = 64, 2, 1
LENGTHS = (256, 512, 1024, 2048, 4096)
GEMM_PEAK = 1.0  # TFLOP/s
BUDGET_MB = 2048.0  # the budget pre-flight logs (budget_mem_mb) on every kernel cell
T0 = 1_700_000_000_000  # ms; every run gets T0 + its creation index, so "latest" is well defined

# (exact, forward ms coefficient, exponent, forward memory MB coefficient, memory exponent, window)
KERNEL = {
    "vanilla": (True, 2e-6, 2, 1.6e-5, 2),
    "xformers": (True, 1e-6, 2, 2e-3, 1),
    "longformer": (False, 4e-3, 1, 1e-2, 1),
    "performer": (False, 5e-2, 1, 1e-4, 1),
}
EXPECTED = {
    # forward-time crossings: 2e-6 n² = 4e-3 n and 1e-6 n² = 4e-3 n
    ("longformer", "vanilla", "fwd"): 2000.0,
    ("longformer", "xformers", "fwd"): 4000.0,
    # forward memory: 1.6e-5 n² = 1e-2 n
    ("longformer", "vanilla", "mem"): 625.0,
    # memory wall of vanilla at 1 GB: 1.6e-5 n² = 1024
    ("vanilla", "wall_1gb"): 8000.0,
    # and at the logged 2 GiB budget: 1.6e-5 n² = 2048
    ("vanilla", "wall_logged"): (2048 / 1.6e-5) ** 0.5,
}
# quality of the mqar cells (seed 0, seed 1), training throughput (tokens/s at n=64), base peak MB
MQAR = {
    "vanilla": ((0.94, 0.96), 1.0e4, 80.0),
    "xformers": ((0.94, 0.96), 1.2e4, 60.0),
    "longformer": ((0.69, 0.71), 2.0e4, 55.0),
    "performer": ((0.49, 0.51), 1.5e4, 65.0),
}
BACKEND = {
    "vanilla": "math",
    "xformers": "sdpa_flash",
    "longformer": "longformer-blockwise",
    "performer": "favor-chunked",
}
# training peak MB and step ms with checkpointing on; off is 100 MB and 50 ms for both
CKPT_ON = {"vanilla": (60.0, 65.0), "longformer": (75.0, 60.0)}  # saves 40% / 25%, adds 30% / 20%
FIDELITY = {"vanilla": 0.0, "xformers": 1e-6, "longformer": 0.3, "performer": 0.2}

# decode cells: (ms per token coefficient c, exponent: ms = c·n^e; analytic state MiB per token
# held (n + k) when the state grows, else the constant state MiB; whether it grows)
DECODE_LENGTHS = (512, 1024, 2048, 4096, 8192)
DECODE_K = 32  # scenario.new_tokens
DECODE = {
    "vanilla": (1e-4, 1, 1 / 2048, True),  # KV cache 2·D·4 B = 512 B per token
    "xformers": (5e-5, 1, 1 / 2048, True),
    "longformer": (0.2, 0, 1.0, False),
    "performer": (0.4, 0, 0.25, False),
}
EXPECTED.update({
    # per-token crossings: 1e-4 n = 0.2, 5e-5 n = 0.2, 1e-4 n = 0.4, 5e-5 n = 0.4
    ("longformer", "vanilla", "decode"): 2000.0,
    ("longformer", "xformers", "decode"): 4000.0,
    ("performer", "vanilla", "decode"): 4000.0,
    ("performer", "xformers", "decode"): 8000.0,
    # tokens an exact cache holds at the budget: budget MiB · 2048 tokens per MiB
    ("vanilla", "decode_context_logged"): BUDGET_MB * 2048,
    ("vanilla", "decode_context_1gb"): 1024 * 2048.0,
})


@dataclass
class FixtureStore:
    uri: str
    experiment: str
    sweep_id: str
    parent_run_id: str
    reused_run_id: str
    superseded_run_id: str  # an older ok run sharing a config_hash with a sweep run
    sweep_cells: int  # child runs of the sweep plus the reused one
    experiment_cells: int  # cells a no-sweep report keeps (latest per config_hash)
    failures: dict[str, tuple[str, str]] = field(default_factory=dict)  # run_id -> (status, reason)
    kernel: dict = field(default_factory=lambda: dict(KERNEL))  # model -> (exact, coefficients, orders)
    decode: dict = field(default_factory=dict)  # model -> DECODE's entry; empty: no decode cells
    expected: dict = field(default_factory=lambda: dict(EXPECTED))  # closed-form answers


class _Writer:
    def __init__(self, uri: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.exp = self.client.create_experiment(EXPERIMENT)
        self.clock = 0

    def run(
        self,
        name: str,
        tags: dict,
        params: dict,
        metrics: dict,
        history: dict | None = None,
        parent: str | None = None,
    ) -> str:
        from mlflow.entities import Metric, Param

        self.clock += 1
        now = T0 + self.clock * 1000
        tags = {k: str(v) for k, v in tags.items()}
        if parent:
            tags["mlflow.parentRunId"] = parent
        run_id = self.client.create_run(
            self.exp, start_time=now, tags=tags, run_name=name
        ).info.run_id
        ms = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        for k, values in (history or {}).items():
            ms += [Metric(k, float(v), now, i) for i, v in enumerate(values)]
        self.client.log_batch(
            run_id, metrics=ms, params=[Param(k, str(v)) for k, v in params.items()]
        )
        ok = tags.get(R.STATUS) in ("ok", "skipped", None)
        self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED", end_time=now + 500)
        return run_id


def _common_tags(
    model: str, scenario: str, task: str, n: int, status: str, sweep: str | None
) -> dict:
    tags = {
        "model": model,
        "scenario": scenario,
        "task": task,
        "status": status,
        "config_hash": f"h-{model}-{scenario}-{task}-{n}",
        "device": "cpu",
        "device_name": "Fixture CPU 9000",
        "num_threads": "2",
        "torch_version": "2.13.0",
        "xformers_version": "0.0.30",
        "git_sha": "abc123def456",
        "host": "fixture-host",
        "memory_method": "vmhwm",
        "allocator": "default",
        "exact": str(KERNEL[model][0]),
    }
    if sweep:
        tags[R.SWEEP_ID] = sweep
    return tags


def _params(
    model: str, scenario: str, task: str, n: int, seed: int = 0, ckpt: bool = False
) -> dict:
    p = {
        "model.name": model,
        "seq_len": n,
        "batch_size": B,
        "backbone.d_model": D,
        "backbone.n_heads": H,
        "backbone.dtype": "float32",
        "causal": True,
        "trainer.grad_checkpointing": ckpt,
        "task.name": task,
        "scenario.name": scenario,
        "seed": seed,
    }
    if model == "longformer":
        p["model.window"] = 64
    return p


def _kernel_metrics(model: str, n: int) -> dict:
    _, tc, te, mc, me = KERNEL[model]
    fwd = tc * n**te
    proj = 8.0 * B * n * D**2
    mixing = {
        "vanilla": 2.0 * n * n * D,
        "xformers": 2.0 * n * n * D,
        "longformer": 4.0 * n * 64 * D,
        "performer": 4.0 * n * 32 * D,
    }[model]
    total = proj + mixing
    tflops = total / (fwd * 1e-3) / 1e12
    m = {
        R.KERNEL_FWD_MS: fwd,
        R.KERNEL_FWD_MS_IQR: 0.05 * fwd,
        R.KERNEL_FWD_MS_MIN: 0.95 * fwd,
        R.KERNEL_FWDBWD_MS: 3 * fwd,
        R.KERNEL_FWDBWD_MS_IQR: 0.1 * fwd,
        R.KERNEL_PEAK_MEM_MB: mc * n**me,
        R.KERNEL_PEAK_MEM_FWDBWD_MB: 2.5 * mc * n**me,
        R.KERNEL_FLOPS_FWD_ANALYTIC: total,
        R.KERNEL_FLOPS_FWD_PROJECTION: proj,
        R.KERNEL_FLOPS_FWD_MIXING: mixing,
        R.KERNEL_TFLOPS: tflops,
        R.KERNEL_PEAK_FRACTION: tflops / GEMM_PEAK,
    }
    if model == "vanilla":
        m[R.KERNEL_FLOPS_FWD] = proj + 2 * mixing  # the counter sees the full masked square
    elif model == "longformer":
        m[R.KERNEL_FLOPS_FWD] = total
    elif model == "performer":
        m[R.KERNEL_FLOPS_FWD] = (
            0.0  # an old run that logged the counter's 0: must read "not counted"
        )
    return m


def _decode_metrics(model: str, n: int) -> dict:
    c, e, state, grows = DECODE[model]
    ms = c * n**e
    state_mb = state * (n + DECODE_K) if grows else state
    m = {
        R.DECODE_MS_PER_TOKEN: ms,
        R.DECODE_MS_PER_TOKEN_IQR: 0.05 * ms,
        R.DECODE_TOKENS_PER_S: B / (ms * 1e-3),
        R.DECODE_PREFILL_MS: 1e-3 * n,
        R.DECODE_STATE_MB: state_mb,
        R.DECODE_STATE_MB_ANALYTIC: state_mb,
        R.DECODE_PEAK_MEM_MB: 2 * state_mb,
    }
    if grows:  # the cell's own bisection at the logged budget; absent for a constant state
        m[R.DECODE_CONTEXT_AT_BUDGET] = BUDGET_MB / state
    return m


def build_fixture_store(root: Path, decode: bool = True) -> FixtureStore:
    """The store; decode=False leaves out the decode cells (a sweep without them)."""
    uri = f"sqlite:///{Path(root).resolve() / 'fixture.db'}"
    w = _Writer(uri)
    failures: dict[str, tuple[str, str]] = {}

    # an earlier sweep: the longformer n=256 kernel cell later reused, and a vanilla n=512 cell
    # that the new sweep measures again (same config_hash: the report keeps the newer one)
    reused = w.run(
        "longformer-n256-kernel",
        {
            **_common_tags("longformer", "kernel", "mqar", 256, "ok", OLD_SWEEP),
            "backend": "longformer-blockwise",
        },
        {**_params("longformer", "kernel", "mqar", 256), "gemm_peak_tflops": GEMM_PEAK, "budget_mem_mb": BUDGET_MB},
        _kernel_metrics("longformer", 256),
    )
    superseded = w.run(
        "vanilla-n512-kernel",
        {**_common_tags("vanilla", "kernel", "mqar", 512, "ok", OLD_SWEEP), "backend": "math"},
        {**_params("vanilla", "kernel", "mqar", 512), "gemm_peak_tflops": GEMM_PEAK, "budget_mem_mb": BUDGET_MB},
        {**_kernel_metrics("vanilla", 512), R.KERNEL_FWD_MS: 99.0},
    )
    old_cells = 2

    parent = w.run(f"sweep-{SWEEP}", {"sweep_id": SWEEP, "attnbench.role": "sweep"}, {}, {})
    w.client.set_tag(parent, "reused/h-longformer-kernel-mqar-256", reused)
    cells = 0

    def cell(
        model,
        scenario,
        task,
        n,
        status="ok",
        reason="",
        metrics=None,
        seed=0,
        ckpt=False,
        backend=None,
        history=None,
        extra_tags=None,
        extra_params=None,
    ):
        nonlocal cells
        tags = _common_tags(model, scenario, task, n, status, SWEEP)
        if seed or ckpt:
            tags[R.CONFIG_HASH] += f"-s{seed}" + ("-ckpt" if ckpt else "")
        tags[R.BACKEND] = backend or BACKEND[model]
        if reason:
            tags[R.FAILURE_REASON] = reason
        tags.update(extra_tags or {})
        params = _params(model, scenario, task, n, seed, ckpt)
        if scenario == "kernel":
            params[R.GEMM_PEAK_TFLOPS] = GEMM_PEAK
            params[R.BUDGET_MEM_MB] = BUDGET_MB
        params.update(extra_params or {})
        name = f"{model}-n{n}-{scenario}" + ("-ckpt" if ckpt else "")
        rid = w.run(name, tags, params, metrics or {}, history, parent=parent)
        cells += 1
        if status != "ok":
            failures[rid] = (status, reason)
        return rid

    for model in KERNEL:
        for n in LENGTHS:
            if model == "longformer" and n == 256:
                continue  # reused from the earlier sweep
            if model == "vanilla" and n == 4096:
                oom = cell(
                    model,
                    "kernel",
                    "mqar",
                    n,
                    "oom",
                    "OutOfMemoryError: DefaultCPUAllocator: can't allocate memory: you tried to allocate 4294967296 bytes",
                )
                continue
            if model == "performer" and n == 4096:
                cell(model, "kernel", "mqar", n, "timeout", "killed after 900 s (timeout_s)")
                continue
            backend = "sdpa_math" if model == "xformers" and n == 256 else BACKEND[model]
            extra = (
                {"backend_note": "xformers kernel needs CUDA; ran torch SDPA"}
                if model == "xformers"
                else None
            )
            cell(
                model,
                "kernel",
                "mqar",
                n,
                metrics=_kernel_metrics(model, n),
                backend=backend,
                extra_tags=extra,
            )
    cell(
        "vanilla",
        "kernel",
        "mqar",
        8192,
        "skipped",
        f"a shorter length ran out of memory: run {oom}",
    )

    for model, ((q0, q1), tps, mem) in MQAR.items():
        for n in (64, 128):
            for seed, q in ((0, q0), (1, q1)):
                cell(
                    model,
                    "full",
                    "mqar",
                    n,
                    seed=seed,
                    history={R.TRAIN_LOSS: [2.0, 1.5, 1.0 - q / 2]},
                    metrics={
                        R.VAL_ACC: q,
                        R.VAL_LOSS: 1 - q,
                        R.TRAIN_TOKENS_PER_S: tps * 64 / n,
                        R.TRAIN_STEP_MS: 1e3 * B * n / tps,
                        R.TRAIN_PEAK_MEM_MB: mem + n / 8,
                        R.INFER_LATENCY_MS: 2.0,
                        R.INFER_TOKENS_PER_S: 2 * tps,
                        R.INFER_PEAK_MEM_MB: 30.0,
                    },
                )
    for model, err in FIDELITY.items():
        cell(
            model,
            "infer",
            "fidelity",
            256,
            metrics={
                R.QUALITY_REL_ERR_VS_EXACT: err,
                R.INFER_TOKENS_PER_S: MQAR[model][1],
                R.INFER_PEAK_MEM_MB: MQAR[model][2] / 3,
            },
        )
    for model, (mem_on, step_on) in CKPT_ON.items():
        for ckpt, mem, step in ((False, 100.0, 50.0), (True, mem_on, step_on)):
            cell(
                model,
                "train",
                "mqar",
                128,
                ckpt=ckpt,
                metrics={
                    R.TRAIN_PEAK_MEM_MB: mem,
                    R.TRAIN_STEP_MS: step,
                    R.TRAIN_TOKENS_PER_S: 128e3 / step,
                    R.VAL_ACC: MQAR[model][0][0],
                },
            )
    for model in DECODE if decode else ():
        for n in DECODE_LENGTHS:
            cell(model, "decode", "mqar", n, metrics=_decode_metrics(model, n),
                 extra_params={"scenario.new_tokens": DECODE_K, R.BUDGET_MEM_MB: BUDGET_MB})
    return FixtureStore(
        uri=uri,
        experiment=EXPERIMENT,
        sweep_id=SWEEP,
        parent_run_id=parent,
        reused_run_id=reused,
        superseded_run_id=superseded,
        sweep_cells=cells + 1,
        experiment_cells=cells + old_cells - 1,
        failures=failures,
        decode=dict(DECODE) if decode else {},
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> FixtureStore:
    return build_fixture_store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def built(store, tmp_path_factory):
    """The report of the fixture sweep (budget 1 GB): (folder, report.md text, report.html text)."""
    from pipeline.report import build_report

    out = tmp_path_factory.mktemp("report")
    path = build_report(store.experiment, store.sweep_id, out, budget_gb=1.0, tracking_uri=store.uri)
    return (
        path,
        (path / "report.md").read_text(encoding="utf-8"),
        (path / "report.html").read_text(encoding="utf-8"),
    )
