"""Reading back what a run recorded."""

from __future__ import annotations

from pathlib import Path


def client_for(root: Path):
    """An MlflowClient on the default sqlite store under `root`."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{root}/mlruns/mlflow.db")
    return MlflowClient()


def runs_of(root: Path, experiment: str, filter_string: str = ""):
    """Every run of an experiment in the store under `root`, oldest first."""
    client = client_for(root)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} under {root}"
    runs = client.search_runs([found.experiment_id], filter_string=filter_string)
    return sorted(runs, key=lambda r: r.info.start_time)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with a sqlite store and served (proxied) artifacts in
    `root`; it can be killed and started again on the same port and store."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self, timeout: float = 120) -> MlflowServer:
        import subprocess
        import sys
        import time
        import urllib.request

        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--backend-store-uri",
                f"sqlite:///{self.root}/server.db",
                "--artifacts-destination",
                str(self.root / "server-artifacts"),
                "--workers",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return self
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError("mlflow server exited") from None
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not start within {timeout:.0f} s")

    def kill(self) -> None:
        """Kill the server and its workers at once, as a crash or a lost machine would."""
        import psutil

        if self.process is None:
            return
        for child in psutil.Process(self.process.pid).children(recursive=True):
            child.kill()
        self.process.kill()
        self.process.wait(timeout=30)
        self.process = None

    def stop(self) -> None:
        import psutil

        if self.process is None:
            return
        children = psutil.Process(self.process.pid).children(recursive=True)
        self.process.terminate()
        self.process.wait(timeout=30)
        for child in children:
            if child.is_running():
                child.kill()
        self.process = None


def env_without(tmp_path: Path, *packages: str) -> dict[str, str]:
    """The environment of a Python process in which `packages` look uninstalled: importing one,
    or asking importlib where it is, fails as for a package that is not there."""
    import os

    folder = tmp_path / "without"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class _Absent(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {packages!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _Absent())\n"
    )
    path = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}
