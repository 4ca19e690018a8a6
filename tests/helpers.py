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
    """A real `mlflow server` on 127.0.0.1 with served (proxied) artifacts in `root`, and a
    sqlite store there or the database `store`; it can be killed and started again on the same
    port and store. `make=True` starts it the way users do, with `make server`."""

    health = "/health"  # the path that answers once the server is up
    env: dict[str, str] | None = None

    def __init__(self, root: Path, store: str | None = None, make: bool = False):
        self.root = root
        self.store = store or f"sqlite:///{root}/server.db"
        self.make = make
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def command(self) -> list[str]:
        import sys

        artifacts = self.root / "server-artifacts"
        if self.make:
            makefile = Path(__file__).resolve().parents[1] / "Makefile"
            return [
                "make", "-s", "-f", str(makefile), "server", f"VENV={sys.prefix}",
                f"DB={self.store}", f"ARTIFACTS={artifacts}", f"PORT={self.port}", "WORKERS=2",
            ]  # fmt: skip
        return [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
            "--port", str(self.port), "--backend-store-uri", self.store,
            "--artifacts-destination", str(artifacts), "--workers", "1",
        ]  # fmt: skip

    def start(self, timeout: float = 120) -> MlflowServer:
        import subprocess
        import time
        import urllib.request

        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}{self.health}", timeout=2)
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


class ModelServer(MlflowServer):
    """`mlflow models serve` of `model_uri` on 127.0.0.1, as the README runs it: the project's
    environment (`--env-manager local`, its bin/ on PATH for uvicorn) and its tracking store."""

    health = "/ping"

    def __init__(self, model_uri: str, tracking_uri: str):
        import os
        import sys

        super().__init__(Path("."))
        self.model_uri = model_uri
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self.env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": path}

    def command(self) -> list[str]:
        import sys

        return [
            sys.executable, "-m", "mlflow", "models", "serve", "-m", self.model_uri,
            "--env-manager", "local", "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip

    def invoke(self, body: dict) -> tuple[int, dict]:
        """POST `body` as JSON to /invocations: the status and the decoded answer."""
        import json
        import urllib.error
        import urllib.request

        request = urllib.request.Request(
            f"{self.url}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as err:
            return err.code, json.load(err)


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


def env_noting_import(tmp_path: Path, package: str) -> tuple[dict[str, str], Path]:
    """The environment of a Python process that writes the stack that first imports `package`
    to a file, and that file's path (absent while nothing imported it)."""
    import os

    folder = tmp_path / "noting"
    folder.mkdir(exist_ok=True)
    noted = tmp_path / f"imported-{package}.txt"
    (folder / "sitecustomize.py").write_text(
        "import importlib.abc, sys, traceback\n"
        "class _Noting(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name == {package!r}:\n"
        "            sys.meta_path.remove(self)\n"
        f"            with open({str(noted)!r}, 'w') as out:\n"
        "                traceback.print_stack(file=out)\n"
        "sys.meta_path.insert(0, _Noting())\n"
    )
    path = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}, noted


class PostgresServer:
    """A real PostgreSQL server from Debian's packages (`initdb`, `pg_ctl`) in a temporary
    folder, on 127.0.0.1 and a free port, with trust authentication; `stop` removes it all.

    PostgreSQL refuses to run as root: as root, the server runs as the `postgres` user that
    Debian's package creates, in a folder outside pytest's root-only temporary tree.
    """

    def __init__(self):
        import tempfile

        self.bindir = self._bindir()
        self.root = Path(tempfile.mkdtemp(prefix="experiments-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._user = None

    @staticmethod
    def _bindir() -> Path:
        import shutil

        found = shutil.which("pg_ctl")
        if found:
            return Path(found).resolve().parent
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        if not versions:
            raise RuntimeError(
                "PostgreSQL's server programs (initdb, pg_ctl) are not installed: "
                "apt-get install postgresql (.ci/run does)"
            )
        return versions[-1].parent

    def _run(self, program: str, *args: str) -> None:
        import os
        import subprocess

        def as_user():
            if self._user is not None:
                os.setgid(self._user.pw_gid)
                os.setuid(self._user.pw_uid)

        result = subprocess.run(
            [str(self.bindir / program), *args],
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=as_user,
            cwd=self.root,
            env={**os.environ, "LC_ALL": "C.UTF-8"},
        )
        if result.returncode != 0:
            raise RuntimeError(f"{program} failed: {result.stdout[-1500:]}{result.stderr[-1500:]}")

    def start(self) -> PostgresServer:
        import os
        import pwd

        if os.geteuid() == 0:
            self._user = pwd.getpwnam("postgres")
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root} -c max_connections=200 -F"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "log"),
            "-w",
            "start",
        )
        return self

    def database(self, name: str) -> str:
        """A new, empty database; its URL."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        import shutil

        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def project_model_server(model_uri: str, tracking_uri: str) -> ModelServer:
    """`make serve MODEL=...` on 127.0.0.1 from a shell whose PATH lacks the virtualenv, as a
    new user runs it (`experiments.serve`): nothing activated."""
    import os
    import sys

    server = ModelServer(model_uri, tracking_uri)
    venv_bin = str(Path(sys.executable).parent)
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv_bin]
    server.env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": os.pathsep.join(path)}
    makefile = Path(__file__).resolve().parents[1] / "Makefile"
    server.command = lambda: [
        "make", "-s", "-f", str(makefile), "serve", f"VENV={sys.prefix}",
        f"MODEL={model_uri}", f"PORT={server.port}",
    ]  # fmt: skip
    return server


def in_mount_namespace(mounts: list[str], command: list[str]) -> list[str]:
    """`command` run in a mount namespace of its own after the shell lines `mounts`: the way to
    make a folder truly read-only or full for a test, even as root, whom file modes do not stop.
    Other processes see no change; the mounts end with the command."""
    import os

    unshare = ["unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    return [*unshare, "sh", "-c", " && ".join([*mounts, 'exec "$@"']), "sh", *command]


def read_only(path: Path) -> str:
    """The mount that makes `path` read-only (for `in_mount_namespace`)."""
    import shlex

    return f"mount --bind -o ro {shlex.quote(str(path))} {shlex.quote(str(path))}"


def full_disk(path: Path, kilobytes: int) -> str:
    """The mount that puts a file system of `kilobytes` on `path` (for `in_mount_namespace`)."""
    import shlex

    return f"mount -t tmpfs -o size={kilobytes}k tmpfs {shlex.quote(str(path))}"
