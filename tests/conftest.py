"""Shared fixtures for the runner tests: small datasets, job files, a shared local Ray."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
# llama-tiny plus a chat_template (configs/demo/model)
MODEL = ROOT / "configs" / "demo" / "model"
MSG_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def write_prompts(path: Path, n: int, start: int = 0, row_group_size: int | None = None, **extra: Any) -> Path:
    """A Parquet file of n prompt rows with integer ids start..start+n-1 (plus `extra` columns)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cols: dict[str, Any] = {
        "id": pa.array(range(start, start + n), pa.int64()),
        "prompt": pa.array([f"Row {i}: tell me about the number {i}." for i in range(start, start + n)], pa.string()),
    }
    cols.update(extra)
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
    return path


def corrupt_row_group(path: Path, group: int) -> None:
    """Overwrite the start of every data page of one row group with garbage: the footer stays
    valid (planning reads it), reading that group's columns fails."""
    meta = pq.read_metadata(path)
    rg = meta.row_group(group)
    with open(path, "r+b") as f:
        for c in range(rg.num_columns):
            f.seek(rg.column(c).data_page_offset)
            f.write(b"\xff" * 16)


def write_job(tmp: Path, data: str | Path, out: str | Path = "out", **sections: Any) -> Path:
    """A job file in `tmp`; `sections` update the defaults section by section (a value that
    is not a mapping sets a top-level key, e.g. max_error_fraction=0.1)."""
    job: dict[str, Any] = {
        "model": {"path": str(MODEL), "max_batch": 8},
        "input": {"path": str(data), "id_column": "id", "shard_rows": 8},
        "output": {"path": str(out)},
        "sampling": {"max_tokens": 6, "temperature": 0.0},
        "metrics": {"port": 0},
        "progress": {"bar": "off", "log_interval_s": 60},
        # the tests make error rows on purpose; those about the error budget set it
        "max_error_fraction": 1.0,
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            job.setdefault(name, {}).update(values)
        else:
            job[name] = values
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def read_output(out: Path) -> pa.Table:
    import pyarrow.dataset as ds

    return ds.dataset(str(out), format="arrow").to_table()


def output_files(out: Path) -> list[str]:
    return sorted(os.listdir(out))


@pytest.fixture
def local_ray():
    """A local Ray on 127.0.0.1, shared by every test that asks for it (started once)."""
    import ray

    from upg_batch.cluster import connect
    from upg_batch.config import ClusterSection

    if not ray.is_initialized():
        connect(ClusterSection())
    yield ray


@pytest.fixture(scope="session", autouse=True)
def _ray_shutdown_at_end():
    yield
    ray = sys.modules.get("ray")  # never imported: nothing to stop (and no need to have Ray)
    if ray is not None and ray.is_initialized():
        ray.shutdown()
