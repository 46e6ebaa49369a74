"""The command line of every Hydra stage, checked before Hydra runs.

Hydra answers a mistyped override with several lines of its own and exit code 1, which
`launch/auto_resume.sh` would read as a crash. `check_command_line` composes the same config
through Hydra's compose API and checks each override itself, so that every problem is reported
at once, in one line with exit code 2 (pipeline.errors.ConfigError):

- an unknown key names the nearest keys (`trainer.max_stepz: no such key; did you mean
  trainer.max_steps?`); the schemas are closed on purpose, so `+key=` is no way out;
- a wrong type names the key, the value and the type the schema expects;
- an unknown option of a config group lists the options that exist;
- a sweep (`-m`, or a `sweep=` config that sets hydra.mode=MULTIRUN) has each of its values
  checked, those of the command line and those of `hydra.sweeper.params`, before any job runs.

`HYDRA_FULL_ERROR=1` skips the check, so Hydra reports with its full trace, as it documents; so
do command lines with flags the check does not interpret (`--help`, `--info`, `-cn` ...).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator
from typing import Any

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob, IntervalSweep, Override
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from pipeline.config import RENAMED, TrainConfig, conf_dir, register_configs, to_dataclass
from pipeline.errors import ConfigError

SKIPPED_FLAGS = (
    "help",
    "hydra_help",
    "info",
    "shell_completion",
    "config_path",
    "config_name",
    "config_dir",
    "experimental_rerun",
)
"""Hydra flags that change what is composed, or compose nothing: left to Hydra."""

TYPE_WORDS = {"IntegerNode": "an integer", "FloatNode": "a number", "BooleanNode": "true or false",
              "StringNode": "a string", "ListConfig": "a list such as [a,b]",
              "DictConfig": "a mapping such as {a: 1}"}  # fmt: skip
"""How a message names the type a schema field expects, by OmegaConf's node class."""


def check_command_line(
    config_name: str, argv: list[str], renamed: dict[str, str] | None = None
) -> DictConfig | None:
    """Check the overrides of `python -m pipeline.<stage> argv` against conf/<config_name>.yaml
    and its schema, as Hydra would apply them. `renamed`: old key -> new key, each reported as
    renamed. Returns the composed config (hydra node included) of a single run, None for a
    sweep or a command line left to Hydra (see the module docstring). Raises ConfigError naming
    every problem."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return None
    args, unknown = get_args_parser().parse_known_args(argv)
    if unknown or any(getattr(args, flag, None) for flag in SKIPPED_FLAGS):
        return None
    if any(line.lstrip("+~").startswith("hydra.searchpath") for line in args.overrides):
        return None  # other config folders: their groups are Hydra's to find
    register_configs()
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        parser = OverridesParser.create(config_loader=loader)
        problems, overrides = _parse(parser, args.overrides, renamed or {})
        groups = [o for o in overrides if loader.repository.group_exists(o.key_or_group)]
        picked = []  # the first option of each group: the keys a value override may set
        for o in groups:
            found = _option_problems(loader, o)
            problems += found
            if not found and _values(o) and not o.is_delete():
                picked.append(f"{o.get_key_element()}={_option_text(_values(o)[0])}")
        try:
            cfg = compose(config_name, picked, return_hydra_config=True)
        except (HydraException, OmegaConfBaseException, ValueError) as e:  # ValueError:
            raise ConfigError([*problems, _first_line(e)]) from None  # e.g. model=null
        modes = [str(o.value()) for o in overrides if o.key_or_group == "hydra.mode"]
        multirun = bool(args.multirun) or "MULTIRUN" in [*modes[-1:], str(cfg.hydra.mode)[8:]]
        for o in (o for o in overrides if o not in groups):
            problems += _value_problems(cfg, o, multirun)
        if multirun:
            problems += _sweeper_problems(loader, parser, cfg)
        elif not problems:
            problems += resolution_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return None if multirun else cfg


def _parse(parser: OverridesParser, lines: list[str], renamed: dict[str, str]):
    """(problems, parsed overrides) of the command line's override strings."""
    problems, parsed = [], []
    for line in lines:
        key = line.split("=", 1)[0].lstrip("+~")
        if key in renamed:
            value = line.split("=", 1)[1] if "=" in line else "..."
            problems.append(f"{key} was renamed to {renamed[key]}: write {renamed[key]}={value}")
            continue
        try:
            parsed.append(parser.parse_override(line))
        except HydraException as e:
            problems.append(f"{line}: cannot be parsed as key=value ({_first_line(e)})")
    return problems, parsed


def _values(o: Override) -> list[Any]:
    """The values an override sets: one, or each of a sweep's (a glob or an interval: none)."""
    if not o.is_sweep_override():
        return [o.value()]
    if isinstance(o.value(), (Glob, IntervalSweep)):
        return []
    return list(o.sweep_iterator())


def _option_text(value: Any) -> str:
    """An option (or a list of options) as override text."""
    if isinstance(value, list):
        return "[" + ",".join(map(_option_text, value)) + "]"
    return "null" if value is None else str(value)


def _option_problems(loader, o: Override) -> list[str]:
    """An option of a config group that does not exist, with the options that do."""
    options = loader.get_group_options(o.key_or_group, results_filter=ObjectType.CONFIG)
    out = []
    for value in _values(o):
        if value is None and not o.is_delete():
            out.append(
                f"{o.key_or_group}=null: choose one of {', '.join(options)} (~"
                f"{o.key_or_group} removes an optional group)"
            )
            continue
        for name in value if isinstance(value, list) else [value]:
            if name is not None and str(name) not in options:
                out.append(
                    f"{o.key_or_group}={name}: no such option; choose one of {', '.join(options)}"
                )
    return out


def _sweeper_problems(loader, parser: OverridesParser, cfg: DictConfig) -> list[str]:
    """The problems of a sweep config's `hydra.sweeper.params` (key: values), each checked
    as the same override on the command line would be."""
    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {}
    out = []
    for key, value in params.items():
        line = f"{key}={value}"
        problems, parsed = _parse(parser, [line], {})
        out += [f"hydra.sweeper.params: {p}" for p in problems]
        for o in parsed:
            if loader.repository.group_exists(o.key_or_group):
                found = _option_problems(loader, o)
            else:
                found = _value_problems(cfg, o, multirun=True)
            out += [f"hydra.sweeper.params: {p}" for p in found]
    return out


def _value_problems(cfg: DictConfig, o: Override, multirun: bool) -> list[str]:
    """What is wrong with a key=value override: an unknown key (with the nearest ones), a value
    of the wrong type, a sweep without -m. Applies the value to cfg, as Hydra would."""
    key, shown = o.key_or_group, o.input_line
    if o.package is not None:
        return [f"{shown}: {key} is not a config group, so it takes no @package"]
    exists = _exists(cfg, key)
    if o.is_delete():
        return [] if exists else [f"{shown}: {_unknown(cfg, key)}"]
    if not exists and (not (o.is_add() or o.is_force_add()) or _typed_parent(cfg, key)):
        return [_unknown(cfg, key)]
    if (
        exists
        and o.is_add()
        and OmegaConf.select(cfg, key, throw_on_missing=False) is not None
        and not isinstance(o.value(), (dict, list))
    ):  # Hydra's rule for appending
        return [f"{shown}: {key} exists already: write {shown[1:]} (without +)"]
    if o.is_sweep_override() and not multirun:
        return [
            f"{shown}: several values are a sweep: add -m to run one job per value, or "
            f"write one value (a list is key=[a,b])"
        ]
    out = []
    for value in _values(o):
        try:
            with open_dict(cfg) if o.is_add() or o.is_force_add() else _nothing():
                OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as e:
            out.append(f"{key}={_shown_value(o, value)}: {_type_problem(cfg, key, e)}")
    return out[:1]  # one line per override, even when several sweep values are wrong


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


def _shown_value(o: Override, value: Any) -> str:
    return o.get_value_element_as_str() if not o.is_sweep_override() else str(value)


def _node(cfg: DictConfig, key: str) -> Any:
    """The node at dotted `key` (not resolved), or None."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node.keys():
            return None
        node = node._get_node(part)
    return node


def _exists(cfg: DictConfig, key: str) -> bool:
    return _node(cfg, key) is not None


def _typed_parent(cfg: DictConfig, key: str) -> bool:
    """Whether the node that would hold `key` is a schema dataclass (closed: no new keys)."""
    parent = _node(cfg, key.rsplit(".", 1)[0]) if "." in key else cfg
    return parent is None or OmegaConf.get_type(parent) not in (dict, None)


def _type_problem(cfg: DictConfig, key: str, error: OmegaConfBaseException) -> str:
    """`expected <type>` for a value the schema field at `key` cannot take."""
    node = _node(cfg, key)
    expected = TYPE_WORDS.get(type(node).__name__)
    if expected and node._is_optional():
        expected += " or null"
    message = _first_line(error)
    if "is not Optional" in message:
        return f"needs {expected or 'a value'}, not null"
    return f"expected {expected}" if expected else message


def _unknown(cfg: DictConfig, key: str) -> str:
    """`key: no such key; did you mean ...?`, with the nearest existing keys."""
    near = _nearest(cfg, key)
    if near:
        return f"{key}: no such key; did you mean {' or '.join(near)}?"
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    node = _node(cfg, parent) if parent else cfg
    if isinstance(node, DictConfig):
        keys = [k for k in node.keys() if parent or k != "hydra"]
        return f"{key}: no such key; {parent or 'the config'} has {', '.join(map(str, keys))}"
    return f"{key}: no such key ({parent} is a value, not a group of keys)"


def _nearest(cfg: DictConfig, key: str) -> list[str]:
    """The existing keys nearest to `key` (difflib's ratio, those within 0.05 of the best): the
    same path with a part corrected, else keys whose last part is close to key's last part."""
    every = [k for k in _leaf_keys(cfg) if key.startswith("hydra.") or not k.startswith("hydra.")]
    found = _closest(key, [k for k in every if k.count(".") == key.count(".")])
    if not found:
        last = key.rsplit(".", 1)[-1]
        found = _closest(last, [k for k in every], part=lambda k: k.rsplit(".", 1)[-1])
    return found[:3]


def _closest(word: str, keys: list[str], part=lambda k: k) -> list[str]:
    scored = [(difflib.SequenceMatcher(None, word, part(k)).ratio(), k) for k in keys]
    best = max((r for r, _ in scored), default=0.0)
    return [k for r, k in sorted(scored, reverse=True) if r >= max(0.75, best - 0.05)]


def _leaf_keys(node: DictConfig, prefix: str = "") -> Iterator[str]:
    """Every dotted key of a config: its values and its groups of keys."""
    for k in node.keys():
        child, name = node._get_node(k), f"{prefix}{k}"
        yield name
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            yield from _leaf_keys(child, name + ".")


def resolution_problems(cfg: DictConfig) -> list[str]:
    """Every value of cfg (Hydra's own node aside) that cannot be read: a mandatory value left
    unset (???), an interpolation that does not resolve or resolves to the wrong type."""
    out = []
    for key in _leaf_keys(cfg):
        node = _node(cfg, key)
        if key == "hydra" or key.startswith("hydra.") or isinstance(node, DictConfig):
            continue
        if "${hydra:" in str(node._value()):  # resolves only inside a Hydra job
            continue
        try:
            OmegaConf.select(cfg, key, throw_on_missing=True)
        except MissingMandatoryValue:
            out.append(f"{key} needs a value: set {key}=...")
        except OmegaConfBaseException as e:
            out.append(f"{key}={_node(cfg, key)._value()}: cannot be resolved ({_first_line(e)})")
    return out


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def compose_train(overrides: list[str]) -> TrainConfig:
    """conf/train.yaml composed with Hydra overrides (`experiment=...`, `runtime.fsdp=true`, ...)
    as `python -m pipeline.train` composes them, for tools that build a run's pieces without
    running it. Raises ConfigError naming every problem of the overrides (pipeline.config.cli)."""
    composed = check_command_line("train", overrides, RENAMED)
    if composed is None:  # HYDRA_FULL_ERROR=1: Hydra's own errors
        register_configs()
        with initialize_config_dir(conf_dir(), version_base="1.3"):
            composed = compose("train", overrides=overrides)
    with open_dict(composed):
        composed.pop("hydra", None)
    return to_dataclass(composed)
