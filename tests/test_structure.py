"""The house rules that keep the code legible: the import contracts (import-linter, in
pyproject.toml) are kept and do fail when broken, modules import without cycles and stay under
400 lines, every command answers `--help`, and one decision says whether the owner of a run or a
trial still lives."""

from __future__ import annotations

import ast
import shutil
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


ROOT = SRC.parent
MAX_LINES = 400


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter on the tree under `root`, with its contracts. Any other checkout on the path
    (the editable install's) is taken off it, so that the tree under `root` is what is read:
    `hydra_plugins` is a namespace package, and both copies would count."""
    code = (
        "import os, sys\n"
        "ours = lambda p: os.path.isdir(os.path.join(p, 'hydra_plugins', 'experiments_sweeper'))\n"
        f"sys.path[:] = [{str(root / 'src')!r}] + [p for p in sys.path if not ours(p)]\n"
        "from importlinter.cli import lint_imports\n"
        f"sys.exit(lint_imports(config_filename={str(root / 'pyproject.toml')!r}, "
        "no_cache=True, no_logo=True))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300
    )


def test_the_import_contracts_are_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Contracts: 4 kept, 0 broken." in result.stdout


def test_the_import_contracts_fail_on_forbidden_imports(tmp_path):
    """Each contract, broken on purpose in a scratch copy of the tree, fails lint-imports."""
    shutil.copytree(SRC, tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    broken = {
        "core/files.py": "from experiments.tracking import tags  # the ground floor looks up",
        "data/arrays.py": "import mlflow  # MLflow outside tracking",
        "model/heads.py": "from experiments.training import strategies  # against the flow",
    }
    for name, line in broken.items():
        path = tmp_path / "src" / "experiments" / name
        path.write_text(path.read_text() + "\n" + line + "\n")
    plugin = tmp_path / "src" / "hydra_plugins" / "experiments_sweeper" / "space.py"
    plugin.write_text(plugin.read_text() + "\nfrom experiments.core import files\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    out = " ".join(result.stdout.split())
    assert "Contracts: 0 kept, 4 broken." in out, out[-3000:]
    assert "experiments.core.files -> experiments.tracking" in out
    assert "experiments.data.arrays -> mlflow" in out
    assert "experiments.model.heads -> experiments.training" in out
    assert "hydra_plugins.experiments_sweeper.space -> experiments.core" in out


def test_no_module_is_over_400_lines():
    long = {
        name: n
        for name, path in modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines (split them by concern): {long}"


def test_no_mlflow_name_outside_tracking():
    """What import-linter cannot see: the name `mlflow` used without an import of it (a
    global handed in, `importlib.import_module("mlflow")`)."""
    offenders = []
    for name, path in modules().items():
        if name == "experiments.tracking" or name.startswith("experiments.tracking."):
            continue
        tree = ast.parse(path.read_text())
        names = [n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == "mlflow"]
        strings = [
            n.value
            for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value == "mlflow"
        ]
        if names or strings:
            offenders.append(name)
    assert not offenders, f"MLflow used outside experiments.tracking: {offenders}"


def test_every_command_and_console_script_answers_help():
    """`python -m experiments.<command> --help` for every command, and every console script
    names a `main` that exists."""
    from importlib.metadata import distribution

    scripts = [e for e in distribution("experiments").entry_points if e.group == "console_scripts"]
    assert len(scripts) == 10, [e.name for e in scripts]
    commands = []
    for script in scripts:
        assert callable(script.load()), script.name
        commands.append(script.module)
    running = {
        module: subprocess.Popen(
            [sys.executable, "-m", module, "--help"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for module in commands
    }
    for module, process in running.items():
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0, f"{module} --help: {out[-2000:]}"
        assert any(word in out.lower() for word in ("usage", "powered by hydra", "== settings")), (
            module,
            out[:500],
        )
        if module in ("experiments.predict", "experiments.evaluate"):  # their own settings only
            settings = out.split("== Settings ==")[1].split("== Config ==")[0]
            keys = [line.split("=")[0] for line in settings.strip().splitlines()]
            own = ["model", "input", "output"] if module.endswith("predict") else ["model", "split"]
            assert keys[: len(own)] == own, (module, keys)
            assert "hparams_search" not in out and "augmentation:" not in out, module


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
