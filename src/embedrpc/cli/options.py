"""Flags, EMBEDRPC_* environment variables and --config files: the one place that parses them.

Precedence: command line > environment > config file > built-in default.
"""

from __future__ import annotations

import argparse
import builtins
import os
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "EMBEDRPC_"


def parse_bool(text: str) -> bool:
    """A flag or environment value: 1/true/yes/on or 0/false/no/off/'' (any case)."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_int(text: str) -> int:
    """A whole number (argparse's message names it "int", as for int itself)."""
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected a whole number, got {text!r}") from None


def parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None


parse_int.__name__, parse_float.__name__ = "int", "float"

# What a config file's value may be, by the option's kind: TOML has its own types, and a
# quoted number is a string (an option of another kind takes only "auto", where its
# default is "auto"). str options take any single value, as the command line does.
_FILE_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float),
                                            "bool": (bool,)}
_FILE_KIND_NAMES = {"int": "a whole number", "float": "a number", "bool": "true or false"}


def _takes_auto(kind: str, shown: str | None) -> bool:
    """Whether a (non-text) option whose default is "auto" (--frontends) takes that word
    for it, as unset."""
    return kind != "str" and (shown or "").startswith("auto")


def key_list(text: str) -> list[str]:
    """'k1,k2' → ['k1', 'k2']; '' → []. The server checks each key (without echoing it)."""
    return [part.strip() for part in text.split(",")] if text.strip() else []


class ExtendKeys(argparse.Action):
    """--api-key K1 --api-key K2,K3 adds up; keys on the command line replace the
    environment's or the config file's."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        current = getattr(namespace, self.dest)
        setattr(namespace, self.dest, [*([] if current is self.default else current), *values])


@dataclass
class ConfigFile:
    """Option values from a TOML file, by dest; add_option() takes out what it uses."""

    name: str = ""
    values: dict[str, Any] = field(default_factory=dict)


def load_config(path: str) -> ConfigFile:
    """Read a flat TOML file of serve options; keys may use dashes or underscores."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ValueError(f"--config {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"--config {path}: not valid TOML: {exc}") from exc
    values = {key.replace("-", "_"): value for key, value in data.items()}
    if "config" in values:
        raise ValueError(f"--config {path}: a config file cannot name another one")
    return ConfigFile(path, values)


def config_path(argv: Sequence[str]) -> str | None:
    """`serve --config FILE` (or EMBEDRPC_CONFIG), found before the real parse."""
    if not argv or argv[0] != "serve":
        return None
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv[1:])
    return known.config or os.environ.get(ENV_PREFIX + "CONFIG") or None


class EnvParser(argparse.ArgumentParser):
    """add_option() reads its default from EMBEDRPC_<DEST>, else from the config file,
    and says so in --help."""

    def __init__(self, *args: Any, config: ConfigFile | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config = config or ConfigFile()

    def add_option(self, *flags: str, type: Callable[[str], Any] = str, default: Any = None,
                   help: str = "", secret: bool = False, default_text: str | None = None,
                   kind: str = "str", **kwargs: Any) -> None:
        """secret: the value (an API key) is never shown in --help or an error;
        default_text: how --help says the default, where the value would not; kind: what
        a config file's value must be ("int", "float", "bool"; "str": any single value)."""
        dest = kwargs.pop("dest", None) or flags[0].lstrip("-").replace("-", "_")
        env = ENV_PREFIX + dest.upper()
        from_file = self.config.values.pop(dest, None)
        if env in os.environ:
            source, text = env, os.environ[env]
        elif from_file is not None:
            source = f"{self.config.name}: {dest.replace('_', '-')}"
            if (type is key_list or getattr(type, "__name__", "") == "key_list") and \
                    isinstance(from_file, list) and all(isinstance(v, str) for v in from_file):
                from_file = ",".join(from_file)  # a TOML array of strings, for list options
            if isinstance(from_file, dict | list) or (isinstance(from_file, bool)
                                                       and type is not parse_bool):
                shown_value = "" if secret else f" = {from_file!r}"
                self.error(f"{source}{shown_value}: expected a single {type.__name__} value")
            # (A boolean for a numeric option is refused just above.)
            wanted = _FILE_TYPES.get(kind)
            auto = _takes_auto(kind, default_text)
            if wanted and not isinstance(from_file, wanted) and not (
                    auto and isinstance(from_file, str) and from_file.lower() == "auto"):
                shown_value = "" if secret else f" = {from_file!r}"
                extra = ', or "auto"' if auto else ""
                given = {str: "string", int: "integer", float: "float"}.get(
                    builtins.type(from_file), "value of another type")
                self.error(f"{source}{shown_value}: expected {_FILE_KIND_NAMES[kind]}{extra}, "
                           f"not a TOML {given}")
            text = from_file if isinstance(from_file, str) else str(from_file)
        else:
            source = text = None
        if source is not None:
            try:
                default = type(text)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                self.error(f"{source}: {exc}" if secret else f"{source}={text!r}: {exc}")
            choices = kwargs.get("choices")
            if choices is not None and default not in choices:
                self.error(f"{source}={text!r}: use one of {', '.join(map(str, choices))}")
        if default_text is not None:
            shown = f"default: {default_text}; "
        else:
            shown = "" if default is None or secret else f"default: {default}; "
        self.add_argument(*flags, dest=dest, type=type, default=default,
                          help=f"{help} ({shown}env {env})", **kwargs)


# --------------------------------------------------------------------------- config classes


@dataclass(frozen=True)
class ConfigOption:
    """One option of a config dataclass, as the command line sees it."""

    group: str  # the attribute of the config holding the option's dataclass
    name: str  # the field's name
    flag: str  # "--max-batch-tokens"
    dest: str  # "max_batch_tokens" (the environment variable is EMBEDRPC_ + DEST)
    kind: str  # "bool", "int", "float", "str" or "keys"
    optional: bool  # None is a value (empty in the environment or a file: None)
    default: Any
    help: str
    shown: str | None
    choices: tuple[str, ...] | None
    secret: bool

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


def config_options(config_class: type) -> list[ConfigOption]:
    """The options of a config made of option groups (embedrpc.server.config.ServeConfig),
    in definition order, from the fields' types and metadata."""
    import dataclasses
    import typing

    found = []
    for group in dataclasses.fields(config_class):
        group_class = typing.get_type_hints(config_class)[group.name]
        hints = typing.get_type_hints(group_class)
        for f in dataclasses.fields(group_class):
            meta = f.metadata
            if not meta.get("cli", False):
                continue
            hint = hints[f.name]
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            optional = type(None) in typing.get_args(hint)
            base = args[0] if optional else hint
            kind = ("keys" if typing.get_origin(hint) is tuple else
                    {bool: "bool", int: "int", float: "float", str: "str"}[base])
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            flag = meta.get("flag") or f.name.replace("_", "-")
            found.append(ConfigOption(
                group=group.name, name=f.name, flag=f"--{flag}", dest=flag.replace("-", "_"),
                kind=kind, optional=optional, default=default, help=meta["help"],
                shown=meta.get("shown"), choices=meta.get("choices"),
                secret=meta.get("secret", False)))
    return found


def _parser_of(option: ConfigOption) -> Callable[[str], Any]:
    base: Callable[[str], Any] = {"bool": parse_bool, "int": parse_int, "float": parse_float,
                                  "str": str, "keys": key_list}[option.kind]
    if not option.optional:
        return base
    auto = _takes_auto(option.kind, option.shown)

    def optional(text: str) -> Any:  # an empty variable or value: unset
        if text == "" or (auto and text.lower() == "auto"):
            return None
        try:
            return base(text)
        except ValueError:
            if not auto:
                raise
            # argparse would say "invalid int value", leaving out the word it also takes
            raise argparse.ArgumentTypeError(
                f"expected {_FILE_KIND_NAMES[option.kind]} or \"auto\", got {text!r}") from None

    optional.__name__ = getattr(base, "__name__", option.kind)
    return optional


def add_config_options(parser: EnvParser, config_class: type) -> list[ConfigOption]:
    """Add every option of `config_class` to `parser` (flags, environment, --config file)."""
    options = config_options(config_class)
    for o in options:
        kwargs: dict[str, Any] = {"dest": o.dest, "choices": o.choices}
        if o.kind == "bool":
            kwargs.update(nargs="?", const=True, metavar="BOOL")
        if o.kind == "keys":
            kwargs.update(action=ExtendKeys)
        default = list(o.default) if o.kind == "keys" else o.default
        parser.add_option(o.flag, type=_parser_of(o), default=default, help=o.help,
                          secret=o.secret, default_text=o.shown, kind=o.kind, **kwargs)
    return options


def config_from_namespace(config_class: type, namespace: argparse.Namespace) -> Any:
    """The config `add_config_options` made flags for, from the parsed namespace."""
    values = {}
    for o in config_options(config_class):
        value = getattr(namespace, o.dest)
        values[o.name] = tuple(value) if o.kind == "keys" else value
    return config_class.of(**values)
