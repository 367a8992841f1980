"""YAML for job files: PyYAML's safe loader, stricter where a silent answer would mislead.

- A key given twice in one mapping is an error naming the key by its dotted path
  (`sampling.max_tokens`); PyYAML would keep the last value without a word.
- Nesting is bounded (MAX_DEPTH): a hostile or broken file fails with a YAML error instead of
  exhausting the interpreter's recursion limit in PyYAML's recursive composer.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

__all__ = ["MAX_DEPTH", "JobYAMLError", "load_yaml"]

# job files nest three or four levels; this leaves room and stays far below Python's recursion limit
MAX_DEPTH = 64
_MERGE = "tag:yaml.org,2002:merge"


class JobYAMLError(yaml.YAMLError):
    """A YAML document the job loader refuses (a duplicate key, nesting too deep)."""


class _JobLoader(yaml.SafeLoader):
    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise JobYAMLError(f"nested deeper than {MAX_DEPTH} levels (line {line})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _check_keys(loader: _JobLoader, node: Node, path: str, seen: set[int]) -> None:
    """Every mapping's own keys distinct ('<<' merges may be overridden, as YAML allows). Each
    node is checked once: an alias repeats a node (or holds its own ancestor) without a copy."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, MappingNode):
        first: dict[Any, int] = {}
        for key_node, value_node in node.value:
            name = path
            if isinstance(key_node, ScalarNode) and key_node.tag != _MERGE:
                key = loader.construct_object(key_node)
                name = f"{path}.{key}" if path else str(key)
                line = key_node.start_mark.line + 1
                try:
                    if key in first:
                        raise JobYAMLError(f"duplicate key '{name}' (line {line}; first given on line {first[key]})")
                    first[key] = line
                except TypeError:  # not hashable: the safe loader reports it
                    pass
            _check_keys(loader, value_node, name, seen)
    elif isinstance(node, SequenceNode):
        for i, item in enumerate(node.value):
            _check_keys(loader, item, f"{path}[{i}]", seen)


def load_yaml(text: str) -> Any:
    """Parse one YAML document like `yaml.safe_load`, with the checks above (yaml.YAMLError)."""
    loader = _JobLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_keys(loader, node, "", set())
        return loader.construct_document(node)
    finally:
        loader.dispose()
