"""`synapse check` prints located problems and exits 1 on errors; `synapse --version` answers."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web
from click.testing import CliRunner

from synapse_gateway import __version__
from synapse_gateway.cli import main
from tests.fakes.server import BackgroundServer


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


class _AdminStub:
    """Records what `synapse gpu` sends and answers like the gateway's admin routes."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None, str | None]] = []
        app = web.Application()
        app.router.add_post("/admin/gpu/{unit:.+}/{action:wake|sleep}", self.action)
        self.server = BackgroundServer(app)

    async def action(self, request: web.Request) -> web.Response:
        self.seen.append((request.raw_path, request.match_info["unit"], request.content_type,
                          request.headers.get("Authorization")))
        if request.match_info["action"] == "sleep":
            return web.json_response({"error": {"message": "ollama/llama3:latest has 2 requests in flight",
                                                "type": "invalid_request_error", "param": None,
                                                "code": "backend_busy"}}, status=409)
        return web.json_response({"unit": request.match_info["unit"], "state": "resident"})


def test_gpu_commands_encode_names_send_json_and_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    stub = _AdminStub()
    url = stub.server.start()
    try:
        monkeypatch.setenv("SYNAPSE_MASTER_KEY", "sk-m")
        woke = CliRunner().invoke(main, ["gpu", "wake", "ollama/llama3:latest", "--url", url])
        busy = CliRunner().invoke(main, ["gpu", "sleep", "ollama/llama3:latest", "--url", url])
    finally:
        stub.server.stop()
    assert woke.exit_code == 0 and "ollama/llama3:latest: resident" in woke.output
    assert busy.exit_code == 1
    assert "has 2 requests in flight" in busy.output
    raw_path, unit, content_type, authorization = stub.seen[0]
    assert raw_path == "/admin/gpu/ollama%2Fllama3%3Alatest/wake"
    assert (unit, content_type, authorization) == ("ollama/llama3:latest", "application/json", "Bearer sk-m")
