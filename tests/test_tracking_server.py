"""The tracking server as docs/cluster.md starts it: MLflow's basic-auth app on 127.0.0.1.

Nobody without credentials reads or writes; sar3d's jobs, given the credentials in
their environment, log runs, parameters, metrics and artifacts as with a local store.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
import requests

from sar3d.config import ConfigError, validate_config
from sar3d.tracking import init_tracking, tracked_run
from tinystudy import tiny_study

USER = "sar3d"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen[str], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(f"{url}/health", timeout=10).ok:
                return
        except requests.RequestException:  # not listening yet, or busy starting
            pass
        time.sleep(0.3)
    raise AssertionError(f"mlflow server not up within {timeout}s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`mlflow server --app-name basic-auth` on 127.0.0.1, admin credentials from the environment only."""
    root = tmp_path_factory.mktemp("tracking-server")
    password = secrets.token_urlsafe(18)
    env = {
        **os.environ,
        "MLFLOW_AUTH_ADMIN_USERNAME": USER,
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
    }
    port = _free_port()
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server", "--app-name", "basic-auth",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    log = root / "server.log"
    with log.open("w") as out:
        # cwd: the auth app keeps its users in ./basic_auth.db
        proc = subprocess.Popen(command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, proc, log)
        yield {"url": url, "password": password, "root": root}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def credentials(server: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server["password"])


def _config(server: dict[str, Any], tmp_path: Path, experiment: str) -> dict[str, Any]:
    config = tiny_study(tmp_path / "results")
    config["tracking"] = {"uri": server["url"], "experiment": experiment}
    return validate_config(config)


def test_server_listens_on_loopback_only(server: dict[str, Any]) -> None:
    port = int(server["url"].rsplit(":", 1)[1])
    listening = subprocess.run(["ss", "-Htln", f"sport = :{port}"], capture_output=True, text=True, check=True)
    addresses = {line.split()[3].rsplit(":", 1)[0] for line in listening.stdout.splitlines()}
    assert addresses == {"127.0.0.1"}, listening.stdout


def test_without_credentials_nothing_is_read_or_written(
    server: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = server["url"]
    api = f"{url}/api/2.0/mlflow"
    admin = (USER, server["password"])
    before = requests.get(f"{api}/experiments/search", params={"max_results": 1000}, auth=admin, timeout=30)
    assert before.status_code == 200
    refused = {
        "create experiment": requests.post(f"{api}/experiments/create", json={"name": "intruder"}, timeout=30),
        "wrong password": requests.post(
            f"{api}/experiments/create", json={"name": "intruder"}, auth=(USER, "not-" + server["password"]),
            timeout=30,
        ),
        "search experiments": requests.get(f"{api}/experiments/search", params={"max_results": 10}, timeout=30),
        "web UI": requests.get(url, timeout=30),
    }
    for what, response in refused.items():
        assert response.status_code == 401, f"{what}: {response.status_code} {response.text[:200]}"
    after = requests.get(f"{api}/experiments/search", params={"max_results": 1000}, auth=admin, timeout=30)
    assert after.json() == before.json(), "a refused request changed the store"

    # sar3d's own jobs without the credentials stop at once with MLflow's "not authenticated"
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    config = _config(server, Path(server["root"]) / "anon", "sar3d-anonymous")
    with pytest.raises(mlflow.exceptions.MlflowException, match="not authenticated"):
        init_tracking(config)


@pytest.mark.usefixtures("credentials")
def test_jobs_with_credentials_log_runs_metrics_and_artifacts(server: dict[str, Any], tmp_path: Path) -> None:
    config = _config(server, tmp_path, "sar3d-auth")
    info = init_tracking(config)
    table = tmp_path / "table.csv"
    table.write_text("fold,dice\n0,0.5\n")
    with tracked_run(config, "evaluate", {"task": "pancreas", "init": "sar", "fold": 0}) as run:
        run.metrics({"dice/tumour": 0.5}, step=0)
        run.artifact(table)

    client = mlflow.MlflowClient(tracking_uri=server["url"])
    (job,) = client.search_runs([info["experiment_id"]], filter_string="tags.stage = 'evaluate'")
    assert job.info.status == "FINISHED"
    assert job.data.tags["mlflow.parentRunId"] == info["parent_run_id"]
    assert job.data.metrics["dice/tumour"] == 0.5
    assert job.data.params["tracking.uri"] == server["url"]
    assert server["password"] not in " ".join(job.data.params.values())
    assert [a.path for a in client.list_artifacts(job.info.run_id)] == ["table.csv"]
    # proxied through the server (nodes need only HTTP), into its --artifacts-destination
    stored = list(Path(server["root"], "artifacts").rglob("table.csv"))
    assert [p.read_text() for p in stored] == [table.read_text()]


def test_credentials_in_the_tracking_uri_are_refused(tmp_path: Path) -> None:
    config = tiny_study(tmp_path / "results")
    config["tracking"]["uri"] = "http://sar3d:hunter2-but-longer@127.0.0.1:5000"
    with pytest.raises(ConfigError, match=r"tracking\.uri.*MLFLOW_TRACKING_USERNAME"):
        validate_config(config)
