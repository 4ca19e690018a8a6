"""The README and the documentation site stay true: the README fits on a few screens, the site
builds strictly (no broken link, no page left out), and every command on the getting-started
page works: run as it is when it finishes in seconds, else its `--help` (and for a single
training run, its config composed with `--cfg job`)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GETTING_STARTED = ROOT / "docs" / "getting-started.md"
# Commands of the page that finish in seconds: run as a new user would type them.
RUN_AS_IS = {"make help", "python -m experiments.runs"}


def bash_commands(page: Path) -> list[str]:
    """The commands of a page's fenced bash blocks: continuations joined, comments dropped,
    `a && b` as two commands."""
    blocks = re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands += [part.strip() for part in line.split("&&")]
    return commands


def test_the_readme_fits_on_a_few_screens():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/"
    top = "\n".join(lines[:20])  # the two commands come first
    assert "make install && make train" in top and "make install && make test" in top


def test_the_site_builds_strictly(tmp_path):
    result = subprocess.run(
        [str(BIN / "mkdocs"), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    pages = {p.stem for p in (ROOT / "docs").glob("*.md")}
    assert {"getting-started", "architecture", "faults", "speed"} <= pages
    for page in pages:
        built = "index.html" if page == "index" else f"{page}/index.html"
        assert (tmp_path / "site" / built).is_file(), page


def check(command: str) -> list[str]:
    """What the test runs for one command of the page."""
    words = shlex.split(command)
    if command in RUN_AS_IS:
        return words
    if words[0] == "make":  # the target exists and its recipe expands
        return ["make", "-n", *words[1:]]
    assert words[:2] == ["python", "-m"], f"no check for {command!r}; add one"
    if words[2] == "experiments.train" and "-m" not in words[3:]:
        return [*words, "--cfg", "job"]
    return words[:3] + ["--help"]


@pytest.mark.parametrize("command", bash_commands(GETTING_STARTED))
def test_every_getting_started_command_works(command, tmp_path):
    argv = check(command)
    if argv[0] == "python":
        argv[0] = sys.executable
    env = {**os.environ, "EXPERIMENTS_ROOT": str(tmp_path), "PATH": f"{BIN}:{os.environ['PATH']}"}
    result = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"{argv}: {result.stdout[-1500:]}{result.stderr[-1500:]}"
    out = result.stdout
    if "--cfg" in argv:  # the overrides of the command are in the composed config
        for override in (w for w in argv[3:-2] if "=" in w):
            key, value = override.split("=", 1)
            assert f"{key.rsplit('.', 1)[-1]}: {value}" in out or f"name: {value}" in out, override
    if command == "make help":
        assert "docs-build" in out and "train" in out
    if command == "python -m experiments.runs":
        assert "no unfinished runs" in out.lower() or "unfinished" in out.lower(), out
