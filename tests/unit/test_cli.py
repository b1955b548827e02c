"""`synapse check` prints located problems and exits 1 on errors; `synapse --version` answers."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from synapse_gateway import __version__
from synapse_gateway.cli import main


def test_check_ok_and_warnings(tmp_path: Path) -> None:
    path = tmp_path / "litellm.yaml"
    path.write_text("model_list:\n  - model_name: m\n    litellm_params: {model: openai/m, api_base: "
                    "'http://h:1/v1', api_key: k}\ngeneral_settings: {master_key: x, database_url: y}\n")
    result = CliRunner().invoke(main, ["check", str(path)])
    assert result.exit_code == 0
    assert f"{path}:4: warning: general_settings" in result.output
    assert "OK (1 warning(s))" in result.output


def test_check_errors_exit_1(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("backends:\n  v: {url: 'ftp://h'}\n")
    result = CliRunner().invoke(main, ["check", str(path)])
    assert result.exit_code == 1
    assert f"{path}:2: error: backends.v.url" in result.output
    assert "fix: write e.g. http://127.0.0.1:8000" in result.output


def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert __version__ in result.output


def test_serve_refuses_a_broken_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("fallback: nowhere\n")
    result = CliRunner().invoke(main, ["serve", "--config", str(path)])
    assert result.exit_code == 2
    assert "fallback 'nowhere' is not a backend" in result.output
