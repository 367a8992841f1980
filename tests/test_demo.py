"""The README's demo job (configs/demo.yaml): Gemma 3 270M from the `[demo]` extra's package,
through `model.path: package:NAME`, writes real text. Also how package paths fail."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import read_output

from upg_batch.cli import main
from upg_batch.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"


def test_the_demo_job_writes_real_completions(tmp_path: Path, local_ray) -> None:
    out = tmp_path / "demo-out"
    assert main(["run", str(DEMO), "--set", f"output.path={out}"]) == 0
    rows = {r["id"]: r for r in read_output(out).to_pylist()}
    assert len(rows) == 20 and all(r["error"] is None for r in rows.values())
    assert all(r["completion"].strip() for r in rows.values())
    # A real model answers: facts a 270M base model gets right greedily, and the few-shot
    # sentiment labels of the six reviews (alternating in scripts/make_demo.py).
    assert "honey" in rows["demo-000"]["completion"].lower()
    assert "100" in rows["demo-006"]["completion"]
    labels = [rows[f"demo-{i:03d}"]["completion"].strip() for i in range(8, 14)]
    assert labels == ["positive", "negative"] * 3
    assert {r["task"] for r in rows.values()} == {"qa", "label", "write"}


def _job(tmp_path: Path, model_path: str) -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(f"model: {{path: '{model_path}'}}\ninput: {{path: d.parquet}}\noutput: {{path: out}}\n")
    return job


def test_a_package_path_resolves_to_the_file_its_package_assembles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "cache" / "m.gguf"
    model.parent.mkdir()
    model.write_bytes(b"GGUF")
    pkg = tmp_path / "pkgs" / "some_model_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"def assemble():\n    return {str(model)!r}\n")
    (tmp_path / "pkgs" / "no_assemble_pkg").mkdir()
    (tmp_path / "pkgs" / "no_assemble_pkg" / "__init__.py").write_text("")
    (tmp_path / "pkgs" / "broken_pkg").mkdir()
    (tmp_path / "pkgs" / "broken_pkg" / "__init__.py").write_text("def assemble():\n    raise OSError('disk full')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    assert load_config(_job(tmp_path, "package:some_model_pkg")).model.path == model
    for path, needle in [
        ("package:no_such_model_pkg_xyz", "'no_such_model_pkg_xyz' is not installed"),
        ("package:no_assemble_pkg", "has no assemble()"),
        ("package:broken_pkg", "broken_pkg.assemble() failed: OSError: disk full"),
        ("package:", "name a package"),
    ]:
        with pytest.raises(ConfigError, match="model.path") as e:
            load_config(_job(tmp_path, path))
        assert needle in str(e.value)
    for name in ("some_model_pkg", "no_assemble_pkg", "broken_pkg"):
        sys.modules.pop(name, None)
