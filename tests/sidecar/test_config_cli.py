"""Configuration: YAML plus flags, errors naming the field; the real CLI exits 2 on them."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

import pytest

from adamwatch_sidecar import cli
from adamwatch_sidecar.config import ConfigError, SidecarConfig, build_config, load_config
from .sidecar_testlib import ROOT


def write(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    path = tmp_path / "sidecar.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults() -> None:
    cfg = build_config()
    assert cfg == SidecarConfig()
    assert cfg.listen == "unix:///var/run/adamwatch/adamwatch.sock"
    assert cfg.metrics_address == "0.0.0.0:9400"
    assert cfg.retention_seconds == 300.0 and cfg.control_address is None and cfg.remediation == {}


def test_file_values_and_flags_override_the_file(tmp_path: pathlib.Path) -> None:
    token = tmp_path / "token"
    token.write_text("secret\n")
    path = write(tmp_path, f"""
        listen: tcp://127.0.0.1:9409
        metrics_address: 127.0.0.1:9400
        control_address: 127.0.0.1:9401
        control_token_file: {token}
        retention_seconds: 30
        max_frame_bytes: 65536
        log_level: debug
        remediation:
          reduce_lr: {{factor: 0.5}}
    """)
    cfg = load_config(path, {"retention_seconds": 5.0, "listen": None})
    assert cfg.listen == "tcp://127.0.0.1:9409"  # a flag that was not given keeps the file's value
    assert cfg.retention_seconds == 5.0
    assert cfg.max_frame_bytes == 65536 and cfg.log_level == "DEBUG"
    assert cfg.control_address == "127.0.0.1:9401" and cfg.control_token_file == str(token)
    assert cfg.remediation == {"reduce_lr": {"factor": 0.5}}


@pytest.mark.parametrize(
    "text, message",
    [
        ("retention_seconds: abc", "retention_seconds: must be a number >= 0, got 'abc'"),
        ("retention_seconds: -1", "retention_seconds: must be a number >= 0, got -1"),
        ("retention_seconds: true", "retention_seconds: must be a number >= 0, got True"),
        ("listen: http://x", "listen: endpoint 'http://x': scheme must be unix:// or tcp://"),
        ("metrics_address: 9400", "metrics_address: must be HOST:PORT"),
        ("control_address: 'localhost:http'", "control_address: port 'http' is not a number"),
        ("control_token_file: /nonexistent/token", "control_token_file: cannot read '/nonexistent/token'"),
        ("max_frame_bytes: 10", "max_frame_bytes: must be an integer from 1024"),
        ("log_level: loud", "log_level: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'loud'"),
        ("remediation: [1, 2]", "remediation: must be a mapping, got list"),
        ("retention: 5", "retention: unknown key"),
        ("- a list", "config: top level of"),
        ("listen: [unclosed", "config: "),
    ],
)
def test_bad_fields_are_named(tmp_path: pathlib.Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert str(info.value).startswith(message)


def test_missing_config_file_is_a_config_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match="config: cannot read"):
        load_config(tmp_path / "nope.yaml")


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adamwatch_sidecar.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_the_real_cli_exits_2_naming_the_field(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "retention_seconds: abc\n")
    result = run_cli("--config", str(path), "--metrics-address", "127.0.0.1:0")
    assert result.returncode == 2
    assert "config error: retention_seconds: must be a number >= 0, got 'abc'" in result.stderr


def test_the_real_cli_rejects_unknown_keys_and_bad_flags(tmp_path: pathlib.Path) -> None:
    result = run_cli("serve", "--config", str(write(tmp_path, "colour: blue\n")))
    assert result.returncode == 2 and "config error: colour: unknown key" in result.stderr
    result = run_cli("--retention-seconds", "abc")
    assert result.returncode == 2 and "--retention-seconds" in result.stderr
    result = run_cli("--listen", "nowhere")
    assert result.returncode == 2 and "config error: listen:" in result.stderr


def test_a_bad_remediation_policy_exits_2_naming_the_field(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("adamwatch_sidecar.remediation.wiring")
    result = run_cli("--config", str(write(tmp_path, "remediation: {enabled: 'yes'}\n")),
                     "--listen", "tcp://127.0.0.1:0", "--metrics-address", "127.0.0.1:0")
    assert result.returncode == 2
    assert "config error: remediation.enabled:" in result.stderr


def test_console_script_is_installed_and_prints_help() -> None:
    script = pathlib.Path(sys.executable).with_name("adamwatch-sidecar")
    if not script.exists():
        pytest.skip("the console script is not installed in this environment")
    result = subprocess.run([str(script), "serve", "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "--metrics-address" in result.stdout


def test_subcommand_modules_register_their_parsers(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "aw_fake_subcommand.py").write_text(textwrap.dedent("""
        def register_cli(subparsers):
            parser = subparsers.add_parser("hello")
            parser.add_argument("name")
            parser.set_defaults(func=lambda args: 7 if args.name == "world" else 1)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", ["aw_fake_subcommand"])
    assert cli.main(["hello", "world"]) == 7


def test_serve_is_the_default_command() -> None:
    args = cli.build_parser().parse_args(["serve", "--listen", "tcp://127.0.0.1:1"])
    assert args.func is cli._serve
    with pytest.raises(SystemExit) as info:
        cli.main(["--listen", "tcp://127.0.0.1:1", "--bogus"])
    assert info.value.code == 2


def test_the_readme_configuration_table_is_generated_from_the_fields() -> None:
    from adamwatch_sidecar.config import render_markdown_reference

    readme = (ROOT / "sidecar" / "README.md").read_text()
    start = readme.index("<!-- config-reference:start -->\n") + len("<!-- config-reference:start -->\n")
    end = readme.index("<!-- config-reference:end -->")
    assert readme[start:end] == render_markdown_reference(), "regenerate the table in sidecar/README.md"


def test_bad_paths_exit_2_naming_the_field(tmp_path: pathlib.Path) -> None:
    """Audit path, control token file and socket path are checked at start-up, not by a traceback later."""
    a_file = tmp_path / "plain"
    a_file.write_text("x")
    cases = [
        (f"remediation: {{audit: {{path: {a_file}/audit.jsonl}}}}\n", "remediation.audit.path:"),
        (f"remediation: {{audit: {{path: {tmp_path}}}}}\n", "remediation.audit.path:"),
        (f"control_token_file: {tmp_path}\n", "control_token_file:"),
        (f"listen: unix://{a_file}/sock/a.sock\n", "listen:"),
        (f"secret_file: {tmp_path}\n", "secret_file:"),
        ("socket_mode: 0666\n", "socket_mode:"),
    ]
    for text, field_name in cases:
        result = run_cli("--config", str(write(tmp_path, text)), "--metrics-address", "127.0.0.1:0")
        assert result.returncode == 2, (text, result.stderr)
        assert f"config error: {field_name}" in result.stderr, (text, result.stderr)
        assert "Traceback" not in result.stderr
