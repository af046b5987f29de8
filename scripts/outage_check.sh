#!/usr/bin/env bash
# The tracking store away, for real: a kernel sweep recording to a live `mlflow server`
# (scripts/mlflow_server.sh, SQLite behind it) whose server is killed while the sweep's Nth cell
# measures and started again OUTAGE_S seconds later, with MLflow's own client retries as they
# are; then a sweep with tracking=offline (no server at all) and `make replay` into the server.
# Prints what each step said and, from the store, every cell's count: each must be there once.
#
#   bash scripts/outage_check.sh [OUT_DIR]          # OUTAGE_S=420 KILL_AT=4 PORT=5090 by default
#
# With the defaults (16 cells of about 63 s, a 7-minute outage) it took 29 min on a 2-core Intel Xeon
# (2026-12-07; other tests ran beside it part of the time).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$(realpath -m "${1:-$repo/outputs/outage-check}")"
outage_s="${OUTAGE_S:-420}"
kill_at="${KILL_AT:-4}"
port="${PORT:-5090}"
py="$repo/.venv/bin/python"
grid=(model=vanilla,xformers,longformer,performer seq_len=1024,2048,4096,8192 "scenario.min_time_s=${MIN_TIME_S:-20}"
      hydra.sweeper.report=false)
rm -rf "$out" && mkdir -p "$out/server"
export ATTNBENCH_CACHE="$out/cache"
unset MLFLOW_TRACKING_URI

start_server() {
  # a session of its own (its id is the pid: setsid does not fork a process that leads no group),
  # so that killing the session stops the server and every worker it started
  (cd "$out/server" && PORT="$port" MLFLOW_BACKEND_STORE_URI="sqlite:///$out/server/server.db" \
     MLFLOW_ARTIFACTS_DESTINATION="$out/server/artifacts" MLFLOW_WORKERS=2 \
     exec setsid bash "$repo/scripts/mlflow_server.sh" >> "$out/server/server.log" 2>&1) &
  echo $! > "$out/server/pid"
  for _ in $(seq 240); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && return 0; sleep 0.5; done
  echo "outage_check: the server did not start: $out/server/server.log" >&2; exit 2
}
stop_server() {
  local sid; sid="$(cat "$out/server/pid")"
  pkill -TERM -s "$sid" 2>/dev/null || true; sleep 2; pkill -KILL -s "$sid" 2>/dev/null || true
  if curl -sf -m 3 "http://127.0.0.1:$port/health" >/dev/null; then
    echo "outage_check: the server still answers after it was stopped" >&2; exit 2
  fi
}
trap stop_server EXIT

start_server
export MLFLOW_TRACKING_URI="http://127.0.0.1:$port"
echo "== 1. a sweep whose server is down for ${outage_s} s from its cell ${kill_at} on ($(date -u +%T))"
"$py" -m pipeline.run -m "${grid[@]}" tracking=server hydra.sweep.dir="$out/mr-outage" > "$out/outage.log" 2>&1 &
sweep=$!
until grep -q "^\[$((kill_at - 1))/" "$out/outage.log" 2>/dev/null; do  # the cell before has finished
  kill -0 $sweep 2>/dev/null || break; sleep 1; done
sleep 5  # into the next cell's measurement
stop_server
echo "   server killed at $(date -u +%T)"
sleep "$outage_s"
start_server
echo "   server back at $(date -u +%T)"
rc=0; wait $sweep || rc=$?
echo "   sweep exit status $rc at $(date -u +%T)"
grep -E "not in the store|replayed|done:|waiting in" "$out/outage.log" | sed 's/^/   /'

echo "== 2. a sweep with no server at all (tracking=offline), then make replay ($(date -u +%T))"
rc=0; "$py" -m pipeline.run -m "${grid[@]}" scenario.min_time_s=1 tracking=offline \
  tracking.experiment=offline-check hydra.sweep.dir="$out/mr-offline" > "$out/offline.log" 2>&1 || rc=$?
echo "   offline sweep exit status $rc; records in its spool: $(ls "$out/mr-offline/spool" | wc -l)"
grep -E "done:|waiting in" "$out/offline.log" | sed 's/^/   /'
rc=0; "$py" -m pipeline.replay "$out/mr-offline" --no-report > "$out/replay.log" 2>&1 || rc=$?
echo "   replay exit status $rc"; tail -1 "$out/replay.log" | sed 's/^/   /'
rc=0; "$py" -m pipeline.replay "$out/mr-offline" --no-report > "$out/replay2.log" 2>&1 || rc=$?
echo "   replay again: exit status $rc: $(tail -1 "$out/replay2.log")"

echo "== 3. the store"
"$py" - <<'EOF'
from collections import Counter

from pipeline import record as R
from pipeline.tracking import Tracker

import os
uri = os.environ["MLFLOW_TRACKING_URI"]
for exp in ("attnbench", "offline-check"):
    runs = Tracker(uri, exp).search("", max_results=5000)
    cells = [r for r in runs if r.data.tags.get(R.ROLE) != R.ROLE_SWEEP]
    sweeps = [r for r in runs if r.data.tags.get(R.ROLE) == R.ROLE_SWEEP]
    twice = sum(1 for n in Counter(r.data.tags[R.CONFIG_HASH] for r in cells).values() if n > 1)
    print(f"   {exp}: {len(cells)} cell runs, {len(set(r.data.tags[R.CONFIG_HASH] for r in cells))} distinct cells, "
          f"measured twice: {twice}; status {dict(Counter(r.data.tags.get(R.STATUS) for r in cells))}; "
          f"run states {dict(Counter(r.info.status for r in runs))}; sweep run: "
          + "; ".join(f"{s.data.tags.get(R.STATUS)} ({s.data.tags.get(R.CELLS)})" for s in sweeps))
EOF
