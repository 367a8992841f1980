"""The CLI on whole jobs."""

from __future__ import annotations

import socket
from pathlib import Path

from conftest import write_job, write_prompts

from upg_batch.cli import main


def _errors(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("upg-batch: error:")]


def test_validate_names_a_taken_metrics_port_and_the_fix(tmp_path: Path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        job = write_job(tmp_path, write_prompts(tmp_path / "d.parquet", 2), tmp_path / "out", metrics={"port": port})
        assert main(["validate", str(job)]) == 2
    [err] = _errors(capsys)
    assert f"metrics.port {port} on 127.0.0.1" in err and "in use" in err
    assert "--set metrics.port=" in err and "0 for no endpoint" in err
