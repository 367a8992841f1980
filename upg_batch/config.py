"""The job file: YAML validated with pydantic v2.

Every field is documented in `docs/config.md`. Unknown keys are rejected with the nearest
valid name; relative paths resolve against the folder of the YAML file.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from upg_batch.jobyaml import load_yaml
from upg_batch.limits import sampling_problem
from upg_batch.hub import looks_like_hub_id, resolve_hub_id
from upg_batch.model_package import is_package_path, resolve_package_path

__all__ = ["ConfigError", "JobConfig", "load_config", "OUTPUT_COLUMNS", "OVERRIDE_COLUMNS"]

# Columns every output file has, in this order (passthrough columns follow).
OUTPUT_COLUMNS = ("id", "completion", "finish_reason", "prompt_tokens", "completion_tokens", "error")
# Optional input columns that override the sampling defaults for their row.
OVERRIDE_COLUMNS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop")


class ConfigError(ValueError):
    """The job file is wrong; the message names the field."""


class _Section(BaseModel):
    # strict: YAML already yields typed values, so "5" or true where a number belongs is a mistake
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelSection(_Section):
    path: str | Path = Field(  # a str keeps "./" (a local path, never a hub id)
        description="Hugging Face model folder (config.json, *.safetensors, tokenizer.json), a GGUF file, a hub id ORG/NAME[@REVISION] "
        "found in the local Hugging Face cache, or package:NAME (an installed Python package that ships a model file through assemble()).",
    )
    backend: Literal["cpu", "gpu", "auto"] = Field(
        "cpu", description="Engine backend: cpu, gpu (wgpu: Metal or Vulkan), or auto (a hardware GPU when there is one, else the CPU)."
    )
    weights: Literal["stored", "f32", "f16", "bf16", "q8_0", "q4_0", "q5_0", "q4_k", "q6_k", "q4_k_m"] | None = Field(
        None, description="How weights are held in memory (default: f32 for folders, stored for GGUF files)."
    )
    threads: int | None = Field(None, ge=1, description="Compute threads per engine (null: all cores).")
    max_batch: int = Field(32, ge=1, description="Sequences an engine runs at once.")
    context: int | None = Field(None, ge=2, description="Longest sequence in tokens (null: the model's maximum).")
    activations: Literal["int8", "f32"] | None = Field(
        None,
        description="How block-format weights meet the activations: int8 (the CPU default: integer dot products, fast) or f32 "
        "(follows the dequantized model to f32 rounding; slower on the CPU; the GPU's only way). null: the backend's own.",
    )
    kv_cache: Literal["f32", "f16"] | None = Field(
        None, description="The KV cache's element type: f32 (null) or f16 (half the cache memory)."
    )
    kv_cache_bytes: int | None = Field(
        None, ge=1, description="The most bytes an engine's KV cache may hold (null: what max_batch sequences take); results do not change."
    )
    fused: bool = Field(
        True,
        description="Fused GPU kernels (norm into matmul, SwiGLU, residual add, RoPE with the KV write): fewer dispatches "
        "per step, so faster; false runs one kernel per op (slower; to compare or to isolate a kernel). The CPU does not fuse.",
    )

    def engine_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `Engine(path, ...)` this section asks for (every field but path)."""
        return {name: getattr(self, name) for name in type(self).model_fields if name != "path"}


class InputSection(_Section):
    path: str = Field(description="A Parquet file, a folder of them, or a glob.")
    prompt_column: str = Field("prompt", description="Column with the prompt text.")
    messages_column: str = Field("messages", description="Optional column of chat messages (list of {role, content}).")
    id_column: str | None = Field(None, description="Column with a unique row id (null: 'file:row').")
    shard_rows: int = Field(256, ge=1, description="Rows per shard (the unit of work, commit and retry).")
    limit: int | None = Field(None, ge=1, description="Only the first N rows of the dataset, for a smoke test (null: every row).")
    unique_ids: bool = Field(
        False, description="Refuse, before any work, a dataset whose id_column holds a duplicate or null id (one extra pass over that column)."
    )


class OutputSection(_Section):
    path: Path = Field(strict=False, description="Folder that receives one file per shard, a manifest and _SUCCESS.")
    format: Literal["arrow", "parquet", "openai"] = Field(
        "arrow", description="File format of the shard files: arrow, parquet, or openai (result lines of the OpenAI Batch API, .jsonl)."
    )
    passthrough: tuple[str, ...] = Field((), strict=False, description="Input columns copied to the output unchanged.")

    @field_validator("passthrough")
    @classmethod
    def _no_clash(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if name in OUTPUT_COLUMNS:
                raise ValueError(f"passthrough column {name!r} clashes with the output column of that name")
        if len(set(value)) != len(value):
            raise ValueError("passthrough lists a column twice")
        return value


class SamplingSection(_Section):
    max_tokens: int = Field(128, ge=1, description="Most tokens generated per row.")
    temperature: float = Field(0.0, ge=0.0, description="0: greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens (0: off).")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Drop tokens below min_p x the top probability.")
    seed: int | None = Field(None, ge=0, description="Job seed; each row's seed derives from it and the row id.")
    stop: tuple[str, ...] = Field((), strict=False, description="Stop strings.")
    n: int = Field(1, description="Samples per row; more than 1 adds the `samples` output column.")
    logprobs: int | None = Field(
        None, description="Per generated token, its log-probability and the top k (0-20); adds the `logprobs` output column."
    )

    @field_validator("max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "logprobs")
    @classmethod
    def _row_limits(cls, value: Any, info: ValidationInfo) -> Any:
        # the limits every row's values meet (SamplingParams), so no default fails every row
        problem = sampling_problem(str(info.field_name), value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _non_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value


class ClusterSection(_Section):
    address: str | None = Field(None, description="Ray cluster to join (null: a local Ray on 127.0.0.1).")
    actors: Literal["per_node", "per_gpu"] = Field("per_node", description="Where engine actors go.")
    actors_per_node: int = Field(1, ge=1, description="Engine actors on each node (per_node placement).")
    num_cpus_per_actor: float = Field(1.0, ge=0.0, description="CPUs Ray reserves for each actor.")
    shards_in_flight: int = Field(2, ge=1, le=8, description="Shards queued on each actor at once.")
    max_attempts: int = Field(3, ge=1, description="Tries per shard before its rows become error rows.")
    max_actor_restarts: int = Field(3, ge=0, description="Restarts per actor slot after the actor died.")
    actor_start_timeout_s: float = Field(600.0, gt=0, description="Longest wait for an actor to load the model.")
    shard_timeout_s: float | None = Field(None, gt=0, description="Give up on a shard attempt after this long (null: never).")


class MetricsSection(_Section):
    host: str = Field("127.0.0.1", description="Address the Prometheus endpoint binds to.")
    port: int | None = Field(9464, ge=0, le=65535, description="Port of the endpoint (0 or null: off).")
    poll_interval_s: float = Field(1.0, gt=0, description="How often engine stats are polled.")


class ProgressSection(_Section):
    bar: Literal["auto", "on", "off"] = Field("auto", description="tqdm bar (auto: when stderr is a TTY).")

    @field_validator("bar", mode="before")
    @classmethod
    def _bar_bool(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted on/off (yes/no) as a boolean
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
    log_interval_s: float = Field(10.0, gt=0, description="Seconds between progress log lines without a bar.")


class JobConfig(_Section):
    model: ModelSection
    input: InputSection
    output: OutputSection
    sampling: SamplingSection = SamplingSection()
    cluster: ClusterSection = ClusterSection()
    metrics: MetricsSection = MetricsSection()
    progress: ProgressSection = ProgressSection()
    max_error_fraction: float = Field(
        0.1, ge=0.0, le=1.0, description="Stop the job when more than this fraction of committed rows are error rows (1: never)."
    )

    @model_validator(mode="after")
    def _columns_distinct(self) -> "JobConfig":
        inp = self.input
        if inp.prompt_column == inp.messages_column:
            raise ValueError("input.prompt_column and input.messages_column must differ")
        for name in extra_output_columns(self):
            if name in self.output.passthrough:
                raise ValueError(f"output.passthrough column {name!r} clashes with the output column that sampling adds")
        return self

    def resolved(self, base: Path) -> "JobConfig":
        """A copy with relative paths made absolute against `base` (the YAML file's folder)."""

        def abs_path(p: str | Path) -> Path:
            p = Path(os.path.expanduser(str(p)))
            return Path(os.path.normpath(p if p.is_absolute() else (base / p)))

        model_path = self.model.path
        local = abs_path(model_path)
        try:
            if is_package_path(model_path):
                model_path = resolve_package_path(model_path)
            elif looks_like_hub_id(model_path) and not local.exists():
                model_path = resolve_hub_id(str(model_path), local)
        except ValueError as e:
            raise ConfigError(f"model.path {e}") from None
        model = self.model.model_copy(update={"path": abs_path(model_path)})
        inp = self.input.model_copy(update={"path": str(abs_path(self.input.path))})
        out = self.output.model_copy(update={"path": abs_path(self.output.path)})
        return self.model_copy(update={"model": model, "input": inp, "output": out})


def extra_output_columns(cfg: JobConfig) -> tuple[str, ...]:
    """Output columns the sampling section adds after OUTPUT_COLUMNS: `logprobs` (sample 0's
    per-token log-probabilities) and `samples` (all n samples when n > 1)."""
    if cfg.output.format == "openai":  # requests may ask for n and logprobs one by one
        return ("logprobs", "samples")
    return (("logprobs",) if cfg.sampling.logprobs is not None else ()) + (("samples",) if cfg.sampling.n > 1 else ())


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> JobConfig:
    """Read, validate and resolve a job file, with `--set KEY=VALUE` overrides applied first
    (overrides.py). Raises ConfigError naming what is wrong."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the job file ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: the job file is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    try:
        data = load_yaml(text)  # safe_load, refusing duplicate keys and runaway nesting
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_one_line(str(e))})") from None
    if overrides:
        from upg_batch.overrides import apply_overrides

        data = apply_overrides(data, overrides, source=str(path))
    return parse_config(data, source=str(path)).resolved(path.resolve().parent)


def parse_config(data: Any, source: str = "job") -> JobConfig:
    """Validate a mapping (already parsed YAML); paths stay as written."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the job file must be a mapping with model, input and output sections")
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {format_errors(e)}") from None


def format_errors(err: ValidationError) -> str:
    """One line per problem: the dotted field, what is wrong, and a suggestion for unknown keys."""
    lines = []
    for item in err.errors():
        loc = [str(p) for p in item["loc"]]
        field = ".".join(loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            hint = _suggest(loc)
            lines.append(f"unknown key '{field}'" + (f" (did you mean '{hint}'?)" if hint else ""))
        elif item["type"] == "missing":
            lines.append(f"'{field}' is required")
        else:
            got = item.get("input")
            shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
            lines.append(f"'{field}': {item['msg']}{shown}")
    return "; ".join(lines)


def _suggest(loc: list[str]) -> str | None:
    """The closest valid key for an unknown key at `loc` (difflib)."""
    model: type[BaseModel] = JobConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    matches = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.5)
    if not matches:
        return None
    return ".".join([*loc[:-1], matches[0]])


def _one_line(text: str) -> str:
    return " ".join(text.split())
