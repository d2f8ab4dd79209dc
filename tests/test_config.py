"""Configuration of `embedrpc serve`: flags, EMBEDRPC_* variables, a TOML --config file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from embedrpc.cli import build_parser, parse_args
from embedrpc.cli.options import config_from_namespace, config_options
from embedrpc.server.config import GROUPS, OPTION_GROUPS, ServeConfig

FLAG_TABLE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
# A value for each kind of option, as text (flag, variable, file) and as parsed.
SAMPLES = {"int": ("4096", 4096), "float": ("2.5", 2.5), "bool": ("true", True),
           "keys": ("k" * 20, ("k" * 20,))}


def test_help_names_the_environment_variable_of_every_serve_option() -> None:
    result = subprocess.run([sys.executable, "-m", "embedrpc", "serve", "--help"],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    text = result.stdout
    # Each option's entry starts on a line "  --flag ..." and runs to the next one.
    entries = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    documented = {}
    for entry in entries:
        flag = re.match(r"\s*(--[a-z0-9-]+)", entry)
        if flag and flag.group(1) != "--help":
            documented[flag.group(1)] = " ".join(entry.split())
    serve = next(a for a in build_parser()._subparsers._group_actions  # type: ignore[union-attr]
                 if a.dest == "command").choices["serve"]
    flags = {f for a in serve._actions for f in a.option_strings if f.startswith("--")}
    assert set(documented) == flags - {"--help"}
    for flag, entry in documented.items():
        env = "EMBEDRPC_" + flag[2:].replace("-", "_").upper()
        assert f"env {env})" in entry, f"{flag}: help does not name {env}: {entry!r}"
    for flag in ("--config", "--log-format", "--metrics-port", "--metrics-host", "--http-port"):
        assert flag in documented


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "embedrpc.toml"
    path.write_text(text)
    return str(path)


def test_precedence_command_line_then_environment_then_file_then_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path, '\n'.join([
        'workers = 3',                 # overridden on the command line
        'max-batch-size = 16',         # overridden by the environment
        'max_wait_ms = 2.5',           # underscores work as well as dashes
        'log-format = "json"',
        'http-port = 8080',
        'backend = "fake"',
    ]))
    monkeypatch.setenv("EMBEDRPC_MAX_BATCH_SIZE", "32")
    monkeypatch.delenv("EMBEDRPC_WORKERS", raising=False)
    ns = parse_args(["serve", "--config", config, "--workers", "5"])
    assert ns.workers == 5
    assert ns.max_batch_size == 32
    assert ns.max_wait_ms == 2.5
    assert (ns.log_format, ns.http_port, ns.backend) == ("json", 8080, "fake")
    assert ns.port == 50051 and ns.metrics_port is None  # built-in defaults (metrics off)
    # The file may also come from EMBEDRPC_CONFIG.
    monkeypatch.setenv("EMBEDRPC_CONFIG", config)
    assert parse_args(["serve"]).workers == 3


@pytest.mark.parametrize(("text", "message"), [
    ("max-batch-tokenz = 4", "unknown option(s) max-batch-tokenz"),
    ('workers = "many"', "workers = 'many': expected a whole number"),
    ("workers = 2.5", "workers = 2.5: expected a whole number"),
    # TOML's types are kept: a quoted number is a string (outside review: it was taken)
    ('max-inputs = "5"', "max-inputs = '5': expected a whole number"),
    ('frontends = "many"', "frontends = 'many': expected a whole number, or \"auto\""),
    ('max-wait-ms = "2"', "max-wait-ms = '2': expected a number"),
    ('auth-health = "yes"', "auth-health = 'yes': expected true or false"),
    ('log-format = "xml"', "use one of text, json"),
    ("port = true", "expected a single int"),
    ("workers = [1, 2]", "expected a single int"),
    ('config = "other.toml"', "cannot name another"),
    ("workers = ", "not valid TOML"),
])
def test_bad_config_files_are_refused_with_the_reason(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["serve", "--config", write(tmp_path, text)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_auto_is_a_value_where_it_is_the_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--frontends' default is "auto" (docs/configuration.md): the word is taken for it
    on the command line, in the environment and in a file; a file's numbers are taken as
    TOML numbers (an int for a float option too)."""
    assert parse_args(["serve", "--frontends", "auto"]).frontends is None
    assert parse_args(["serve", "--frontends", "3"]).frontends == 3
    config = write(tmp_path, 'frontends = "auto"\nmax-wait-ms = 2\nmax-inputs = 7\n')
    ns = parse_args(["serve", "--config", config])
    assert ns.frontends is None and ns.max_wait_ms == 2.0 and ns.max_inputs == 7
    monkeypatch.setenv("EMBEDRPC_FRONTENDS", "AUTO")
    assert parse_args(["serve"]).frontends is None


def test_a_bad_value_where_auto_is_the_default_names_auto(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """argparse's own "invalid int value" left out the word --frontends also takes; an
    empty value is the default (docs/configuration.md)."""
    with pytest.raises(SystemExit):
        parse_args(["serve", "--frontends", "abc"])
    assert "argument --frontends: expected a whole number or \"auto\", got 'abc'" in \
        capsys.readouterr().err
    monkeypatch.setenv("EMBEDRPC_FRONTENDS", "2.5")
    with pytest.raises(SystemExit):
        parse_args(["serve"])
    assert "EMBEDRPC_FRONTENDS='2.5': expected a whole number or \"auto\", got '2.5'" in \
        capsys.readouterr().err
    monkeypatch.delenv("EMBEDRPC_FRONTENDS")
    assert parse_args(["serve", "--frontends", ""]).frontends is None


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["serve", "--config", str(tmp_path / "nope.toml")])
    assert "nope.toml" in capsys.readouterr().err


def test_environment_values_are_checked_against_choices(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("EMBEDRPC_LOG_FORMAT", "yaml")
    with pytest.raises(SystemExit):
        parse_args(["serve"])
    assert "EMBEDRPC_LOG_FORMAT='yaml': use one of text, json" in capsys.readouterr().err


def _sample(option) -> tuple[str, object]:
    named = {"attention_kernel": ("flash", "flash"), "log_level": ("debug", "DEBUG"),
             "frontends": ("3", 3)}
    if option.name in named:
        return named[option.name]
    if option.choices:
        return option.choices[-1], option.choices[-1]
    return SAMPLES.get(option.kind, ("some-value", "some-value"))


def test_every_option_is_a_flag_a_variable_and_a_file_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each option defined once (server/config.py) reaches ServeConfig by all three ways.
    options = config_options(ServeConfig)
    assert {o.name for o in options} == {n for n, g in OPTION_GROUPS.items()
                                         if GROUPS[g].__dataclass_fields__[n].metadata["cli"]}
    for option in options:
        text, value = _sample(option)
        literal = text if option.kind in ("int", "float", "bool") else repr(text)
        ways = {
            "flag": (["serve", option.flag, text], {}),
            "variable": (["serve"], {option.env: text}),
            "file": (["serve", "--config", write(tmp_path, f"{option.flag[2:]} = {literal}")],
                     {}),
        }
        for way, (argv, env) in ways.items():
            with monkeypatch.context() as m:
                for name, env_value in env.items():
                    m.setenv(name, env_value)
                config = config_from_namespace(ServeConfig, parse_args(argv))
            assert config.get(option.name) == value, (option.flag, way)


def test_serve_config_takes_options_by_name_and_refuses_others() -> None:
    config = ServeConfig.of(max_batch_tokens=1024, port=0, api_keys=("x" * 20,))
    assert config.batching.max_batch_tokens == 1024 and config.network.port == 0
    assert config.get("api_keys") == ("x" * 20,)
    with pytest.raises(TypeError, match="unknown serve option 'max_batch_tokenz'"):
        ServeConfig.of(max_batch_tokenz=1)
    with pytest.raises(ValueError, match="--workers must be at least 1"):
        ServeConfig.of(workers=0)


def test_ports_zero_means_any_free_port_and_unset_means_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # One meaning everywhere: --port, --http-port and --metrics-port take 0 for "any free
    # port"; the optional ones are off unless given.
    config = config_from_namespace(ServeConfig, parse_args(["serve"]))
    assert (config.network.http_port, config.network.metrics_port) == (None, None)
    config = config_from_namespace(ServeConfig, parse_args(
        ["serve", "--metrics-port", "0", "--http-port", "0"]))
    assert (config.network.http_port, config.network.metrics_port) == (0, 0)
    monkeypatch.setenv("EMBEDRPC_HTTP_PORT", "")  # an empty variable: unset
    assert config_from_namespace(ServeConfig, parse_args(["serve"])).network.http_port is None


def test_the_documented_flag_table_lists_every_serve_option() -> None:
    text = FLAG_TABLE.read_text(encoding="utf-8")
    table = text.split("`embedrpc serve` flags", 1)[1].split("\n\n|", 1)[1].split("\n\n", 1)[0]
    listed = set()
    for row in table.splitlines()[2:]:
        first_cell = row.split("|")[1]
        listed |= set(re.findall(r"`(--[a-z0-9-]+)`", first_cell))
    assert listed == {o.flag for o in config_options(ServeConfig)} | {"--config"}
