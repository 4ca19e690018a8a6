"""The house rules that keep the code legible: only `tracking` talks to MLflow, modules import
without cycles, and one decision says whether the owner of a run or a trial still lives."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def imported(path: Path) -> set[str]:
    """Every module name an `import` or `from ... import` in the file names, at any depth."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_only_tracking_talks_to_mlflow():
    offenders = []
    for name, path in modules().items():
        if name == "experiments.tracking" or name.startswith("experiments.tracking."):
            continue
        tree = ast.parse(path.read_text())
        uses = [n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == "mlflow"]
        mlflow_imports = [m for m in imported(path) if m.split(".")[0] == "mlflow"]
        if uses or mlflow_imports:
            offenders.append(f"{name}: {sorted(set(mlflow_imports)) or 'mlflow.*'}")
    assert not offenders, f"MLflow used outside experiments.tracking: {offenders}"


def test_modules_import_without_cycles():
    graph = {}
    names = modules()
    for name, path in names.items():
        # A package importing its own submodules (re-exports) is not an arrow back up.
        graph[name] = {
            m for m in imported(path) if m in names and m != name and not m.startswith(name + ".")
        }
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles}"


def test_an_owner_is_alive_until_its_process_ends():
    from experiments.core.processes import RUN_KEYS, TRIAL_KEYS, Owner, this_process

    me = this_process()
    assert me.alive()
    for keys in (RUN_KEYS, TRIAL_KEYS):
        assert Owner.from_dict(me.to_dict(keys), keys) == Owner(
            me.host, me.pid, round(me.started, 2)
        )
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        import psutil

        owner = Owner(me.host, child.pid, psutil.Process(child.pid).create_time())
        assert owner.alive()
        # The same pid with another start time is a later process, not the owner.
        assert not Owner(me.host, child.pid, owner.started - 100).alive()
    finally:
        child.kill()
        child.wait()
    assert not owner.alive()
    # Another host's process: only a heartbeat can tell, so it is not declared dead here.
    assert Owner(f"not-{me.host}", child.pid, owner.started).alive()
    assert Owner.from_dict({"host": me.host}, RUN_KEYS) is None


def test_mlflow_is_never_asked_for_its_default_store(tmp_path, monkeypatch):
    """MLflow's default store is an mlflow.db in the working directory: tracking refuses to
    use it, so nothing is written outside paths.* by a call made before the store is chosen."""
    import pytest

    from experiments.tracking import client as clients
    from experiments.tracking.client import client

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(clients, "_pointed", [])
    with pytest.raises(RuntimeError, match="no MLflow store chosen yet"):
        client()
    assert list(tmp_path.iterdir()) == []
