"""The `synapse` command: serve the gateway, check a config, and drive a running gateway's admin routes."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import click

from . import __version__
from .accesslog import setup_logging
from .cli_access import keys, usage
from .config import ConfigError, LoadedConfig, check_file, load_config
from .web.serve import is_loopback


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="synapse")
def main() -> None:
    """Synapse: one OpenAI-compatible endpoint in front of your inference servers."""


main.add_command(keys)
main.add_command(usage)


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="SYNAPSE_CONFIG",
              help="Config file (native or LiteLLM format). Default: the embedded default.")
@click.option("--host", default=None, help="Address to listen on (default: server.host, 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port to listen on (default: server.port, 4000).")
@click.option("--log-format", type=click.Choice(["json", "text"]), default="json", show_default=True,
              help="json: one object per line, for log collectors; text: for reading in a terminal.")
def serve(config_path: str | None, host: str | None, port: int | None, log_format: str) -> None:
    """Run the gateway."""
    loaded = _load_or_exit(config_path)
    settings = loaded.config.server
    host, port = host or settings.host, settings.port if port is None else port
    exposed = open_access_warning(host, port, auth_required=loaded.config.auth.required)
    if exposed:
        click.echo(exposed, err=True)
    setup_logging(settings.log_level, json_lines=log_format == "json")
    import logging

    log = logging.getLogger("synapse.config")
    for warning in loaded.warnings:
        log.warning("%s", warning.render())
    from .server import run

    run(loaded, host, port)


def open_access_warning(host: str, port: int, *, auth_required: bool) -> str | None:
    """The framed warning `serve` prints when it listens beyond this machine without requiring a key.

    A log line scrolls by in a collector; this lands on the terminal of whoever started the gateway.
    """
    if auth_required or is_loopback(host):
        return None
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [
        f"WARNING: Synapse listens on {address} and requires no API key.",
        f"Anyone who can reach {address} can use every model, spend your GPUs",
        "and read /metrics (model names, traffic, backends). To require a key,",
        "add this to the config and export SYNAPSE_MASTER_KEY:",
        "",
        "  auth:",
        "    mode: required",
        "    master_key: os.environ/SYNAPSE_MASTER_KEY",
        "",
        "Then give each user a key: `synapse keys create --alias NAME`.",
        "Only this machine needs access? Serve with --host 127.0.0.1.",
    ]
    width = max(len(line) for line in lines)
    rule = "!" * (width + 4)
    return "\n".join([rule, *(f"! {line:<{width}} !" for line in lines), rule])


@main.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
def check(config_file: str) -> None:
    """Validate CONFIG_FILE; print each problem with its line and a fix; exit 1 on any error."""
    problems = check_file(config_file)
    errors = [p for p in problems if p.severity == "error"]
    for problem in problems:
        click.echo(problem.render(), err=problem.severity == "error")
    if errors:
        click.echo(f"{config_file}: {len(errors)} error(s), {len(problems) - len(errors)} warning(s)", err=True)
        sys.exit(1)
    click.echo(f"{config_file}: OK ({len(problems)} warning(s))")


@main.group()
def engine() -> None:
    """Run one of Synapse's own engines (the gateway starts them itself in the default stack)."""


@engine.command("audio")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Audio engine config (YAML). Default: the packaged Whisper tiny.en and Piper voice.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8300, show_default=True)
def audio_engine(config_path: str | None, host: str, port: int) -> None:
    """Speech-to-text (faster-whisper) and text-to-speech (Piper) behind the OpenAI audio API."""
    from .audio.config import AudioEngineConfig
    from .audio.server import run_audio_engine

    setup_logging("info")
    try:
        config = AudioEngineConfig.from_yaml(config_path) if config_path else AudioEngineConfig.packaged_default()
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(problem.render(), err=True)
        sys.exit(2)
    run_audio_engine(config, host, port)


@main.command("engines")
@click.option("--url", default="http://127.0.0.1:4000", envvar="SYNAPSE_URL", show_default=True,
              help="The running gateway.")
def list_engines(url: str) -> None:
    """List the managed engines of a running gateway: state, PID, uptime, restarts, memory."""
    engines = admin_request(url, "GET", "/admin/engines")["engines"]
    if not engines:
        click.echo("no managed engines (a backend gets one with `managed: {command: [...]}`)")
        return
    click.echo(f"{'NAME':<20} {'STATE':<9} {'PID':>7} {'UPTIME':>9} {'RESTARTS':>8} {'MEMORY':>9}  LAST ERROR")
    for e in engines:
        memory = f"{e['rss_bytes'] / 2**20:.0f} MiB" if e["rss_bytes"] else "-"
        uptime = f"{e['uptime_s']:.0f}s" if e["uptime_s"] is not None else "-"
        click.echo(f"{e['name']:<20} {e['state']:<9} {e['pid'] or '-':>7} {uptime:>9} {e['restarts']:>8} "
                   f"{memory:>9}  {e['last_error'] or ''}")


@main.group()
def gpu() -> None:
    """GPU time-sharing of a running gateway: status, and waking or sleeping a backend by hand."""


@gpu.command("status")
@click.option("--url", default="http://127.0.0.1:4000", envvar="SYNAPSE_URL", show_default=True)
def gpu_status(url: str) -> None:
    """Each unit's state, memory held, last use, requests in flight and queue; each device's budget."""
    status = admin_request(url, "GET", "/admin/gpu")
    for device in status["devices"]:
        click.echo(f"device {device['device']}: {device['used'] / 2**30:.1f} of {device['budget'] / 2**30:.1f} GiB")
    click.echo(f"{'UNIT':<28} {'DRIVER':<11} {'STATE':<9} {'HELD':>9} {'IDLE':>8} {'IN FLIGHT':>9} {'QUEUE':>6}")
    for u in status["units"]:
        click.echo(f"{u['unit']:<28} {u['driver']:<11} {u['state']:<9} {u['memory_held'] / 2**30:>6.1f}GiB "
                   f"{u['idle_s']:>7.0f}s {u['in_flight']:>9} {u['queue']:>6}")


@gpu.command("wake")
@click.argument("name")
@click.option("--url", default="http://127.0.0.1:4000", envvar="SYNAPSE_URL", show_default=True)
def gpu_wake(name: str, url: str) -> None:
    """Make NAME resident now (evicting idle units if needed)."""
    click.echo(f"{name}: {admin_request(url, 'POST', f'/admin/gpu/{_segment(name)}/wake')['state']}")


@gpu.command("sleep")
@click.argument("name")
@click.option("--url", default="http://127.0.0.1:4000", envvar="SYNAPSE_URL", show_default=True)
def gpu_sleep(name: str, url: str) -> None:
    """Put NAME to sleep now, if it has nothing in flight."""
    click.echo(f"{name}: {admin_request(url, 'POST', f'/admin/gpu/{_segment(name)}/sleep')['state']}")


def _segment(name: str) -> str:
    """A unit name as one URL path segment (Ollama units are `backend/model:tag`)."""
    return urllib.parse.quote(name, safe="")


def admin_request(url: str, method: str, path: str, *, body: dict[str, Any] | None = None,
                  query: dict[str, str] | None = None, api_key: str | None = None) -> dict[str, Any]:
    """Call an admin route of a running gateway; exit 1 with its error message when it fails.

    The bearer is `api_key` (--api-key), else SYNAPSE_API_KEY (an admin key), else SYNAPSE_MASTER_KEY.
    A POST always sends a JSON body, even `{}`: without a master key the gateway takes admin calls only
    as local JSON.
    """
    headers = {"Content-Type": "application/json"}
    key = api_key or os.environ.get("SYNAPSE_API_KEY") or os.environ.get("SYNAPSE_MASTER_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body or {}).encode() if method != "GET" else None
    target = f"{url.rstrip('/')}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise click.BadParameter(f"{url!r} is not a gateway URL; write e.g. http://127.0.0.1:4000",
                                 param_hint="--url")
    request = urllib.request.Request(target, method=method, headers=headers, data=data)
    try:
        with urllib.request.urlopen(request, timeout=1800) as answer:
            result: dict[str, Any] = json.load(answer)
            return result
    except urllib.error.HTTPError as exc:
        click.echo(f"synapse: {_error_message(exc)}", err=True)
        if exc.code == 401:
            click.echo("synapse: set SYNAPSE_MASTER_KEY to the gateway's master key, or SYNAPSE_API_KEY "
                       "(or --api-key) to an admin key", err=True)
    except (urllib.error.URLError, OSError) as exc:
        click.echo(f"synapse: cannot reach the gateway at {url} ({getattr(exc, 'reason', exc)}); start it with "
                   "`synapse serve`, or point --url (SYNAPSE_URL) at it", err=True)
    except ValueError:
        click.echo(f"synapse: {url}{path} answered with something that is not JSON; is --url a Synapse gateway?",
                   err=True)
    sys.exit(1)


def _error_message(exc: urllib.error.HTTPError) -> str:
    """The gateway's error message, or the HTTP status when the answer is not the error envelope."""
    try:
        body = json.loads(exc.read() or b"{}")
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
    except (ValueError, AttributeError):
        message = None
    return str(message or f"HTTP {exc.code} {exc.reason}")


def _load_or_exit(config_path: str | None) -> LoadedConfig:
    try:
        if config_path is None:
            from .defaults import default_config

            return default_config()
        return load_config(config_path)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(problem.render(), err=True)
        click.echo("synapse: the configuration has errors; `synapse check FILE` shows them all", err=True)
        sys.exit(2)
