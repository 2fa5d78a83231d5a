"""YAML as the command line reads it, with one rule more than PyYAML's: a mapping that names a key twice is an error.
PyYAML keeps the last value silently, so ``{noisy: a.pt, noisy: c.pt}`` would drop an expert without a word. Config
files and option values (through jsonargparse's loader) are both read this way."""

from __future__ import annotations

from typing import Any

import jsonargparse
import yaml

from tcube_lightning.errors import InputError

MODE = "yaml_unique_keys"
"""The jsonargparse parser mode whose loader is ``load``."""


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that repeats a key."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                mark = key_node.start_mark
                raise InputError(
                    f"{key!r} is named twice in one mapping (line {mark.line + 1}, column {mark.column + 1} of "
                    f"{self.source_name}): YAML would keep the last silently; give each key once"
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load(text: str, source_name: str = "an option's value") -> Any:
    """``text`` as YAML (or JSON), a repeated key refused naming it and ``source_name`` (a file, or an option)."""
    loader = UniqueKeyLoader(text)
    loader.source_name = source_name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


jsonargparse.set_loader(MODE, load, exceptions=(yaml.YAMLError,))
