"""Paths in a run's configuration, made absolute: those in a config file relative to that file's folder, those on the
command line relative to the current folder. A config then means the same files from wherever it is run, and the
config.yaml a run saves (and results.json's config) resumes from any folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace

from tcube_lightning.cli import strict_yaml

INPUTS = {"model": ("pretrained_checkpoint", "expert_checkpoint", "model_config"), "data": ("root",)}
"""Options naming files to read, or something else: made absolute only where they are a path (a pretrained tag or
``hf-hub:org/repo`` stays as it is)."""
NAMED_INPUTS = {"model": ("experts",)}
"""Options mapping names to ``INPUTS``-like values (several experts' checkpoints)."""
SCHEMAS = {"model": ("arch",)}
"""Options naming a path only after ``local-dir:`` (else an open_clip name or ``hf-hub:org/repo``)."""
OUTPUTS = {"model": ("results_dir", "cache_dir"), "data": ("corruption_cache",), "trainer": ("default_root_dir",)}
"""Options naming folders to write in (or a cache): always paths."""
LOCAL_DIR, HUB = "local-dir:", "hf-hub:"
CONFIG_FLAGS = ("--config", "-c")


def inline_config_files(args: list[str], cwd: Path) -> list[str]:
    """``args`` with each ``--config FILE`` replaced by the file's content (jsonargparse takes either), its relative
    paths, and those of the group config files it names, resolved against the folder of the file they are in."""
    resolved, index = [], 0
    while index < len(args):
        flag, _, value = args[index].partition("=")
        if flag in CONFIG_FLAGS and index + 1 < len(args) and not value:
            index, value = index + 1, args[index + 1]
        if flag in CONFIG_FLAGS and (cwd / value).is_file():
            path = cwd / value
            config = config_with_absolute_paths(strict_yaml.load(path.read_text(), str(path)), path.parent)
            resolved += [flag, yaml.safe_dump(config)]
        else:
            resolved += [args[index]] if flag not in CONFIG_FLAGS else [flag, value]
        index += 1
    return resolved


def config_with_absolute_paths(config: Any, folder: Path) -> Any:
    """A run's config (a mapping) with its paths resolved against ``folder`` and its group config files inlined."""
    if not isinstance(config, dict):
        return config
    config = dict(config)
    for group in ("model", "data", "trainer"):
        value, base = config.get(group), folder
        if isinstance(value, str) and (folder / value).is_file():  # a group's own config file, e.g. base/model.yaml
            value, base = strict_yaml.load((folder / value).read_text(), str(folder / value)), (folder / value).parent
        if isinstance(value, dict):
            config[group] = dict(value)
            resolve_group(group, config[group].get, config[group].__setitem__, config[group].__contains__, base)
    return config


def absolute_namespace_paths(config: Namespace, cwd: Path) -> None:
    """The parsed config's remaining relative paths (given on the command line) resolved against ``cwd``, in place."""
    for group in ("model", "data", "trainer"):
        prefix = f"{group}."
        resolve_group(
            group,
            lambda k, prefix=prefix: config.get(prefix + k),
            lambda k, v, prefix=prefix: config.__setitem__(prefix + k, v),
            lambda k, prefix=prefix: prefix + k in config,
            cwd,
        )


def resolve_group(group: str, get: Callable, put: Callable, has: Callable, folder: Path) -> None:
    """Resolve one group's path options through accessors (a mapping's, or a parsed namespace's)."""
    for key in INPUTS.get(group, ()):
        if has(key):
            put(key, input_path(get(key), folder))
    for key in NAMED_INPUTS.get(group, ()):
        named = get(key) if has(key) else None
        if isinstance(named, dict):
            put(key, {name: input_path(value, folder) for name, value in named.items()})
    for key in SCHEMAS.get(group, ()):
        value = get(key) if has(key) else None
        if isinstance(value, str) and value.startswith(LOCAL_DIR):
            put(key, LOCAL_DIR + str(resolve(value.removeprefix(LOCAL_DIR), folder)))
    for key in OUTPUTS.get(group, ()):
        if has(key):
            put(key, output_path(get(key), folder))
    if group == "trainer" and has("logger"):
        put("logger", logger_paths(get("logger"), folder))


def input_path(value: Any, folder: Path) -> Any:
    """A path to read, absolute; a value that names no path (a tag, a hub or open_clip name) as it is."""
    if not isinstance(value, str) or not value or value.startswith(HUB):
        return value
    if "/" in value or (folder / value).exists():
        return str(resolve(value, folder))
    return value


def output_path(value: Any, folder: Path) -> Any:
    return str(resolve(value, folder)) if isinstance(value, str) and value else value


def logger_paths(logger: Any, folder: Path) -> Any:
    """A logger's ``save_dir`` (a config mapping or a parsed namespace; several loggers in a list) resolved."""
    if isinstance(logger, list):
        return [logger_paths(each, folder) for each in logger]
    init_args = logger.get("init_args") if isinstance(logger, (dict, Namespace)) else None
    if isinstance(init_args, (dict, Namespace)) and init_args.get("save_dir") is not None:
        if isinstance(logger, dict):
            return {**logger, "init_args": {**init_args, "save_dir": output_path(init_args["save_dir"], folder)}}
        init_args["save_dir"] = output_path(init_args["save_dir"], folder)
    return logger


def resolve(value: str, folder: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (folder / path).resolve()
