"""Fingerprints: what changes the output changes the fingerprint."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import MODEL, write_job, write_prompts

import upg_batch
from upg_batch.commit import Committer, OutputError
from upg_batch.config import load_config
from upg_batch.fingerprint import fingerprint
from upg_batch.plan import make_plan


def _fp(tmp_path: Path, model: Path) -> dict[str, str]:
    f = write_prompts(tmp_path / "d.parquet", 3)
    cfg = load_config(write_job(tmp_path, f, model={"path": str(model)}))
    return fingerprint(cfg, make_plan(cfg))


def test_weight_contents_change_the_fingerprint(tmp_path: Path):
    model = tmp_path / "model"
    shutil.copytree(MODEL, model)
    weights = model / "model.safetensors"
    first = _fp(tmp_path, model)
    assert _fp(tmp_path, model) == first  # stable while nothing changes
    # one byte flipped past the header: same size, same header
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    st = weights.stat()
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    flipped = _fp(tmp_path, model)
    assert flipped["model"] != first["model"] and flipped["job"] != first["job"]
    # touched only
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    assert _fp(tmp_path, model)["model"] != flipped["model"]


def test_the_upg_batch_version_is_part_of_the_fingerprint(tmp_path: Path, monkeypatch):
    first = _fp(tmp_path, MODEL)
    assert first["version"] == upg_batch.__version__
    out = tmp_path / "out"
    c = Committer(out, first, 1, "arrow")
    c.begin()
    c.close()
    monkeypatch.setattr(upg_batch, "__version__", upg_batch.__version__ + ".post1")
    upgraded = _fp(tmp_path, MODEL)
    assert upgraded["job"] != first["job"]
    with pytest.raises(OutputError, match="its version differs"):
        Committer(out, upgraded, 1, "arrow")


def test_fused_is_part_of_a_gpu_jobs_config_but_not_a_cpu_jobs():
    from upg_batch.config import parse_config
    from upg_batch.fingerprint import config_fields

    def fields(**model):
        return config_fields(parse_config({"model": {"path": "m", **model}, "input": {"path": "d"}, "output": {"path": "o"}}))

    for backend in ("gpu", "auto"):
        assert fields(backend=backend, fused=False) != fields(backend=backend, fused=True)
        assert fields(backend=backend)["model"]["fused"] is True
    # The CPU computes the same bits either way: its fingerprint stays as it was before the key existed.
    assert fields(backend="cpu", fused=False) == fields(backend="cpu", fused=True)
    assert fields()["model"] == {"backend": "cpu", "weights": "f32", "context": None}
    assert fields(backend="gpu") != fields(backend="cpu")
