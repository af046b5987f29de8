#!/usr/bin/env bash
# Cluster mode for real, on this one machine: a single-node SLURM (slurmctld, slurmd, slurmdbd on
# MariaDB, so that sacct works; munge for authentication) and an `mlflow server` on PostgreSQL, all
# installed with apt and started as plain processes (no systemd), then real `make submit` sweeps
# through them:
#   1. two sweeps of grid=ci submitted at once: every cell one ok run under its own parent;
#   2. a sweep with one array task cancelled (scancel) and one killed (SIGKILL) mid-run: both
#      recorded as their cell's error with the SLURM state and job id, the sweep finishes with its
#      counts and its report, nothing stays RUNNING; the rerun reruns exactly those two cells;
#   3. a sweep submitted without accounting (sacct answering as a cluster without slurmdbd does):
#      a cancelled task is still recorded, from squeue, and the submitter does not hang;
# then the real-SLURM tests of tests/pipeline/test_cluster.py.
#
#   scripts/ci_cluster.sh          # the whole check (CI; make cluster-check), under 8 min on 2 cores
#   scripts/ci_cluster.sh --up     # start the cluster and the server, print the exports, wait for
#                                  # Ctrl-C: try `make submit` by hand (docs/scaling_out.md)
#
# Needs root and apt-get (Debian 12 / Ubuntu: slurm 22.05, PostgreSQL 15, MariaDB); anywhere else
# it says so in one line and exits 0 without running anything. Everything it starts is recorded in
# $ATTNBENCH_CLUSTER_DIR/pids and stopped by PID on the way out, failed or not (a trap); a rerun
# first stops what an earlier, killed run left behind, then starts from a fresh directory.
# The system's own config (/etc/slurm, /etc/munge, the default database clusters) is not touched:
# every daemon runs on files under $ATTNBENCH_CLUSTER_DIR, on loopback ports. Two things are
# shared: munged listens on its default socket (a munged already there is used instead), and during
# the apt install a policy-rc.d keeps the packages from starting their services (removed after).
# The whole run stops itself after CLUSTER_DEADLINE_S (480) seconds, failing.
#
# Environment (all optional):
#   ATTNBENCH_CLUSTER_DIR   state, logs, configs, sweeps (/tmp/attnbench-cluster)
#   CLUSTER_CPUS            CPUs of the one node (2)
#   CLUSTER_PORT_BASE       first of the loopback ports used (16817): slurmctld, slurmd, slurmdbd,
#                           then MariaDB (+3), PostgreSQL (+4), the MLflow server (+5)
#   CLUSTER_SKIP_TESTS=1    leave out the pytest part
#   CLUSTER_DEADLINE_S      the budget of the whole check (480 s); --up waits without one
set -euo pipefail

say() { echo "[ci_cluster] $*"; }
die() { echo "[ci_cluster] error: $*" >&2; exit 1; }

mode=check
case "${1:-}" in
  "") ;;
  --up) mode=up ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) die "unknown argument '$1' (use --up or nothing)" ;;
esac

if [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "ci_cluster.sh: skipped: a real SLURM and PostgreSQL need root and apt-get (Debian/Ubuntu) here; nothing was run"
  exit 0
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
STATE="${ATTNBENCH_CLUSTER_DIR:-/tmp/attnbench-cluster}"
case "$STATE" in /|/tmp|/var|/root|"$HOME"|"$repo") die "ATTNBENCH_CLUSTER_DIR=$STATE would be wiped: choose a dedicated directory" ;; esac
CPUS="${CLUSTER_CPUS:-2}"
base="${CLUSTER_PORT_BASE:-16817}"
CTLD_PORT=$base; SLURMD_PORT=$((base + 1)); DBD_PORT=$((base + 2))
MYSQL_PORT=$((base + 3)); PG_PORT=$((base + 4)); MLFLOW_PORT=$((base + 5))
PY="$repo/.venv/bin/python"
t_start=$(date +%s)
elapsed() { echo $(( $(date +%s) - t_start ))s; }

# ----------------------------------------------------------------------------- processes by PID
# "pid start-time name" per line, in start order. A PID counts as ours only while the process
# under it has the start time recorded with it (field 22 of /proc/PID/stat), so a PID the system
# has given to another process since is never signalled.
starttime() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"   # the fields after the command name, from field 3 on
  # shellcheck disable=SC2086
  set -- $stat
  echo "${20}"
}

ours() { [[ "$(starttime "$1" 2>/dev/null)" == "$2" ]]; }

stop_pid() {  # stop_pid PID START NAME: TERM (its process group when it leads one), then KILL
  local pid=$1 start=$2 name=$3 target=$1
  ours "$pid" "$start" || return 0
  [[ "$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')" == "$pid" ]] && target="-$pid"
  kill -TERM -- "$target" 2>/dev/null || true
  for _ in $(seq 1 40); do
    ours "$pid" "$start" || return 0
    [[ "$(ps -o stat= -p "$pid" 2>/dev/null)" == Z* ]] && return 0
    sleep 0.25
  done
  echo "[ci_cluster] $name ($pid) ignored SIGTERM for 10 s: SIGKILL" >&2
  kill -KILL -- "$target" 2>/dev/null || true
}

slurm_up() { [[ -f "$STATE/etc/slurm.conf" ]] && SLURM_CONF="$STATE/etc/slurm.conf" timeout 10 squeue -h >/dev/null 2>&1; }

stop_all() {
  local pids=$1 pid name jobs
  [[ -f "$pids" ]] || return 0
  if slurm_up; then
    # jobs first: slurmstepd and the tasks outlive slurmd otherwise
    export SLURM_CONF="$STATE/etc/slurm.conf"
    jobs="$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')"
    if [[ -n "${jobs// }" ]]; then
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 1 90); do [[ -z "$(squeue -h 2>/dev/null)" ]] && break; sleep 0.5; done
    fi
    for pid in $(scontrol listpids 2>/dev/null | awk 'NR > 1 && $1 ~ /^[0-9]+$/ {print $1}'); do
      kill -KILL "$pid" 2>/dev/null || true
    done
  fi
  # reverse start order: the server before its database, slurm before munge
  tac "$pids" | while read -r pid start name; do stop_pid "$pid" "$start" "$name"; done
  rm -f "$pids"
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ $rc -ne 0 ]]; then
    echo "[ci_cluster] failed (exit $rc) after $(elapsed); the last lines of each log:" >&2
    for f in "$STATE"/log/*.log "$STATE"/log/*.out "$STATE"/munge/*.log "$STATE"/pg/*.log; do
      [[ -s "$f" ]] || continue
      echo "----- $f" >&2
      tail -n 15 "$f" >&2
    done
  fi
  stop_all "$STATE/pids"
  [[ -n "${made_policy:-}" ]] && rm -f /usr/sbin/policy-rc.d
  say "stopped everything it started ($(elapsed) in all)"
  exit "$rc"
}

started() { echo "$1 $(starttime "$1") $2" >> "$STATE/pids"; }  # started PID NAME

wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll until COMMAND succeeds (each try at most 10 s)
  local limit=$1 what=$2 deadline
  shift 2
  deadline=$((SECONDS + limit))
  until timeout 10 "$@" >/dev/null 2>&1; do
    [[ $SECONDS -lt $deadline ]] || die "$what not up after ${limit}s"
    sleep 0.25
  done
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# one run at a time: a second one would stop the daemons of the first
exec 9> "$STATE.lock"
flock -n 9 || die "another run of ci_cluster.sh holds $STATE.lock"
# a run that was killed outright left its processes and directory: stop those, start afresh
stop_all "$STATE/pids"
rm -rf "$STATE"
mkdir -p "$STATE"/{etc,log,slurm/ctld,slurm/d,munge,sweeps,bin}
chmod 755 "$STATE"
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
if [[ $mode == check ]]; then  # the budget: past it, this run fails and cleans up like any other
  deadline="${CLUSTER_DEADLINE_S:-480}"
  setsid bash -c "sleep $deadline; echo '[ci_cluster] error: over the ${deadline}s budget' >&2; kill -TERM $$" &
  started $! "the budget"
fi
for p in $CTLD_PORT $SLURMD_PORT $DBD_PORT $MYSQL_PORT $PG_PORT $MLFLOW_PORT; do
  port_free "$p" || die "port $p on 127.0.0.1 is taken (set CLUSTER_PORT_BASE to a free range)"
done

# ----------------------------------------------------------------------------- install
pkgs=(slurmctld slurmd slurmdbd slurm-client munge mariadb-server postgresql)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  say "apt-get install ${missing[*]}"
  # no service may start on its own during the install: this script starts what it needs
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
  fi
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" \
        > "$STATE/log/apt.log" 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update -q > "$STATE/log/apt-update.log" 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" \
      > "$STATE/log/apt.log" 2>&1 || die "apt-get install failed: $STATE/log/apt.log"
  fi
  [[ -n "${made_policy:-}" ]] && rm -f /usr/sbin/policy-rc.d && made_policy=
fi
PGBIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
[[ -x "$PGBIN/pg_ctl" ]] || die "no PostgreSQL server under /usr/lib/postgresql"
[[ -x "$PY" ]] || make install
# the server's PostgreSQL driver: the `server` extra
"$PY" -c "import psycopg" 2>/dev/null || make install-server > "$STATE/log/install-server.log" 2>&1 || die "make install-server failed: $STATE/log/install-server.log"
say "packages and the server's driver in place ($(elapsed))"

# ----------------------------------------------------------------------------- munge
# SLURM's clients reach munged on its default socket only (sacctmgr and sbatch ignore AuthInfo for
# slurmdbd connections), so munged listens there: a munged already answering on it is used as it
# is, otherwise one is started here with a key of its own.
MUNGE_SOCKET=/run/munge/munge.socket.2
if munge -S "$MUNGE_SOCKET" -n 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; then
  say "using the munged already running on $MUNGE_SOCKET"
else
  chown munge:munge "$STATE/munge"
  chmod 700 "$STATE/munge"
  mkdir -p /run/munge
  chown munge:munge /run/munge
  chmod 755 /run/munge   # munged wants its socket's directory searchable by everyone
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
  setpriv --reuid=munge --regid=munge --init-groups mungekey --create --keyfile="$STATE/munge/munge.key"
  setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground \
    --key-file="$STATE/munge/munge.key" --socket="$MUNGE_SOCKET" \
    --pid-file="$STATE/munge/munged.pid" --seed-file="$STATE/munge/munged.seed" \
    --log-file="$STATE/munge/munged.log" > "$STATE/log/munged.out" 2>&1 &
  started $! munged
  wait_for 20 munged bash -c "munge -n | unmunge"
fi

# ----------------------------------------------------------------------------- MariaDB for slurmdbd
mkdir -p "$STATE/mysql"
chown mysql:mysql "$STATE/mysql"
mariadb-install-db --no-defaults --user=mysql --datadir="$STATE/mysql/data" --skip-test-db \
  --auth-root-authentication-method=socket > "$STATE/log/mysql-install.log" 2>&1
/usr/sbin/mysqld --no-defaults --user=mysql --datadir="$STATE/mysql/data" \
  --socket="$STATE/mysql/mysqld.sock" --pid-file="$STATE/mysql/mysqld.pid" \
  --port="$MYSQL_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
  --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 \
  --log-error="$STATE/log/mysqld.log" > "$STATE/log/mysqld.out" 2>&1 &
started $! mysqld
wait_for 60 mysqld mariadb --no-defaults -S "$STATE/mysql/mysqld.sock" -u root -e "SELECT 1"
dbpass="slurm-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
mariadb --no-defaults -S "$STATE/mysql/mysqld.sock" -u root -e "
  CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$dbpass';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

# ----------------------------------------------------------------------------- SLURM
export SLURM_CONF="$STATE/etc/slurm.conf"
mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
cat > "$SLURM_CONF" <<EOF
# single-node cluster of scripts/ci_cluster.sh
ClusterName=attnbench
SlurmctldHost=localhost
SlurmUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/slurm/ctld
SlurmdSpoolDir=$STATE/slurm/d
SlurmctldPidFile=$STATE/slurm/slurmctld.pid
SlurmdPidFile=$STATE/slurm/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
# the defaults of a real site: a cancelled task gets SIGTERM, then SIGKILL KillWait seconds later
KillWait=30
MinJobAge=300
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN
PartitionName=cpu Nodes=localhost Default=YES MaxTime=60 State=UP
EOF
install -m 600 /dev/null "$STATE/etc/slurmdbd.conf"
cat > "$STATE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=$dbpass
StorageLoc=slurm_acct_db
PidFile=$STATE/slurm/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
EOF
chmod 600 "$STATE/etc/slurmdbd.conf"   # slurmdbd refuses a config others can read
/usr/sbin/slurmdbd -D > "$STATE/log/slurmdbd.out" 2>&1 &
started $! slurmdbd
wait_for 60 slurmdbd sacctmgr -n list cluster
sacctmgr -i -Q add cluster attnbench > /dev/null 2>&1 || true
/usr/sbin/slurmctld -D -i -f "$SLURM_CONF" > "$STATE/log/slurmctld.out" 2>&1 &
started $! slurmctld
wait_for 60 slurmctld scontrol ping
/usr/sbin/slurmd -D -N localhost -f "$SLURM_CONF" > "$STATE/log/slurmd.out" 2>&1 &
started $! slurmd
wait_for 60 "the node" bash -c "sinfo -h -N -o %T | grep -qx idle"
say "SLURM up: 1 node, $CPUS CPUs, accounting through slurmdbd ($(elapsed))"

# ----------------------------------------------------------------------------- PostgreSQL + MLflow
mkdir -p "$STATE/pg"
chown postgres:postgres "$STATE/pg"
pgpass="mlflow-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
as_pg() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }
as_pg "$PGBIN/initdb" -D "$STATE/pg/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
  > "$STATE/log/initdb.log" 2>&1
as_pg "$PGBIN/pg_ctl" -D "$STATE/pg/data" -l "$STATE/pg/postgres.log" -w -t 60 \
  -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $STATE/pg" start > /dev/null
started "$(head -n 1 "$STATE/pg/data/postmaster.pid")" postgres
psql_() { as_pg psql -q -h "$STATE/pg" -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1 "$@"; }
psql_ -c "CREATE USER mlflow WITH PASSWORD '$pgpass';"
psql_ -c "CREATE DATABASE mlflow OWNER mlflow;"

# the documented server command: make server on PostgreSQL
export MLFLOW_BACKEND_STORE_URI="postgresql://mlflow:$pgpass@127.0.0.1:$PG_PORT/mlflow"
export MLFLOW_ARTIFACTS_DESTINATION="$STATE/artifacts"
t_server=$(date +%s)
MLFLOW_WORKERS=2 PORT=$MLFLOW_PORT setsid make server > "$STATE/log/mlflow-server.log" 2>&1 &
started $! "make server"
export MLFLOW_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT"
wait_for 240 "the MLflow server" "$PY" -c "import urllib.request as u; u.urlopen('$MLFLOW_TRACKING_URI/health', timeout=3)"
say "MLflow server on PostgreSQL up in $(( $(date +%s) - t_server ))s: $MLFLOW_TRACKING_URI ($(elapsed))"
unset MLFLOW_BACKEND_STORE_URI MLFLOW_ARTIFACTS_DESTINATION

if [[ $mode == up ]]; then
  cat <<EOF

The cluster and the server are up. In another shell, from $repo:

  export SLURM_CONF=$SLURM_CONF
  export MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI
  sinfo; make submit GRID=ci LAUNCHER=slurm_cpu; squeue; sacct

Ctrl-C here stops all of it.
EOF
  # a waited-for child, so that SIGTERM and Ctrl-C reach the trap at once
  tail -f /dev/null &
  started $! "the wait"
  wait $! || true
  exit 0
fi

# ----------------------------------------------------------------------------- checks
# What each sweep left in MLflow, read back through the server (pipeline/record.py's names).
cat > "$STATE/check.py" <<'PYEOF'
"""ci_cluster.sh's reading of the tracking server: what a sweep recorded, against what it must."""
import json
import sys
import time
from pathlib import Path

from pipeline import record as R
from pipeline.sweep import SWEEP_FILE
from pipeline.tracking import Tracker, tracking_uri

tr = Tracker(tracking_uri(None), "cluster-check")


def fail(msg):
    print(f"[ci_cluster] CHECK FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def sweep_of(sweep_dir):
    f = Path(sweep_dir) / SWEEP_FILE
    return json.loads(f.read_text())["sweep_id"] if f.exists() else None


def runs_of(sweep_id):
    runs = tr.search(f"tags.{R.SWEEP_ID} = '{sweep_id}'")
    parents = [r for r in runs if r.data.tags.get(R.ROLE) == R.ROLE_SWEEP]
    if len(parents) != 1:
        fail(f"sweep {sweep_id}: {len(parents)} parent runs")
    children = [r for r in runs if r.data.tags.get(R.ROLE) != R.ROLE_SWEEP]
    for c in children:
        if c.data.tags.get("mlflow.parentRunId") != parents[0].info.run_id:
            fail(f"run {c.info.run_name} is not under its sweep's parent")
    hashes = [c.data.tags[R.CONFIG_HASH] for c in children]
    if len(hashes) != len(set(hashes)):
        fail(f"sweep {sweep_id}: a cell recorded twice")
    return parents[0], children


def show(sweep_dir, label):
    parent, children = runs_of(sweep_of(sweep_dir))
    print(f"[ci_cluster] {label}: parent {parent.info.status} ({parent.data.tags.get(R.CELLS)}; "
          f"{parent.data.tags.get(R.REUSED, '0')} reused; report {'written' if R.REPORT_DIR in parent.data.tags else 'missing'})")
    for c in sorted(children, key=lambda c: c.data.tags.get(R.SLURM_JOB_ID, "")):
        t = c.data.tags
        reason = t.get(R.FAILURE_REASON, "")
        print(f"[ci_cluster]   {t.get(R.SLURM_JOB_ID, '-'):>8}  {c.info.run_name:<22} {t[R.STATUS]:<8} {reason}")
    return parent, children


def no_running():
    left = tr.search("attributes.status = 'RUNNING'")
    if left:
        fail(f"runs left RUNNING: {[r.info.run_name for r in left]}")


def all_ok(sweep_dir, n, label):
    parent, children = show(sweep_dir, label)
    if parent.info.status != "FINISHED" or parent.data.tags.get(R.STATUS) != "ok":
        fail(f"{label}: the parent run is {parent.info.status}")
    bad = [c.info.run_name for c in children if c.data.tags[R.STATUS] != "ok" or c.info.status != "FINISHED"]
    if len(children) != int(n) or bad:
        fail(f"{label}: {len(children)} cell runs (want {n}), not ok: {bad}")


def running(sweep_dir, n, timeout_s="300"):
    """Wait for n RUNNING cell runs of the sweep with their SLURM job; print 'job pid' per line."""
    deadline = time.monotonic() + float(timeout_s)
    while True:
        sid = sweep_of(sweep_dir)
        got = []
        if sid:
            got = [r for r in tr.search(f"tags.{R.SWEEP_ID} = '{sid}' and attributes.status = 'RUNNING'")
                   if R.SLURM_JOB_ID in r.data.tags and r.data.tags.get(R.ROLE) != R.ROLE_SWEEP]
        if len(got) >= int(n):
            for r in sorted(got, key=lambda r: r.data.tags[R.SLURM_JOB_ID])[: int(n)]:
                print(r.data.tags[R.SLURM_JOB_ID], r.data.tags[R.PID])
            return
        if time.monotonic() > deadline:
            fail(f"{n} cells of {sweep_dir} not RUNNING after {timeout_s} s")
        time.sleep(0.5)


def faults(sweep_dir, cancelled, killed, cancel_time, label):
    parent, children = show(sweep_dir, label)
    if parent.info.status != "FINISHED" or parent.data.tags.get(R.STATUS) != "ok" or R.REPORT_DIR not in parent.data.tags:
        fail(f"{label}: the parent did not finish with its counts and report: {parent.data.tags}")
    by_job = {c.data.tags.get(R.SLURM_JOB_ID): c for c in children}
    for job, state in ((cancelled, "CANCELLED"), (killed, None)):
        if not job:
            continue
        c = by_job.get(job)
        if c is None:
            fail(f"{label}: no run for SLURM job {job}")
        reason = c.data.tags.get(R.FAILURE_REASON, "")
        if c.data.tags[R.STATUS] != "error" or f"SLURM job {job}" not in reason or (state and state not in reason):
            fail(f"{label}: job {job} recorded as {c.data.tags[R.STATUS]}: {reason}")
    if cancelled:
        stopped = by_job[cancelled].info.end_time / 1000 - float(cancel_time)
        print(f"[ci_cluster]   the cancelled cell was recorded {stopped:.1f} s after scancel (KillWait is 30 s)")
        if stopped > 20:
            fail(f"{label}: the cancelled cell ran on for {stopped:.0f} s after scancel")
    others = [c for j, c in by_job.items() if j not in (cancelled, killed)]
    if any(c.data.tags[R.STATUS] != "ok" for c in others):
        fail(f"{label}: cells other than the cancelled and killed ones are not ok")
    no_running()


def rerun(sweep_dir, before_dir, label):
    _, before = runs_of(sweep_of(before_dir))
    parent, children = show(sweep_dir, label)
    failed = {c.data.tags[R.CONFIG_HASH] for c in before if c.data.tags[R.STATUS] != "ok"}
    ran = {c.data.tags[R.CONFIG_HASH] for c in children}
    reused = sum(k.startswith(R.REUSED_PREFIX) for k in parent.data.tags)
    if ran != failed or any(c.data.tags[R.STATUS] != "ok" for c in children):
        fail(f"{label}: reran {len(ran)} cells, {len(failed)} had not finished ok; not all ok now")
    if reused != len(before) - len(failed):
        fail(f"{label}: {reused} cells reused, want {len(before) - len(failed)}")
    no_running()


globals()[sys.argv[1]](*sys.argv[2:])
PYEOF
check() { "$PY" "$STATE/check.py" "$@"; }

# The check's cells measure nothing anyone reads: they take the device lock among themselves
# (one measuring at a time, as on any host) but do not queue behind a benchmark running here.
export ATTNBENCH_CACHE="$STATE/cache"
# every submission: slurm_cpu with one core and 1 GB per cell (2 cells at once on the 2-CPU node),
# into the experiment cluster-check, whose reports (reports/cluster-check/) are removed on success
REPORTS="$repo/reports/cluster-check"
rm -rf "$REPORTS"
submit() {  # submit NAME GRID ARGS...: `make submit` in the background (its PID in $submit_pid)
  local name=$1 grid=$2
  shift 2
  PATH="${SUBMIT_PATH:-$PATH}" setsid make submit GRID="$grid" LAUNCHER=slurm_cpu \
    ARGS="hydra.sweep.dir=$STATE/sweeps/$name tracking.experiment=cluster-check hydra.launcher.cpus_per_task=1 hydra.launcher.mem_gb=1 hydra.launcher.poll_s=2 $*" \
    > "$STATE/log/submit-$name.log" 2>&1 &
  submit_pid=$!
  started "$submit_pid" "make submit $name"
}
finish() {  # finish NAME PID: wait for a submission; its output's tail when it failed
  if ! wait "$2"; then
    tail -n 30 "$STATE/log/submit-$1.log" >&2
    die "make submit ($1) failed"
  fi
}

# 1. two sweeps of grid=ci at once, into the one server
t=$(date +%s)
submit ci0 ci seed=0; p0=$submit_pid
submit ci1 ci seed=1; p1=$submit_pid
finish ci0 "$p0"; finish ci1 "$p1"
check all_ok "$STATE/sweeps/ci0" 4 "grid=ci, seed 0"
check all_ok "$STATE/sweeps/ci1" 4 "grid=ci, seed 1"
say "two sweeps of grid=ci at once: 8 cells, each one ok run under its parent ($(( $(date +%s) - t ))s)"

# 2. one array task cancelled and one killed while their cells run, then the rerun
FAULT_ARGS="model=vanilla seq_len=64,96,128 scenario.min_time_s=6 scenario.fwdbwd=false"
t=$(date +%s)
submit faults "" $FAULT_ARGS; pf=$submit_pid
first="$(check running "$STATE/sweeps/faults" 2)" || die "the cells of the fault sweep did not start"
read -r job_a pid_a job_b pid_b <<< "${first//$'\n'/ }"
# cancel the one measuring, kill the one waiting for the device lock (its log says so)
waiting() { grep -qs "waiting for another cell" "$STATE/sweeps/faults/.submitit/$1/$1_0_log.out"; }
sleep 2
if waiting "$job_a" && ! waiting "$job_b"; then
  read -r job_a pid_a job_b pid_b <<< "$job_b $pid_b $job_a $pid_a"
fi
cancel_time=$(date +%s.%N)
scancel "$job_a"
kill -KILL "$pid_b"
say "scancel $job_a; kill -9 of the task of job $job_b (pid $pid_b), both while their cells run"
finish faults "$pf"
check faults "$STATE/sweeps/faults" "$job_a" "$job_b" "$cancel_time" "cancelled and killed"
submit faults-rerun "" $FAULT_ARGS; pr=$submit_pid
finish faults-rerun "$pr"
check rerun "$STATE/sweeps/faults-rerun" "$STATE/sweeps/faults" "the rerun"
say "a cancelled and a killed task recorded as their cells' errors; the rerun ran exactly those two ($(( $(date +%s) - t ))s)"

# 3. no accounting: sacct answering as a cluster without slurmdbd does, for the submitter only
mkdir -p "$STATE/no-sacct"
printf '#!/bin/sh\necho "sacct: error: Slurm accounting storage is disabled" >&2\nexit 1\n' > "$STATE/no-sacct/sacct"
chmod 755 "$STATE/no-sacct/sacct"
t=$(date +%s)
SUBMIT_PATH="$STATE/no-sacct:$PATH" submit no-sacct "" model=vanilla seq_len=80,112 scenario.min_time_s=6 scenario.fwdbwd=false
pn=$submit_pid
first="$(check running "$STATE/sweeps/no-sacct" 1)" || die "the cells of the sweep without accounting did not start"
read -r job_n _ <<< "$first"
cancel_time=$(date +%s.%N)
scancel "$job_n"
finish no-sacct "$pn"
grep -q "job states from squeue" "$STATE/log/submit-no-sacct.log" || die "the submitter did not say it fell back to squeue"
check faults "$STATE/sweeps/no-sacct" "$job_n" "" "$cancel_time" "without accounting"
say "without accounting: the cancelled task recorded from squeue's word, the submitter returned ($(( $(date +%s) - t ))s)"

# 4. the real-SLURM tests
if [[ -z "${CLUSTER_SKIP_TESTS:-}" ]]; then
  t=$(date +%s)
  "$repo/.venv/bin/pytest" -q -m slow -p no:cacheprovider tests/pipeline/test_cluster.py -k real_slurm \
    > "$STATE/log/pytest.log" 2>&1 || { tail -n 40 "$STATE/log/pytest.log" >&2; die "the real-SLURM tests failed"; }
  say "real-SLURM tests: $(tail -n 1 "$STATE/log/pytest.log") ($(( $(date +%s) - t ))s)"
fi
rm -rf "$REPORTS"
say "all checks passed in $(elapsed)"
