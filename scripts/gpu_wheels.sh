#!/usr/bin/env bash
# The Python packages `make gpu-check` needs that the GPU machine's image lacks, as wheels in
# .whl/ (git-ignored), for CPython 3.12 on manylinux x86_64: that machine reaches no package
# index, so the wheels travel with the working tree and are installed there with
# `pip install --no-index --no-deps --target /tmp/site .whl/*.whl`.
#
#   bash scripts/gpu_wheels.sh            # download, check, print the total size (make gpu-wheels)
#   bash scripts/gpu_wheels.sh --verify   # also import and exercise them in a scratch Python 3.12
#
# The set is closed by hand, not by pip's resolver (which would resolve for *this* Python and
# fetch what the image already has): every Requires-Dist of every wheel here must be another
# wheel here or a package of the image (IMAGE below). The check at the end enforces that.
# Versions are the ones the project's own environment runs its tests with.
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=.whl
VERIFY=0
[[ "${1:-}" == "--verify" ]] && VERIFY=1
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
TARGET_PY=3.12
# pip matches manylinux_2_N exactly: list the ones the pinned binaries are published for
PLATFORM_ARGS=(--python-version "$TARGET_PY" --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

# The wheels, grouped by why they are here.
PINS=(
    # configuration: Hydra and OmegaConf (antlr4 is built below: 4.9.3 is published as sdist only)
    hydra-core==1.3.8 omegaconf==2.3.1
    # the memory-efficient attention variant (its CUDA kernels; wheel built for torch >= 2.10)
    xformers==0.0.35
    # tracking: the MLflow client without the server's UI, and what its SQLite store needs
    mlflow-skinny==3.17.2 SQLAlchemy==2.1.9 alembic==1.20.1 Mako==1.4.3
    # mlflow-skinny's own requirements that the image does not have
    cachetools==7.3.3 databricks-sdk==0.162.0 google-auth==2.63.0 pyasn1-modules==0.4.2 pyasn1==0.6.5
    cryptography==50.0.2 cffi==2.1.1 pycparser==3.12
    fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    GitPython==3.2.1 gitdb==4.0.12 smmap==5.0.3 importlib-metadata==9.1.0
    opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
    opentelemetry-semantic-conventions==0.66b2 python-dotenv==1.2.4 sqlparse==0.6.1
)
ANTLR=antlr4-python3-runtime==4.9.3
# Packages the image has, but perhaps older than a carried wheel needs (pydantic 2.14 imports
# typing_extensions.sentinel, new in 4.16): kept apart in .whl/if-older/, installed on the device
# by scripts/gpu_check.sh only where the image's copy is older than the wheel.
IF_OLDER=(typing-extensions==4.16.0)

# Packages the image already holds (KINDS.md, "Python packages already there"); a wheel of one of
# these would shadow the image's copy on PYTHONPATH, so none is carried.
IMAGE="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio
h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime
onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint
packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect
urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"

mkdir -p "$DEST"
echo "[gpu-wheels] downloading ${#PINS[@]} wheels for CPython $TARGET_PY manylinux x86_64 into $DEST/"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    "${PLATFORM_ARGS[@]}" -d "$DEST" "${PINS[@]}" 2>&1 | grep -v "is ignored: it is neither" || true

mkdir -p "$DEST/if-older"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    "${PLATFORM_ARGS[@]}" -d "$DEST/if-older" "${IF_OLDER[@]}" 2>&1 | grep -v "is ignored: it is neither" || true

if ! ls "$DEST"/antlr4_python3_runtime-4.9.3-*.whl >/dev/null 2>&1; then
    echo "[gpu-wheels] building $ANTLR (pure Python, published as an sdist only)"
    "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-binary=:all: -w "$DEST" "$ANTLR" 2>&1 \
        | grep -v "is ignored: it is neither" || true
fi

# Check: exactly the pinned set (one version each: two would stop the install), every
# requirement met, binaries for cp312 manylinux x86_64.
"$PY" - "$DEST" "$ANTLR" "$IMAGE" "${IF_OLDER[*]}" "${PINS[@]}" <<'EOF'
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

dest, antlr, image, if_older, pins = (Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(),
                                     sys.argv[4].split(), sys.argv[5:])
wanted = {canonicalize_name(p.split("==")[0]): p.split("==")[1] for p in pins + [antlr]}
image = {canonicalize_name(n) for n in image}
env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
       "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
       "os_name": "posix", "extra": ""}
manylinux = [f"manylinux_2_{n}_x86_64" for n in range(39, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
supported = set(cpython_tags((3, 12), abis=["cp312"], platforms=manylinux)) | set(
    compatible_tags((3, 12), "cp312", platforms=manylinux))
problems, have, on_image = [], {}, {}
for whl in sorted(dest.glob("*.whl")):
    name, version, _, tags = parse_wheel_filename(whl.name)
    if name in have:
        problems.append(f"two versions of {name}: {have[name][0]} and {version}")
    have[name] = (str(version), whl)
    if not set(tags) & supported:
        problems.append(f"{whl.name}: no tag of it installs on CPython 3.12 manylinux x86_64")
for name, version in wanted.items():
    if name not in have:
        problems.append(f"missing: {name}=={version}")
    elif have[name][0] != version:
        problems.append(f"{name}: have {have[name][0]}, pinned {version}")
for name in sorted(set(have) - set(wanted)):
    problems.append(f"not in the pinned set (remove it from {dest}/): {have[name][1].name}")

floor = {}  # image packages with a carried minimum: name -> version of the if-older wheel
for p in if_older:
    name, version = canonicalize_name(p.split("==")[0]), p.split("==")[1]
    found = [w for w in (dest / "if-older").glob("*.whl") if parse_wheel_filename(w.name)[0] == name]
    if [str(parse_wheel_filename(w.name)[1]) for w in found] != [version]:
        problems.append(f"{dest}/if-older/ must hold exactly {p}, has {[w.name for w in found]}")
    if name not in image:
        problems.append(f"{p} is not in the GPU image: pin it with the other wheels")
    floor[name] = version
for name, (version, whl) in sorted(have.items()):
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        reqs = Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []
    for line in reqs:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(env):
            continue  # an extra, or another Python / platform
        dep = canonicalize_name(req.name)
        if dep in have:
            if not req.specifier.contains(have[dep][0], prereleases=True):
                problems.append(f"{name} needs {req}, the set has {dep} {have[dep][0]}")
        elif dep not in image:
            problems.append(f"{name} needs {req}: neither in {dest}/ nor in the GPU image")
        elif dep in floor:
            if not req.specifier.contains(floor[dep], prereleases=True):
                problems.append(f"{name} needs {req}, {dest}/if-older/ has {dep} {floor[dep]}")
        elif req.specifier:
            on_image.setdefault(dep, []).append(f"{req.specifier} ({name})")
for name in sorted(set(have) & image):
    problems.append(f"{name} is in the GPU image already: carrying it would shadow the image's copy")

total = sum(w.stat().st_size for w in dest.glob("**/*.whl"))
print(f"[gpu-wheels] {len(have)} wheels + {len(floor)} in if-older/, {total / 2**20:.1f} MiB in {dest}/")
for whl in sorted(dest.glob("**/*.whl")):
    print(f"  {whl.stat().st_size / 2**20:6.2f} MiB  {whl.relative_to(dest)}")
if total > 60 * 2**20:
    problems.append(f"{total / 2**20:.1f} MiB is over the 60 MiB the device call can carry beside the repo")
if problems:
    print("[gpu-wheels] the set is not usable:", *problems, sep="\n  ", file=sys.stderr)
    sys.exit(1)
print("[gpu-wheels] every requirement is in the set or in the GPU image; versions the image must match "
      "(checked on the device by `python -m pipeline.report.gpu_summary probe`), beside the if-older floors "
      + ", ".join(f"{k}>={v}" for k, v in floor.items()) + ":")
for dep, needs in sorted(on_image.items()):
    print(f"  {dep}: " + ", ".join(sorted(set(needs))))
EOF

if (( VERIFY )); then
    # A scratch CPython 3.12 (the GPU image's minor version) with only the image's packages that
    # these wheels need, plus the wheels installed exactly as on the device.
    if [[ -z "${PY312:-}" ]]; then
        for cand in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
            if "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then PY312=$cand; break; fi
        done
    fi
    if [[ -z "${PY312:-}" ]]; then
        echo "[gpu-wheels] --verify needs a python3.12 (set PY312=/path/to/python3.12)" >&2
        exit 1
    fi
    SCRATCH=$(mktemp -d /tmp/attnbench-wheels.XXXXXX)
    trap 'rm -rf "$SCRATCH"' EXIT
    "$PY312" -m venv "$SCRATCH/venv"
    "$SCRATCH/venv/bin/pip" install -q --disable-pip-version-check \
        numpy pandas pyyaml requests click cloudpickle anyio packaging protobuf typing-extensions \
        markupsafe h11 zipp annotated-doc psutil 2>&1 | grep -v "is ignored: it is neither" || true
    "$SCRATCH/venv/bin/pip" install -q --disable-pip-version-check --no-index --no-deps --no-compile \
        --target "$SCRATCH/site" "$DEST"/*.whl "$DEST"/if-older/*.whl
    PYTHONPATH="$SCRATCH/site:$PWD" MLFLOW_DISABLE_TELEMETRY=true "$SCRATCH/venv/bin/python" - "$SCRATCH" <<'EOF'
# The project's own tracking and report-loading code on the carried wheels (no torch here).
import sys
from pathlib import Path

import hydra
import mlflow
import omegaconf
from hydra import compose, initialize_config_dir

from pipeline import record as R
from pipeline.config import to_dict, validate
from pipeline.report.load import load_runs
from pipeline.tracking import Tracker

site = str(Path(sys.argv[1]) / "site")
uri = f"sqlite:///{Path(sys.argv[1]) / 'verify.db'}"
tr = Tracker(uri, "verify")
run = tr.create_run("vanilla-n8-kernel", {R.STATUS: R.RUNNING, R.SWEEP_ID: "s", R.MODEL: "vanilla",
                                          R.SCENARIO: "kernel", R.CONFIG_HASH: "h"})
tr.log(run, params={R.SEQ_LEN: 8}, tags={R.STATUS: "ok"}, metrics={R.KERNEL_FWD_MS: 1.5},
       series={R.TRAIN_LOSS: [2.0, 1.0]})
tr.log_json(run, {"a": 1}, "config.json")
tr.end_run(run, "ok")
assert tr.find_reusable("h") is not None and tr.mark_orphans() == []
frame = load_runs("verify", "s", uri).frame
assert frame["metrics.kernel/fwd_ms"].tolist() == [1.5], frame
with initialize_config_dir(config_dir=str(Path.cwd() / "conf"), version_base="1.3"):
    cfg = compose(config_name="config", overrides=["grid=gpu_check"])
validate(to_dict(cfg))
carried = sorted({name.split(".")[0] for name, mod in list(sys.modules.items())
                  if (getattr(mod, "__file__", None) or "").startswith(site)})
print(f"[gpu-wheels] verified on Python {sys.version.split()[0]}: hydra {hydra.__version__}, "
      f"omegaconf {omegaconf.__version__}, mlflow {mlflow.__version__}: a SQLite store round trip "
      "through pipeline.tracking and pipeline.report.load.load_runs works, conf/ composes")
print("[gpu-wheels] carried packages that path imported: " + " ".join(carried))
EOF
fi
