"""Models by Hugging Face hub id, from a local hub cache laid out as huggingface_hub writes it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import MODEL, write_job, write_prompts

from upg_batch import Engine, EngineError
from upg_batch.config import ConfigError, load_config
from upg_batch.hub import looks_like_hub_id
from upg_batch.runner import ModelError, check_model_dir

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(root: Path, repo: str = "tiny-org/llama-tiny", refs: dict[str, str] | None = None) -> Path:
    """models--ORG--NAME/{refs/main, snapshots/<commit>/...} with the tests' model as the snapshot."""
    folder = root / ("models--" + repo.replace("/", "--"))
    shutil.copytree(MODEL, folder / "snapshots" / COMMIT)
    (folder / "refs").mkdir()
    for name, commit in (refs or {"main": COMMIT}).items():
        (folder / "refs" / name).write_text(commit + "\n")
    return folder / "snapshots" / COMMIT


def test_hub_ids_are_told_from_paths() -> None:
    for s in ("Qwen/Qwen2.5-0.5B-Instruct", "tiny-org/llama-tiny@v1.0", "a/b"):
        assert looks_like_hub_id(s), s
    for s in ("./a/b", "../a/b", "a", "a/b/c", "/abs/b", "~/a", "a/b.gguf@", "package:x"):
        assert not looks_like_hub_id(s), s


def test_a_job_resolves_a_hub_id_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hf" / "hub"
    snapshot = fake_cache(cache, refs={"main": COMMIT, "v1.0": COMMIT})
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    data = write_prompts(tmp_path / "d.parquet", 2)
    for ref in ("tiny-org/llama-tiny", "tiny-org/llama-tiny@v1.0", f"tiny-org/llama-tiny@{COMMIT}"):
        cfg = load_config(write_job(tmp_path, data, model={"path": ref}))
        assert cfg.model.path == snapshot, ref
        check_model_dir(cfg)
    assert Engine("tiny-org/llama-tiny").info["architecture"] == "LlamaForCausalLM"
    # --set keeps a hub id a hub id (a relative path given there resolves against the cwd)
    other = load_config(write_job(tmp_path, data, model={"path": str(MODEL)}), ["model.path=tiny-org/llama-tiny"])
    assert other.model.path == snapshot
    # HF_HUB_CACHE wins over HF_HOME
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    with pytest.raises(ConfigError, match="elsewhere"):
        load_config(write_job(tmp_path, data, model={"path": "tiny-org/llama-tiny"}))


def test_a_hub_id_missing_from_the_cache_says_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    fake_cache(cache)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    data = write_prompts(tmp_path / "d.parquet", 2)
    with pytest.raises(ConfigError) as e:
        load_config(write_job(tmp_path, data, model={"path": "Qwen/Qwen2.5-0.5B-Instruct"}))
    msg = str(e.value)
    assert "model.path Qwen/Qwen2.5-0.5B-Instruct" in msg and str(tmp_path / "Qwen" / "Qwen2.5-0.5B-Instruct") in msg
    assert str(cache / "models--Qwen--Qwen2.5-0.5B-Instruct") in msg and "huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct" in msg
    with pytest.raises(ConfigError, match="no revision 'v9'.*refs: main"):
        load_config(write_job(tmp_path, data, model={"path": "tiny-org/llama-tiny@v9"}))
    with pytest.raises(EngineError, match="not in the Hugging Face cache"):
        Engine("Qwen/Qwen2.5-0.5B-Instruct")


def test_a_local_folder_of_that_shape_wins_and_a_missing_path_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    local = tmp_path / "models" / "tiny"
    shutil.copytree(MODEL, local)
    data = write_prompts(tmp_path / "d.parquet", 2)
    assert load_config(write_job(tmp_path, data, model={"path": "models/tiny"})).model.path == local
    cfg = load_config(write_job(tmp_path, data, model={"path": "./models/missing"}))
    with pytest.raises(ModelError, match="no such file or folder"):
        check_model_dir(cfg)
