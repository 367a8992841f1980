"""`--set KEY=VALUE`: change a job file's fields from the command line.

KEY is a dotted field name (`sampling.max_tokens`, `max_error_fraction`); VALUE is read as YAML,
as it would be in the file (`8` is a number, `null` is null, `[a, b]` a list; quote a string
YAML would read otherwise). The result goes through the same validation as the file, so an
unknown key or a wrong type is named the same way. A relative path set here (`model.path`,
`input.path`, `output.path`) is relative to the current folder, as paths typed in a shell are.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import yaml

from upg_batch.config import ConfigError

__all__ = ["apply_overrides", "PATH_KEYS"]

PATH_KEYS = ("model.path", "input.path", "output.path")


def _model_reference(key: str, value: str) -> bool:
    """model.path values that are not paths: package:NAME, or a hub id with no such local path."""
    from upg_batch.hub import looks_like_hub_id
    from upg_batch.model_package import is_package_path

    return key == "model.path" and (is_package_path(value) or (looks_like_hub_id(value) and not os.path.exists(value)))


def _parse(item: str) -> tuple[list[str], Any]:
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted KEY such as sampling.max_tokens=8")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({' '.join(str(e).split())})") from None
    key = ".".join(parts)
    if key in PATH_KEYS and isinstance(value, str) and not _model_reference(key, value):
        value = os.path.abspath(os.path.expanduser(value))
    return parts, value


def apply_overrides(data: Any, overrides: Sequence[str], source: str = "job") -> Any:
    """A copy of the parsed job file `data` with every `KEY=VALUE` of `overrides` set, in order."""
    if not isinstance(data, dict):
        return data  # parse_config names the problem
    out = _copy(data)
    for item in overrides:
        parts, value = _parse(item)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                section = ".".join(parts[: i + 1])
                raise ConfigError(f"--set {item!r}: '{section}' in {source} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def _copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in data.items()}
