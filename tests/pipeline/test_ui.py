"""The MLflow UI opens where a user wants it, checked in headless Chromium (Debian's `chromium`):
the address `make ui` prints for the latest sweep shows its cells as rows with attnbench's metric
columns, in the UI's model-training view (not the GenAI overview MLflow 3 opens by default); and
the front page's experiment link, followed as a newcomer would, opens the runs too."""
from __future__ import annotations

import html
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from pipeline import record as R
from pipeline.registry import REPO_ROOT
from tests.support import free_port, run_cli

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium package")]



def _chromium(*args: str) -> str:
    r = subprocess.run(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=2000,900",
                        "--virtual-time-budget=20000", *args], capture_output=True, text=True, timeout=120)
    return r.stdout


def test_make_ui_address_opens_the_sweep_runs_with_metric_columns(tmp_path):
    uri = f"sqlite:///{tmp_path / 'ui.db'}"
    r = run_cli(["-m", "model=vanilla,ssm", "seq_len=64", "scenario.min_time_s=0.05", "scenario.noise_max_s=0", "scenario.warmup_s=0",
                 "scenario.min_repeats=2", f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path / 'mr'}",
                 "hydra.sweeper.report=false"], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    port = free_port()
    # as `make ui` starts it: MLflow's app as the attnbench plugin serves it (pipeline/ui_app.py)
    ui = subprocess.Popen([str(REPO_ROOT / ".venv" / "bin" / "mlflow") if (REPO_ROOT / ".venv").exists() else "mlflow",
                           "ui", "--app-name", "attnbench", "--host", "127.0.0.1", "--port", str(port), "--backend-store-uri", uri],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        out = subprocess.run([sys.executable, "-m", "pipeline.ui", "--uri", uri, "--port", str(port)],
                             capture_output=True, text=True, timeout=120, cwd=REPO_ROOT).stdout
        runs_url = next(line.split()[2] for line in out.splitlines() if "its runs:" in line)
        dom = _chromium("--dump-dom", runs_url)
        assert "vanilla-n64-kernel" in dom and "ssm-n64-kernel" in dom, "the cells are not rows of the table"
        assert R.KERNEL_FWD_MS in dom, "no attnbench metric column"
        _chromium(f"--screenshot={tmp_path / 'runs.png'}", runs_url)
        assert (tmp_path / "runs.png").stat().st_size > 10_000

        # the front page, as a newcomer opens it: its link to the experiment leads to the runs
        home = _chromium("--dump-dom", f"http://127.0.0.1:{port}/")
        link = re.search(r'data-testid="experiment-list-item-link" href="([^"]+)">attnbench<', home)
        assert link, "the front page lists no attnbench experiment"
        page = _chromium("--dump-dom", f"http://127.0.0.1:{port}/{html.unescape(link.group(1))}")
        assert "sweep-custom-" in page, "the experiment link does not open the runs table"
        assert "No data available" not in page and ">Overview<" not in page, "the experiment link opens the GenAI overview"
    finally:
        subprocess.run(["pkill", "-g", str(ui.pid)], check=False)
        ui.wait(timeout=30)
