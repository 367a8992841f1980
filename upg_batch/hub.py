"""Models by Hugging Face hub id (`Qwen/Qwen2.5-0.5B-Instruct`), resolved from the local hub
cache with no network: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`,
in the layout `huggingface_hub` writes (`models--ORG--NAME/refs/<revision>` holding a commit
hash, `models--ORG--NAME/snapshots/<hash>/` holding the files). `ORG/NAME@REVISION` picks a
branch, tag or commit; without it, `main`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["HubError", "hub_cache", "looks_like_hub_id", "resolve_hub_id"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9_./-]+)?$")


class HubError(ValueError):
    """A hub id that the local cache cannot resolve; the message says where it looked."""


def looks_like_hub_id(path: str | Path) -> bool:
    """`ORG/NAME` or `ORG/NAME@REVISION`: two plain path parts, not `./x` or `../x`."""
    s = str(path)
    return bool(_HUB_ID.match(s)) and not s.startswith((".", "~"))


def hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def resolve_hub_id(hub_id: str, local: Path | None = None) -> Path:
    """The snapshot folder of `hub_id` in the local cache. Raises HubError naming the folder it
    looked in (and `local`, the path tried first) and how to download the model."""
    repo, _, revision = hub_id.partition("@")
    revision = revision or "main"
    cache = hub_cache()
    folder = cache / ("models--" + repo.replace("/", "--"))
    fetch = f"`huggingface-cli download {repo}{f' --revision {revision}' if revision != 'main' else ''}` (or set HF_HUB_CACHE / HF_HOME to the cache that has it)"
    if not folder.is_dir():
        where = f"no {local}" if local is not None else "not a local path"
        raise HubError(f"{hub_id}: {where}, and not in the Hugging Face cache (no {folder}); download it with {fetch}")
    snapshots = folder / "snapshots"
    ref = folder / "refs" / revision
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
    elif re.fullmatch(r"[0-9a-f]{40}", revision):
        commit = revision
    else:
        held = sorted(p.name for p in (folder / "refs").iterdir()) if (folder / "refs").is_dir() else []
        raise HubError(f"{hub_id}: the cache at {folder} has no revision {revision!r} (refs: {', '.join(held) or 'none'}); download it with {fetch}")
    snapshot = snapshots / commit
    if not snapshot.is_dir():
        raise HubError(f"{hub_id}: {ref if ref.is_file() else 'the revision'} names commit {commit}, but {snapshot} is missing; download it with {fetch}")
    return snapshot
