"""Configuration of `embedrpc serve`: flags, EMBEDRPC_* variables, a TOML --config file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from embedrpc.cli import build_parser, parse_args


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
    assert ns.port == 50051 and ns.metrics_port == 0  # built-in defaults
    # The file may also come from EMBEDRPC_CONFIG.
    monkeypatch.setenv("EMBEDRPC_CONFIG", config)
    assert parse_args(["serve"]).workers == 3


@pytest.mark.parametrize(("text", "message"), [
    ("max-batch-tokenz = 4", "unknown option(s) max-batch-tokenz"),
    ('workers = "many"', "workers='many'"),
    ("workers = 2.5", "workers='2.5'"),
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
