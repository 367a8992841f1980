"""Fingerprints of what determines a job's output: config, model and dataset.

Cheap by design: the model's small JSON files are hashed whole, weight files by size,
modification time (st_mtime_ns) and header (safetensors) or first and last bytes (other
formats); Parquet files by size and footer (schema, row groups, statistics). Nothing reads the
weights or the data. The modification time stands in for the weight contents: a weight file
rewritten in place (same size, same header) changes it; so does merely touching or copying it
without preserving times, which makes a resume refuse the folder (safe, if cautious). The
upg-batch version is part of the fingerprint too, so a new engine never silently resumes
output of an old one.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from upg_batch.chat import is_gguf_file
from upg_batch.config import JobConfig
from upg_batch.plan import Plan

__all__ = ["config_fields", "describe_changes", "digest_inputs", "fingerprint", "fingerprint_inputs"]

_MODEL_JSON = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")
_EDGE = 1 << 16  # bytes hashed at each end of a weight file without a parseable header


def config_fields(cfg: JobConfig) -> dict[str, Any]:
    """The config fields that change what is written (not where it runs or how fast)."""
    # weights None means the source's natural format: named, so a job written when the default
    # was spelled out (f32) resumes under the implicit one.
    weights = cfg.model.weights or ("stored" if is_gguf_file(cfg.model.path) else "f32")
    model: dict[str, Any] = {"backend": cfg.model.backend, "weights": weights, "context": cfg.model.context}
    if cfg.model.activations is not None:
        model["activations"] = cfg.model.activations
    if cfg.model.kv_cache == "f16":  # f32 is the cache jobs had before the key existed
        model["kv_cache"] = cfg.model.kv_cache
    if cfg.model.backend != "cpu":
        # The GPU's fused kernels sum in another order than its one-op kernels. The CPU does
        # not fuse (the same bits either way), so a CPU job's fingerprint leaves it out, as
        # it was before the key existed.
        model["fused"] = cfg.model.fused
    return {
        "model": model,
        "input": {
            "prompt_column": cfg.input.prompt_column,
            "messages_column": cfg.input.messages_column,
            "id_column": cfg.input.id_column,
            "shard_rows": cfg.input.shard_rows,
            # only when set, so a job without a limit keeps the fingerprint it had before the key
            **({"limit": cfg.input.limit} if cfg.input.limit is not None else {}),
        },
        "output": {"format": cfg.output.format, "passthrough": list(cfg.output.passthrough)},
        # n and logprobs only when set, so older jobs keep their fingerprints
        "sampling": {k: v for k, v in cfg.sampling.model_dump(mode="json").items() if (k, v) not in (("n", 1), ("logprobs", None))},
    }


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _weight_signature(path: Path) -> dict[str, Any]:
    st = path.stat()
    size = st.st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 and path.suffix == ".safetensors" else None
        if n is not None and 0 < n <= min(size - 8, 100 << 20):
            h.update(f.read(n))  # the safetensors header: names, dtypes, shapes, offsets
        else:
            f.seek(0)
            h.update(f.read(_EDGE))
            if size > _EDGE:
                f.seek(max(_EDGE, size - _EDGE))
                h.update(f.read(_EDGE))
    return {"size": size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}


def model_fingerprint(model_dir: Path) -> dict[str, Any]:
    if model_dir.is_file():  # a GGUF file: config, tokenizer and weights in one
        return {model_dir.name: _weight_signature(model_dir)}
    files: dict[str, Any] = {}
    for name in _MODEL_JSON:
        p = model_dir / name
        if p.is_file():
            files[name] = hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(model_dir.iterdir()):
        if p.is_file() and p.suffix in (".safetensors", ".gguf", ".bin", ".pt", ".pth"):
            files[p.name] = _weight_signature(p)
    return files


def _parquet_footer_hash(path: str, size: int) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, size - 8))
        tail = f.read(8)
        n = struct.unpack("<I", tail[:4])[0] if len(tail) == 8 and tail[4:] == b"PAR1" else 0
        f.seek(max(0, size - 8 - n))
        return hashlib.sha256(f.read(n + 8)).hexdigest()


def dataset_fingerprint(plan: Plan) -> list[Any]:
    return [[f.key, f.size, f.num_rows, _jsonl_hash(f.path, f.size, f.line_offsets) if f.is_jsonl else _parquet_footer_hash(f.path, f.size)] for f in plan.files]


def _jsonl_hash(path: str, size: int, offsets: tuple[int, ...]) -> str:
    """A request file: where its shards' lines start, and its first and last bytes (cheap, as
    for weight files; a line rewritten in place with the same length goes unseen)."""
    h = hashlib.sha256(json.dumps(offsets).encode())
    with open(path, "rb") as f:
        h.update(f.read(_EDGE))
        if size > _EDGE:
            f.seek(max(_EDGE, size - _EDGE))
            h.update(f.read(_EDGE))
    return h.hexdigest()


def fingerprint_inputs(cfg: JobConfig, plan: Plan) -> dict[str, Any]:
    """What the fingerprint digests: config fields, model files, dataset files, the upg-batch
    version. Kept in the manifest, so a refused resume can name what changed."""
    from upg_batch import __version__

    return {
        "config": config_fields(cfg),
        "model": model_fingerprint(Path(cfg.model.path)),
        "dataset": dataset_fingerprint(plan),
        "version": __version__,
    }


def digest_inputs(inputs: dict[str, Any]) -> dict[str, str]:
    """Digests of config, model and dataset, the upg-batch version, and one over all of them."""
    parts = {
        "config": _digest(inputs["config"]),
        "model": _digest(inputs["model"]),
        "dataset": _digest(inputs["dataset"]),
        "version": inputs["version"],
    }
    parts["job"] = _digest(parts)
    return parts


def fingerprint(cfg: JobConfig, plan: Plan) -> dict[str, str]:
    """Digests of config, model and dataset, the upg-batch version, and one over all of them."""
    return digest_inputs(fingerprint_inputs(cfg, plan))


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def _files_changed(what: str, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for name in sorted(set(old) | set(new)):
        if name not in new:
            out.append(f"{what} {name} removed")
        elif name not in old:
            out.append(f"{what} {name} added")
        elif old[name] != new[name]:
            out.append(f"{what} {name} changed")
    return out


def describe_changes(old: dict[str, Any], new: dict[str, Any], most: int = 6) -> list[str]:
    """What differs between two `fingerprint_inputs`: config fields (old -> new value), model and
    dataset files (added, removed, changed), the version. At most `most` items, then a count."""
    new = json.loads(json.dumps(new))  # as the manifest holds it: tuples are lists
    out: list[str] = []
    old_cfg, new_cfg = _flat(old.get("config", {})), _flat(new.get("config", {}))
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if old_cfg.get(key, "(unset)") != new_cfg.get(key, "(unset)"):
            out.append(f"config field {key}: {json.dumps(old_cfg.get(key))} -> {json.dumps(new_cfg.get(key))}")
    out += _files_changed("model file", old.get("model", {}), new.get("model", {}))
    dataset = {str(f[0]): f[1:] for f in old.get("dataset", []) if isinstance(f, list) and f}
    out += _files_changed("dataset file", dataset, {str(f[0]): f[1:] for f in new.get("dataset", [])})
    if old.get("version") != new.get("version"):
        out.append(f"upg-batch version {old.get('version')} -> {new.get('version')}")
    if len(out) > most:
        out = out[:most] + [f"{len(out) - most} more"]
    return out
