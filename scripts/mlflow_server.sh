#!/usr/bin/env bash
# A shared MLflow tracking server: the one store that many writers (parallel sweeps, the tasks of a
# SLURM array) can record to at once. Prints the MLFLOW_TRACKING_URI every job must export.
#
#   scripts/mlflow_server.sh                       # 127.0.0.1:5000, SQLite file in the repository
#   MLFLOW_BACKEND_STORE_URI=postgresql://user:pass@db-host:5432/mlflow MLFLOW_HOST=0.0.0.0 \
#     scripts/mlflow_server.sh                     # a team server that cluster jobs can reach
#
# Environment (all optional):
#   PORT                          port to listen on (5000)
#   MLFLOW_HOST                   interface to bind (127.0.0.1: this machine only; 0.0.0.0 for a
#                                 cluster's jobs to reach it)
#   MLFLOW_SERVER_ALLOWED_HOSTS   Host headers the server accepts (with 0.0.0.0: this machine's
#                                 names on PORT plus localhost, unless set)
#   MLFLOW_BACKEND_STORE_URI      runs, params, metrics, tags: a PostgreSQL URI for a team
#                                 (postgresql://...; needs the driver: `make install-server`, i.e.
#                                 pip install -e '.[server]', or psycopg2), else <repo>/mlflow-server.db
#   MLFLOW_ARTIFACTS_DESTINATION  where the server keeps uploaded artifacts (<repo>/mlartifacts-server;
#                                 a directory, s3://... or gs://...); clients upload through the server
#   MLFLOW_WORKERS                server processes (4)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
port="${PORT:-5000}"
host="${MLFLOW_HOST:-127.0.0.1}"
backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///${repo}/mlflow-server.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-${repo}/mlartifacts-server}"
workers="${MLFLOW_WORKERS:-4}"
mlflow="${repo}/.venv/bin/mlflow"
[[ -x "$mlflow" ]] || mlflow="$(command -v mlflow || true)"
if [[ -z "$mlflow" ]]; then
  echo "mlflow_server.sh: error: no mlflow executable (run \`make install\` first)" >&2
  exit 2
fi
# A PostgreSQL store needs a driver in the server's Python. SQLAlchemy 2.1 reads postgresql:// as
# postgresql+psycopg:// (psycopg 3, the `server` extra); postgresql+psycopg2:// selects psycopg2.
# Either is accepted: a plain postgresql:// URI is pointed at whichever of the two is installed.
has() { "$(dirname "$mlflow")/python" -c "import $1" 2>/dev/null; }
nodriver() {
  echo "mlflow_server.sh: error: the PostgreSQL store ${1} needs the ${2} driver in $(dirname "$mlflow"): make install-server (pip install -e '.[server]')${3:-}" >&2
  exit 2
}
case "$backend" in
  postgresql+psycopg2://*) has psycopg2 || nodriver postgresql+psycopg2:// psycopg2 ", or pip install psycopg2-binary" ;;
  postgresql+psycopg://*) has psycopg || nodriver postgresql+psycopg:// "psycopg 3" ;;
  postgresql://*|postgres://*)
    if has psycopg; then
      backend="postgresql+psycopg://${backend#*://}"
    elif has psycopg2; then
      backend="postgresql+psycopg2://${backend#*://}"
    else
      nodriver postgresql:// "psycopg 3 (or psycopg2)"
    fi ;;
  postgresql+*) ;;  # another driver, named explicitly: the caller installed it
esac

# The URI jobs use: this machine's name when bound to every interface, the bound address otherwise.
case "$host" in
  0.0.0.0|::)
    advertised="$(hostname -f 2>/dev/null || hostname)"
    # MLflow refuses API requests whose Host header is not in its allowed list (localhost and
    # private IPs by default; /health is exempt, so a probe alone would not notice): allow the
    # names jobs will use unless the caller chose the list.
    names="${advertised}:${port},$(hostname):${port},localhost:*,127.0.0.1:*"
    export MLFLOW_SERVER_ALLOWED_HOSTS="${MLFLOW_SERVER_ALLOWED_HOSTS:-$names}"
    ;;
  *) advertised="$host" ;;
esac
# the store's password, if the URI carries one, stays out of the log
echo "MLflow server: backend store $(sed -E 's#(://[^:/@]+):[^@]*@#\1:***@#' <<< "$backend")"
echo "               artifacts     ${artifacts} (served through the server)"
echo "Record to it from every shell and job:"
echo "  export MLFLOW_TRACKING_URI=http://${advertised}:${port}"
echo "then run sweeps with tracking=server. Ctrl-C stops the server."

# The server's background job runner (huey consumers, for MLflow's GenAI features) is not used by
# attnbench and costs several processes: off unless the caller turned it on.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
# attnbench's app (pipeline/ui_app.py) where this Python has it: MLflow's own, with a UI that
# opens an experiment on its runs rather than on the GenAI overview
app=()
if "$(dirname "$mlflow")/python" -c "import sys; from importlib.metadata import entry_points; \
    sys.exit(not any(e.name == 'attnbench' for e in entry_points(group='mlflow.app')))" 2>/dev/null; then
  app=(--app-name attnbench)
fi
exec "$mlflow" server "${app[@]}" \
  --host "$host" --port "$port" --workers "$workers" \
  --backend-store-uri "$backend" \
  --serve-artifacts --artifacts-destination "$artifacts"
