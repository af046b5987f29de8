"""MLflow's tracking server as `make ui` runs it: MLflow's own app (`mlflow ui --app-name
attnbench`, an `mlflow.app` plugin) whose front page opens on its model-training side.

MLflow 3's UI keeps its "GenAI / Model training" switch in the browser's local storage
(`mlflow.workflowType_v1`) and, until a user touches the switch, shows the GenAI side: the front
page's experiment link then opens the GenAI overview ("Traces 0") instead of the runs. The page
this app serves sets the switch to model training when the browser has no choice stored yet; a
user's own choice is kept.
"""
from __future__ import annotations

import os

# the UI's local-storage key of the switch (its key plus `_v<version>`) and the stored JSON value
WORKFLOW_KEY, WORKFLOW_VALUE = "mlflow.workflowType_v1", '"machine_learning"'
_SCRIPT = ("<script>try{if(!localStorage.getItem('%s'))localStorage.setItem('%s','%s')}catch(e){}</script>"
           % (WORKFLOW_KEY, WORKFLOW_KEY, WORKFLOW_VALUE)).encode()


def open_on_runs(response):
    """Flask after-request hook: the UI's page (index.html) gets the switch's default."""
    if response.mimetype == "text/html":
        response.direct_passthrough = False  # a file's response: read it to change it
        body = response.get_data()
        if b"<head>" in body and WORKFLOW_KEY.encode() not in body:
            response.set_data(body.replace(b"<head>", b"<head>" + _SCRIPT, 1))
    return response


def create_app():
    """The app MLflow's server runs for `--app-name attnbench` (entry point group `mlflow.app`)."""
    from mlflow.server import app

    app.after_request(open_on_runs)
    if os.environ.get("_MLFLOW_SGI_NAME") == "uvicorn":  # MLflow's default server: its FastAPI app
        from mlflow.server.fastapi_app import create_fastapi_app

        return create_fastapi_app(app)
    return app
