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


def test_default_weights_and_activations_are_named_in_the_fingerprint(tmp_path: Path):
    from upg_batch.config import parse_config
    from upg_batch.fingerprint import config_fields

    def fields(path: str, **model):
        return config_fields(parse_config({"model": {"path": path, **model}, "input": {"path": "d"}, "output": {"path": "o"}}))["model"]

    # None is the source's natural format, so a job that spelled the default out resumes
    assert fields(str(MODEL)) == fields(str(MODEL), weights="f32")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(20))
    assert fields(str(gguf))["weights"] == "stored"
    assert fields(str(gguf)) != fields(str(gguf), weights="f32")
    # activations change the arithmetic; left out when unset, as before the key existed
    assert "activations" not in fields(str(MODEL))
    assert fields(str(MODEL), activations="f32") != fields(str(MODEL), activations="int8") != fields(str(MODEL))
    assert fields(str(MODEL), kv_cache="f16") != fields(str(MODEL), kv_cache="f32") == fields(str(MODEL))


def _inputs(tmp_path: Path, model: Path, **sections):
    from upg_batch.fingerprint import digest_inputs, fingerprint_inputs

    cfg = load_config(write_job(tmp_path, tmp_path / "data", model={"path": str(model)}, **sections))
    inputs = fingerprint_inputs(cfg, make_plan(cfg))
    return digest_inputs(inputs), inputs


def test_a_refused_resume_names_what_changed(tmp_path: Path):
    """The manifest keeps what the fingerprint digests, so a changed job's refusal names the
    config field (old and new value), the model file and the dataset file that changed."""
    model = tmp_path / "model"
    shutil.copytree(MODEL, model)
    write_prompts(tmp_path / "data" / "a.parquet", 3)
    out = tmp_path / "out"
    fp, inputs = _inputs(tmp_path, model)
    assert fingerprint(load_config(tmp_path / "job.yaml"), make_plan(load_config(tmp_path / "job.yaml"))) == fp
    c = Committer(out, fp, 1, "arrow", inputs=inputs)
    c.begin()
    c.close()

    def refusal(**sections) -> str:
        fp2, inputs2 = _inputs(tmp_path, model, **sections)
        with pytest.raises(OutputError) as e:
            Committer(out, fp2, 1, "arrow", inputs=inputs2)
        return str(e.value)

    msg = refusal(sampling={"max_tokens": 3})
    assert "(its config differs): config field sampling.max_tokens: 6 -> 3;" in msg and "--overwrite" in msg
    assert "config field input.limit: null -> 2" in refusal(input={"limit": 2})
    st = (model / "tokenizer.json").stat()
    os.utime(model / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert "(its model differs): model file model.safetensors changed;" in refusal()
    shutil.copytree(MODEL, model, dirs_exist_ok=True)  # the weights' times as they were
    write_prompts(tmp_path / "data" / "b.parquet", 2)
    assert "(its dataset differs): dataset file b.parquet added;" in refusal()
