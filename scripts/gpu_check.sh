#!/usr/bin/env bash
# `make gpu-check`: prove the CUDA side of attnbench in one short run on one GPU, inside a fixed
# time budget, and leave everything it found in $OUT (at most 8 files, none below $OUT/x/).
#
#   bash scripts/gpu_check.sh            # on the GPU machine, from the repo root, wheels in .whl/
#   bash scripts/gpu_check.sh --dry-run  # anywhere: the plan, and every cell composed and validated
#
# Steps, in order; each runs under `timeout`, a failing step is recorded and the next one runs,
# and all of them share one deadline (GPU_CHECK_DEADLINE_S, 440 s; collect always runs, <= 20 s more,
# and a step the deadline stops gets <= 15 s to exit: 475 s at worst, under 8 minutes),
# so a hang cannot eat the machine's lease and a single call returns everything:
#   install   the carried wheels (.whl/, made by scripts/gpu_wheels.sh) into $GPU_CHECK_SITE
#   gpu       nvidia-smi
#   probe     torch / CUDA / xformers versions and one bf16 xformers call (python -m pipeline.report.gpu_summary probe)
#   xformers  the head of `python -m xformers.info`
#   plan      the grid's cells, composed and validated
#   pytest    tests/gpu/test_gpu.py -m gpu
#   sweep     python -m pipeline.run -m grid=gpu_check into a fresh SQLite store, with its report
#   report    only if the sweep did not write one (e.g. it was cut short)
#   summary   one screen read from the store, with PASS/FAIL checks
#   collect   mlflow.db, mlartifacts.tar.gz, report.md, report.html, results.csv, summary.txt and
#             gpu_check.log into $OUT
# GPU_CHECK_WORK (/tmp/attnbench-gpu-check) is emptied first and holds the store and the sweep's
# folders; GPU_CHECK_SITE (/tmp/site) receives the wheels; PYTHON picks the interpreter (.venv's
# where there is one, else python3). The store stays in GPU_CHECK_WORK rather than $OUT because
# MLflow writes artifact files per run beside it and $OUT should hold at most 8 files: the
# artifacts are copied as one tarball (unpack it into $GPU_CHECK_WORK, where the store expects it).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
    --dry-run) DRY=1 ;;
    "") ;;
    *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

OUT=${OUT:-$PWD/.gpu_out}
WORK=${GPU_CHECK_WORK:-/tmp/attnbench-gpu-check}
SITE=${GPU_CHECK_SITE:-/tmp/site}
DEADLINE_S=${GPU_CHECK_DEADLINE_S:-440}
RESERVE_S=${GPU_CHECK_RESERVE_S:-90}  # kept after the sweep for report (40), summary (30) and collect (20)
GRID=${GPU_CHECK_GRID:-gpu_check}  # another grid only to try this script out elsewhere
EXPERIMENT=gpu_check
if [[ -z "${PYTHON:-}" ]]; then
    # the project's venv where there is one (a laptop), else the machine's python3 (the GPU image)
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
URI="sqlite:///$WORK/mlflow.db"
SWEEP_ARGS=(-m "grid=$GRID" "tracking.experiment=$EXPERIMENT" "hydra.sweep.dir=$WORK/sweep")
LOG=$OUT/gpu_check.log

# no network on the device: nothing may try to phone home or wait for a git binary
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true GIT_PYTHON_REFRESH=quiet PYTHONUNBUFFERED=1
export MLFLOW_TRACKING_URI=$URI

START=$SECONDS
RESULTS=()
FAILS=0

# step NAME CAP_S [--int] CMD...: run CMD under a timeout of min(CAP_S, what the deadline leaves),
# record ok / failed / timeout and the seconds it took. --int stops it with SIGINT first, so
# Python unwinds (the sweep records its interrupted cell and kills that cell's process group).
step() {
    local name=$1 cap=$2
    shift 2
    local sig=TERM
    if [[ "${1:-}" == "--int" ]]; then sig=INT; shift; fi
    local left=$((DEADLINE_S - (SECONDS - START)))
    [[ "$name" == sweep ]] && left=$((left - RESERVE_S))
    local t=$((cap < left ? cap : left))
    [[ "$name" == collect ]] && t=$cap  # cheap, and what makes the run worth anything: always run it
    if ((DRY)); then
        printf '  %-9s timeout %3ss  %s\n' "$name" "$cap" "$*"
        return 0
    fi
    if ((t < 5)); then
        RESULTS+=("$(printf '%-9s %-26s %4ss' "$name" "not run: deadline reached" 0)")
        FAILS=$((FAILS + 1))
        return 1
    fi
    echo
    echo "=== [$name] $(date +%H:%M:%S) timeout ${t}s: $*"
    local t0=$SECONDS rc status
    timeout -s "$sig" -k 15 "$t" "$@"
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="timeout after ${t}s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    ((rc == 0)) || FAILS=$((FAILS + 1))
    RESULTS+=("$(printf '%-9s %-26s %4ss' "$name" "$status" $((SECONDS - t0)))")
    return "$rc"
}

install_wheels() {
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "no wheels in .whl/: run \`make gpu-wheels\` (scripts/gpu_wheels.sh) and carry .whl"
        return 1
    fi
    # .whl/if-older/: packages of the image that a carried wheel needs at least this version of
    local w name version have
    for w in .whl/if-older/*.whl; do
        [[ -e "$w" ]] || continue
        name=$(basename "$w" | cut -d- -f1)
        version=$(basename "$w" | cut -d- -f2)
        have=$(env -u PYTHONPATH "$PYTHON" -c "from importlib.metadata import version; print(version('$name'))" 2>/dev/null || echo none)
        if [[ "$have" == none ]] || env -u PYTHONPATH "$PYTHON" -c \
            "import sys; from packaging.version import Version as V; sys.exit(0 if V('$have') < V('$version') else 1)"; then
            echo "the image has $name $have, older than $version: installing $(basename "$w") into $SITE"
            "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$SITE" "$w" || return 1
        else
            echo "the image has $name $have (>= $version): using it"
        fi
    done
    local probe="import hydra, omegaconf, mlflow.tracking, sqlalchemy, xformers"
    if PYTHONPATH=$SITE "$PYTHON" -c "$probe" 2>/dev/null; then
        echo "the carried wheels are installed in $SITE already"
    else
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" .whl/*.whl || return 1
        echo "installed $(ls .whl/*.whl | wc -l) wheels into $SITE"
        PYTHONPATH=$SITE "$PYTHON" -c "$probe" || return 1
    fi
}

sweep_id() {
    grep -ao 'sweep [0-9]\{8\}-[0-9]\{6\}-[0-9a-f]\{6\}: [0-9]* cells' "$LOG" 2>/dev/null | tail -1 | cut -d' ' -f2 | tr -d ':'
}

report_dir() {
    # the sweeper prints "[attnbench] report: <dir>/report.html  (markdown: ...)"
    grep -ao '\[attnbench\] report: [^ ]*report\.html' "$LOG" 2>/dev/null | tail -1 | sed 's/^\[attnbench\] report: //; s/\/report\.html$//'
}

report_fallback() {
    local id
    id=$(sweep_id)
    if [[ -z "$id" ]]; then echo "no sweep id in the log: the sweep never started"; return 1; fi
    "$PYTHON" -m pipeline.report --experiment "$EXPERIMENT" --sweep "$id" --out "$WORK/report"
}

summary() {
    local id args=()
    id=$(sweep_id)
    [[ -n "$id" ]] && args=(--sweep "$id")
    "$PYTHON" -m pipeline.report.gpu_summary summary --experiment "$EXPERIMENT" --uri "$URI" "${args[@]}" >"$WORK/summary.txt"
    local rc=$?
    cat "$WORK/summary.txt"
    return $rc
}

collect() {
    local dir n=0
    dir=$(report_dir)
    [[ -z "$dir" && -d "$WORK/report" ]] && dir=$WORK/report
    [[ -f "$WORK/mlflow.db" ]] && cp "$WORK/mlflow.db" "$OUT/" && n=$((n + 1))
    if [[ -d "$WORK/mlartifacts" ]]; then
        tar -czf "$OUT/mlartifacts.tar.gz" -C "$WORK" mlartifacts && n=$((n + 1))
    fi
    for f in report.md report.html results.csv; do
        [[ -n "$dir" && -f "$dir/$f" ]] && cp "$dir/$f" "$OUT/" && n=$((n + 1))
    done
    [[ -f "$WORK/summary.txt" ]] && cp "$WORK/summary.txt" "$OUT/" && n=$((n + 1))
    echo "copied $n files into $OUT (report from ${dir:-nowhere}); gpu_check.log is written there as it runs"
}

# the steps that are shell functions run in `bash -c` under timeout (timeout runs programs)
export -f install_wheels sweep_id report_dir report_fallback summary collect
export OUT WORK SITE PYTHON URI LOG EXPERIMENT

main() {
    echo "attnbench gpu-check $( ((DRY)) && echo '(dry run) ')$(date '+%Y-%m-%d %H:%M:%S') on $(hostname)"
    echo "python: $PYTHON; store: $URI; work: $WORK; out: $OUT; deadline ${DEADLINE_S}s"
    if ((DRY)); then
        if ls .whl/*.whl >/dev/null 2>&1; then
            echo "wheels: $(ls .whl/*.whl | wc -l) in .whl/ and $(ls .whl/if-older/*.whl 2>/dev/null | wc -l) in .whl/if-older/, $(du -shL .whl | cut -f1) in all"
        else
            echo "wheels: none in .whl/ yet: run \`make gpu-wheels\` before the device run, and carry .whl"
        fi
        echo "steps (each capped, all within the ${DEADLINE_S}s deadline; the sweep gets what is left less ${RESERVE_S}s):"
    else
        rm -rf "$WORK" && mkdir -p "$WORK"
        export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
    step install 90 bash -c install_wheels
    step gpu 20 nvidia-smi
    step probe 60 "$PYTHON" -m pipeline.report.gpu_summary probe --site "$SITE"
    step xformers 40 bash -c "\"$PYTHON\" -m xformers.info 2>&1 | head -n 45"
    step plan 45 "$PYTHON" -m pipeline.report.gpu_summary plan --grid "$GRID" "tracking.experiment=$EXPERIMENT"
    step pytest ${GPU_CHECK_PYTEST_S:-150} "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_gpu.py
    step sweep 330 --int "$PYTHON" -m pipeline.run "${SWEEP_ARGS[@]}"
    if ((DRY)) || [[ -z "$(report_dir)" ]]; then
        step report 40 bash -c report_fallback
    fi
    step summary 30 bash -c summary
    step collect 20 bash -c collect

    if ((DRY)); then
        echo
        echo "checking the plan now (no GPU needed):"
        "$PYTHON" -m pipeline.report.gpu_summary plan --grid "$GRID" "tracking.experiment=$EXPERIMENT"
        return $?
    fi
    echo
    echo "=== steps ($((SECONDS - START))s in all, deadline ${DEADLINE_S}s)"
    printf '  %s\n' "${RESULTS[@]}"
    if [[ -f "$WORK/summary.txt" ]]; then
        echo
        cat "$WORK/summary.txt"
    fi
    echo "gpu-check: $FAILS step(s) failed"
    ((FAILS == 0))
}

if ((DRY)); then
    main
    exit $?
fi
mkdir -p "$OUT"
main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
