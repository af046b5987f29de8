"""The device-side checks `make gpu-check` runs before its sweep (scripts/gpu_check.sh): `probe`
prints what the device offers (torch, CUDA, the GPU, the carried wheels against the image) and
runs one timed bf16 xFormers call checked against SDPA; `plan` expands a grid as the sweeper
does and composes and validates every cell, without a GPU or torch.

    python -m pipeline.report.gpu_summary probe --site /tmp/site   (or: plan --grid gpu_check)
"""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline.report.format import fmt

# packages whose versions the check depends on, printed by `probe`
VERSIONS = ("torch", "xformers", "pytorch-lightning", "hydra-core", "omegaconf", "mlflow-skinny",
            "sqlalchemy", "alembic", "pydantic", "typing-extensions", "protobuf", "numpy", "pandas")


# ============================================================================ probe


def _carried_requirements(site: Path) -> list[str]:
    """Requirements of the distributions installed under `site` that the environment does not
    meet (the device has no resolver: --no-deps installs). One line each."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    problems = []
    carried = list(metadata.distributions(path=[str(site)]))
    for dist in carried:
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = metadata.version(req.name)  # first on sys.path: the carried copy, else the image's
            except metadata.PackageNotFoundError:
                problems.append(f"{dist.metadata['Name']} needs {req}: not installed")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append(f"{dist.metadata['Name']} needs {req}, found {canonicalize_name(req.name)} {have}")
    return problems


def probe(site: Path | None) -> int:
    """Print the device's facts; exit 1 unless xFormers' kernel runs a bf16 CUDA call."""
    from importlib import metadata

    import torch

    print(f"python {sys.version.split()[0]} at {sys.executable}")
    for name in VERSIONS:
        try:
            print(f"  {name:18s} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            print(f"  {name:18s} not installed")
    print(f"torch CUDA build {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
          f"CUDA available: {torch.cuda.is_available()}")
    if site is not None:
        problems = _carried_requirements(site)
        print(f"carried wheels in {site}: " + ("every requirement met" if not problems else
                                              f"{len(problems)} requirement(s) not met by the image:"))
        for p in problems:
            print(f"  WARN {p}")
    if not torch.cuda.is_available():
        print("FAIL no CUDA device: nothing to probe")
        return 1
    dev = torch.device("cuda", 0)
    props = torch.cuda.get_device_properties(dev)
    free, total = torch.cuda.mem_get_info(dev)
    print(f"GPU {props.name}: compute capability {props.major}.{props.minor}, {props.multi_processor_count} SMs, "
          f"{total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free)")

    try:
        import xformers
        import xformers.ops as xops
    except Exception as e:  # noqa: BLE001 - any import failure is the finding
        print(f"FAIL xformers does not import: {type(e).__name__}: {e}")
        return 1
    print(f"xformers {xformers.__version__} from {Path(xformers.__file__).parent}")
    from models.xformers_attn import xformers_build_note  # what the xformers variant does too

    note = xformers_build_note()
    print(f"xformers build: {note or 'C++ extension loaded'}")
    B, T, H, K = 1, 4096, 4, 64
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, T, H, K, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    bias = xops.LowerTriangularMask()
    try:
        from xformers.ops.fmha.common import Inputs
        from xformers.ops.fmha.dispatch import _dispatch_fw

        op = _dispatch_fw(Inputs(query=q, key=k, value=v, attn_bias=bias), needs_gradient=False).NAME
    except Exception as e:  # noqa: BLE001 - the operator name is information only
        op = f"(not determined: {type(e).__name__}: {e})"
    try:
        y = xops.memory_efficient_attention(q, k, v, attn_bias=bias)  # also the timing's warm-up
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        print(f"FAIL xformers.ops.memory_efficient_attention on bf16 CUDA: {type(e).__name__}: {e}")
        return 1
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(), is_causal=True
    ).transpose(1, 2)
    err = (y.float() - ref).abs().max().item()
    from pipeline.measure import summarize as summarize_samples
    from pipeline.measure import time_calls

    timing = time_calls(lambda: xops.memory_efficient_attention(q, k, v, attn_bias=bias), dev,
                        warmup=0, min_repeats=10, min_time_s=0.0)
    ms = summarize_samples(timing.ms)["median"]
    tflops = 4 * B * H * T * T * K / 2 / (ms * 1e-3) / 1e12  # QK^T and PV, half of the square (causal)
    ok = err < 2e-2
    print(f"{'PASS' if ok else 'FAIL'} xformers memory_efficient_attention bf16 causal (B={B}, T={T}, H={H}, K={K}) "
          f"ran on {props.name} with operator {op}: max |err| vs fp32 SDPA {err:.2e}, "
          f"median {fmt(ms)} ms ({tflops:.0f} TFLOP/s)")
    return 0 if ok else 1


# ============================================================================ plan


def plan(grid: str, extra: list[str]) -> int:
    """Expand `grid` as the sweeper does, compose and validate every cell, print what will run."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    import pipeline  # noqa: F401 - registers the config resolvers
    from pipeline.config import ConfigError, to_dict
    from pipeline.registry import CONF_DIR
    from pipeline.sweep import check_cell, expand_grids

    arguments = [f"grid={grid}", *extra]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        master = compose(config_name="config", overrides=arguments, return_hydra_config=True)
        grids = OmegaConf.to_container(master.hydra.sweeper.grids, resolve=False) or [{}]
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        jobs = expand_grids(parser, grids, arguments)
        groups: dict[tuple, list[str]] = {}
        checked_tasks: set = set()
        for job in jobs:
            d = to_dict(compose(config_name="config", overrides=job))
            try:
                check_cell(d, checked_tasks)  # what the sweeper checks before its first cell
            except ConfigError as e:
                print(f"FAIL cell does not validate: {e} (cell: {' '.join(job)})")
                return 1
            key = (d["scenario"]["name"], d["backbone"]["dtype"], d["trainer"].get("precision"), d["model"]["name"])
            ckpt = "+ckpt" if d["trainer"].get("grad_checkpointing") else ""
            groups.setdefault(key, []).append(f"{d['seq_len']}{ckpt}")
    print(f"grid={grid}: {len(jobs)} cells in {len(grids)} grids, every one composes and validates")
    for (scenario, dtype, precision, model), lengths in groups.items():
        what = f"{scenario:7s} {model:11s} dtype={dtype:9s}"
        if scenario != "kernel":
            what += f" precision={precision}"
        print(f"  {what} n={','.join(lengths)}")
    print(f"cells: {len(jobs)}")
    return 0
