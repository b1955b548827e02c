"""`synapse keys` and `synapse usage`: manage a running gateway's virtual keys and read its usage ledger.

Every command but `keys hash` calls the gateway's LiteLLM-compatible admin routes (`/key/*`,
`/usage/report`) through the one HTTP helper in `cli.py`; `keys hash` makes a key offline for the
config file, so a GitOps setup never needs the management API.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import click
from pydantic import ValidationError

from .config.access import DeclaredKey, KeySettings
from .config.units import parse_duration

F = TypeVar("F", bound=Callable[..., Any])

_GROUPS = ("key", "model", "day", "backend")
# Columns of a usage row that name a group rather than count something.
_LABELS = {"key_id", "key", "model", "day", "backend"}
_NUMBER = re.compile(r"^\d+(\.\d+)?$")
_SHOWN_ONCE = "This is the only time the key is shown: the gateway keeps only its hash. Store it now."


def _period(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        try:
            KeySettings(budget_duration=value)
        except ValidationError:
            raise click.BadParameter(f"{value!r} is not a budget period; write e.g. 1h, 1d, 7d, 30d or 1mo") from None
    return value


def _lifetime(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is None or value == "never":
        return None if value is None else "permanent"  # LiteLLM's word for "no expiry"
    try:
        seconds = parse_duration(value) if not _NUMBER.match(value) else None
    except ValueError:
        seconds = None
    if not isinstance(seconds, float) or seconds <= 0:
        raise click.BadParameter(f"{value!r} is not a lifetime; write e.g. 24h, 30d or 52w (or `never`)")
    return value


def _metadata(_ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]) -> dict[str, str] | None:
    pairs = [item.partition("=") for item in value]
    bad = [item for item, (name, sep, _) in zip(value, pairs, strict=True) if not name or not sep]
    if bad:
        raise click.BadParameter(f"{bad[0]!r} is not KEY=VALUE; write e.g. --metadata team=ml")
    return {name: text for name, _, text in pairs} or None


_KEY_OPTIONS = (
    click.option("--alias", "key_alias", help="A name for people: who or what uses the key."),
    click.option("--model", "models", multiple=True, metavar="NAME",
                 help="A model the key may use, or a glob (`llama-*`); repeat for more. Default: every model."),
    click.option("--rpm", "rpm_limit", type=click.IntRange(min=1), help="Requests per minute."),
    click.option("--tpm", "tpm_limit", type=click.IntRange(min=1), help="Tokens (in + out) per minute."),
    click.option("--parallel", "max_parallel_requests", type=click.IntRange(min=1), help="Requests in flight at once."),
    click.option("--budget", "max_budget", type=click.FloatRange(min=0),
                 help="Money per budget period, priced by `auth.prices`."),
    click.option("--token-budget", type=click.IntRange(min=0), help="Tokens (in + out) per budget period."),
    click.option("--budget-period", "budget_duration", callback=_period, metavar="PERIOD",
                 help="When budgets reset: 1d, 7d, 30d, 1mo... Default: never."),
    click.option("--expires-in", "duration", callback=_lifetime, metavar="DURATION",
                 help="The key's lifetime from now: 24h, 30d... (`never` removes an expiry). Default: none."),
    click.option("--scope", type=click.Choice(["inference", "admin"]),
                 help="inference (default): call models; admin: manage keys and call the admin routes."),
    click.option("--metadata", multiple=True, metavar="KEY=VALUE", callback=_metadata,
                 help="Free-form labels; repeat for more (on update, they replace the old ones)."),
    click.option("--default-max-tokens", type=click.IntRange(min=1),
                 help="What a request that names no max_tokens reserves for its answer."),
)


def _key_options(command: F) -> F:
    """The key's settings, spelled as options; their names are the API's field names."""
    for option in reversed(_KEY_OPTIONS):
        command = option(command)
    return command


def _connection(command: F) -> F:
    """Where the gateway is and the key to call it with."""
    command = click.option("--api-key", envvar="SYNAPSE_API_KEY", default=None, metavar="KEY",
                           help="An admin key or the master key [env SYNAPSE_API_KEY; default: SYNAPSE_MASTER_KEY].")(
        command)
    return click.option("--url", default="http://127.0.0.1:4000", envvar="SYNAPSE_URL", show_default=True,
                        help="The running gateway [env SYNAPSE_URL].")(command)


def _json_flag(command: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print the gateway's answer as JSON.")(command)


def _call(url: str, api_key: str | None, method: str, path: str, *, body: dict[str, Any] | None = None,
          query: dict[str, str] | None = None) -> dict[str, Any]:
    # Imported here: cli.py imports this module to register its commands.
    from .cli import admin_request

    return admin_request(url, method, path, body=body, query=query, api_key=api_key)


def key_body(options: dict[str, Any]) -> dict[str, Any]:
    """The `/key/generate` or `/key/update` body for the options given (those left out are not sent)."""
    body = {name: value for name, value in options.items() if value is not None and value != ()}
    if "models" in body:
        body["models"] = list(body["models"])
    return body


@click.group()
def keys() -> None:
    """Manage virtual API keys.

    All but `keys hash` act on a running gateway; `keys hash` makes a key for the config file.
    """


@keys.command("create")
@_key_options
@_json_flag
@_connection
def create(url: str, api_key: str | None, as_json: bool, **options: Any) -> None:
    """Make a key and print it once.

    The key is shown with its id, which is what the other commands take.
    """
    created = _call(url, api_key, "POST", "/key/generate", body=key_body(options))
    _print_new_key(created, "New key", as_json)


@keys.command("list")
@_json_flag
@_connection
def list_keys(url: str, api_key: str | None, as_json: bool) -> None:
    """List keys: scope, models, limits, budget, state."""
    answer = _call(url, api_key, "GET", "/key/list", query={"return_full_object": "true"})
    if as_json:
        click.echo(json.dumps(answer, indent=2))
    elif not answer["keys"]:
        click.echo("no keys yet; `synapse keys create --alias NAME` makes one")
    else:
        click.echo(key_table(answer["keys"], time.time()))


@keys.command("show")
@click.argument("key_id", metavar="ID")
@_json_flag
@_connection
def show(key_id: str, url: str, api_key: str | None, as_json: bool) -> None:
    """Show every setting of key ID, and its spend.

    The spend is what the key used in its current budget period.
    """
    answer = _call(url, api_key, "GET", "/key/info", query={"key": key_id})
    click.echo(json.dumps(answer, indent=2) if as_json else describe_key(answer["info"], time.time()))


@keys.command("update")
@click.argument("key_id", metavar="ID")
@_key_options
@_json_flag
@_connection
def update(key_id: str, url: str, api_key: str | None, as_json: bool, **options: Any) -> None:
    """Change settings of key ID; the others are kept."""
    body = key_body(options)
    if not body:
        raise click.UsageError("nothing to change: give at least one setting, e.g. --rpm 60 (see --help)")
    answer = _call(url, api_key, "POST", "/key/update", body={"key": key_id, **body})
    click.echo(json.dumps(answer, indent=2) if as_json else describe_key(answer, time.time()))
    _print_ignored(answer)


@keys.command("revoke")
@click.argument("key_id", metavar="ID")
@_connection
def revoke(key_id: str, url: str, api_key: str | None) -> None:
    """Block key ID; `keys unrevoke` undoes it.

    Every request with the key is refused from now on, on every replica within `auth.key_sync_interval`.
    """
    answer = _call(url, api_key, "POST", "/key/block", body={"key": key_id})
    click.echo(f"{answer['key_id']}: revoked; `synapse keys unrevoke {answer['key_id']}` undoes it")


@keys.command("unrevoke")
@click.argument("key_id", metavar="ID")
@_connection
def unrevoke(key_id: str, url: str, api_key: str | None) -> None:
    """Let a revoked key ID in again."""
    answer = _call(url, api_key, "POST", "/key/unblock", body={"key": key_id})
    click.echo(f"{answer['key_id']}: {_state(answer, time.time())}")


@keys.command("rotate")
@click.argument("key_id", metavar="ID")
@_json_flag
@_connection
def rotate(key_id: str, url: str, api_key: str | None, as_json: bool) -> None:
    """Give key ID a new secret and print it once.

    The id, settings and spend stay; the old secret stops working now.
    """
    rotated = _call(url, api_key, "POST", "/key/regenerate", body={"key": key_id})
    _print_new_key(rotated, "New secret for key", as_json)


@keys.command("delete")
@click.argument("key_ids", metavar="ID...", nargs=-1, required=True)
@_connection
def delete(key_ids: tuple[str, ...], url: str, api_key: str | None) -> None:
    """Delete keys for good; `keys revoke` can be undone.

    Their usage stays in the ledger.
    """
    answer = _call(url, api_key, "POST", "/key/delete", body={"keys": list(key_ids)})
    for deleted in answer["deleted_keys"]:
        click.echo(f"{deleted}: deleted")


@keys.command("hash")
@_key_options
def hash_command(**options: Any) -> None:
    """Make a key offline, for the config file.

    Prints the key once, and the `auth.keys` entry to commit (GitOps): its id and hash, never the key.
    No gateway is called; the key works once a gateway loads the config.
    """
    from .access.keys import hash_key, new_key

    key_id, key = new_key()
    entry = declared_entry(key_id, hash_key(key), key_body(options), time.time())
    click.echo(f"Key {key_id}. {_SHOWN_ONCE}\n\n    {key}\n")
    click.echo("Add this to the config (it holds only the id and the hash, so it is safe to commit):\n")
    click.echo(config_snippet(entry), nl=False)


def declared_entry(key_id: str, key_hash: str, body: dict[str, Any], now: float) -> dict[str, Any]:
    """An `auth.keys` entry, checked by the same model the config loader uses; the API's `duration`
    becomes the config's `expires_at`."""
    body = dict(body)
    lifetime = body.pop("duration", None)
    if lifetime not in (None, "permanent"):
        body["expires_at"] = int(now + float(parse_duration(lifetime)))  # type: ignore[arg-type]
    try:
        declared = DeclaredKey.model_validate({"id": key_id, "hash": key_hash, **body})
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise click.UsageError(f"`{where}`: {error['msg'].split('|')[0]}") from None
    return {"id": key_id, "hash": key_hash, **declared.model_dump(exclude_defaults=True, exclude={"id", "hash"})}


def config_snippet(entry: dict[str, Any]) -> str:
    """`auth: keys: [entry]` as YAML, its expiry annotated as a date for the people who review it."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    item = CommentedMap(entry)
    if "expires_at" in entry:
        item["expires_at"] = int(entry["expires_at"])
        item.yaml_add_eol_comment(_iso_time(entry["expires_at"]), "expires_at")
    yaml = YAML()
    yaml.width = 4096  # the hash stays on its line
    yaml.indent(mapping=2, sequence=4, offset=2)
    text = io.StringIO()
    yaml.dump({"auth": {"keys": [item]}}, text)
    return text.getvalue()


def _iso_time(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _print_new_key(answer: dict[str, Any], what: str, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    alias = f" ({answer['key_alias']})" if answer.get("key_alias") else ""
    click.echo(f"{what} {answer['key_id']}{alias}. {_SHOWN_ONCE}\n\n    {answer['key']}\n")
    click.echo(f"`synapse keys show {answer['key_id']}` shows its settings.")
    _print_ignored(answer)


def _print_ignored(answer: dict[str, Any]) -> None:
    if answer.get("ignored_fields"):
        click.echo(f"note: ignored (no meaning in Synapse): {', '.join(answer['ignored_fields'])}", err=True)


def _state(key: dict[str, Any], now: float) -> str:
    if key.get("revoked"):
        return "revoked"
    expires = _moment_of(key.get("expires"))
    return "expired" if expires is not None and expires <= now else "active"


def _moment_of(iso: str | None) -> float | None:
    return None if not iso else datetime.fromisoformat(iso).timestamp()


def _short(number: float) -> str:
    """1500 -> 1.5k, 2000000 -> 2M: limits and budgets fit a table column."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(number) >= size:
            return f"{number / size:.1f}".removesuffix(".0") + suffix
    return f"{number:g}"


def _budget(key: dict[str, Any]) -> str:
    parts = []
    if key.get("max_budget") is not None:
        parts.append(f"{key.get('spend') or 0:.2f}/{key['max_budget']:.2f}")
    if key.get("token_budget") is not None:
        parts.append(f"{_short(key.get('spend_tokens') or 0)}/{_short(key['token_budget'])} tok")
    if not parts:
        return "-"
    return f"{', '.join(parts)} {'per ' + key['budget_duration'] if key.get('budget_duration') else 'total'}"


def key_table(listed: Sequence[dict[str, Any]], now: float) -> str:
    """The `keys list` table."""
    headers = ["ID", "ALIAS", "SCOPE", "MODELS", "LIMITS rpm/tpm/par", "BUDGET spent/limit", "EXPIRES", "STATE"]
    rows = []
    for key in listed:
        limits = "/".join(_short(n) if n is not None else "-" for n in
                          (key.get("rpm_limit"), key.get("tpm_limit"), key.get("max_parallel_requests")))
        models = ", ".join(key.get("models") or []) or "all"
        rows.append([key["key_id"], key.get("key_alias") or "-", key.get("scope", "inference"),
                     models if len(models) <= 32 else models[:31] + "…", limits, _budget(key),
                     (key.get("expires") or "never")[:10], _state(key, now)])
    return table(headers, rows, numeric=set())


def describe_key(key: dict[str, Any], now: float) -> str:
    """Every field of a key object, one per line; fields this CLI does not know are shown too."""
    lines = [("key id", str(key.get("key_id"))), ("state", _state(key, now))]
    for name, value in key.items():
        if name in {"key_id", "token", "key_name", "blocked", "revoked", "key"}:
            continue  # the id again, or in `state`
        lines.append((name.replace("_", " "), "all" if name == "models" and not value else _plain(value)))
    width = max(len(label) for label, _ in lines)
    return "\n".join(f"{label:<{width}}  {text}" for label, text in lines)


def _plain(value: object) -> str:
    if value is None or value in ([], {}):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(str(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]) -> str:
    """Columns two spaces apart, as wide as their widest cell; the `numeric` ones right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.rjust(w) if i in numeric else cell.ljust(w)
                         for i, (cell, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join(line(cells) for cells in [headers, *rows])


def _bound(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    return moment(value, time.time())


@click.command("usage")
@click.option("--since", default="7d", show_default=True, callback=_bound,
              help="From: a time ago (7d, 24h), an ISO date (2026-11-01) or unix seconds.")
@click.option("--until", default=None, callback=_bound, help="To (same forms). Default: now.")
@click.option("--by", "group_by", default="key,model,day", show_default=True, metavar="GROUPS",
              help=f"Sum by any of {', '.join(_GROUPS)} (comma-separated; empty: one total).")
@click.option("--key", metavar="ID", help="Only this key's usage (`master`: the master key's).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@click.option("--csv", "as_csv", is_flag=True, help="Print the rows as CSV, with a header line.")
@_connection
def usage(url: str, api_key: str | None, **report: Any) -> None:
    """Show usage: requests, tokens, cost by key, model, day.

    Reads the usage ledger of a running gateway; rows are summed by the --by groups.
    """
    as_json, as_csv = report.pop("as_json"), report.pop("as_csv")
    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    groups = [g.strip() for g in report["group_by"].split(",") if g.strip()]
    unknown = [g for g in groups if g not in _GROUPS]
    if unknown:
        raise click.BadParameter(f"cannot group by {', '.join(unknown)}; use any of {', '.join(_GROUPS)}",
                                 param_hint="--by")
    query = {name: value for name, value in report.items() if value is not None}
    rows = _call(url, api_key, "GET", "/usage/report", query={**query, "group_by": ",".join(groups)})["data"]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif as_csv:
        click.echo(usage_csv(rows), nl=False)
    elif not rows:
        click.echo("no requests in this period; widen it with --since (e.g. --since 30d)")
    else:
        click.echo(usage_table(rows))


def moment(value: str | None, now: float) -> str | None:
    """A report bound as the gateway reads it: `7d` (7 days before `now`) becomes unix seconds; unix
    seconds and ISO dates pass as they are (the gateway reads a date without a zone as UTC)."""
    if value is None or _NUMBER.match(value):
        return value
    try:
        ago = parse_duration(value)
    except ValueError:
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a time; write e.g. 7d (7 days ago), 24h, 2026-11-01 "
                                     "or 2026-11-01T12:00:00Z") from None
        return value
    return str(int(now - float(ago)))  # type: ignore[arg-type]


def _usage_columns(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The group columns (first) and the number columns, in the order the gateway sent them."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    labels = [n for n in names if n in _LABELS or any(isinstance(row.get(n), str) for row in rows)]
    return labels, [n for n in names if n not in labels]


def _total(rows: Sequence[dict[str, Any]], metric: str) -> float | None:
    values: list[tuple[float | None, float]] = [(row.get(metric), row.get("requests") or 0) for row in rows]
    if metric.startswith("avg_"):  # an average over requests: weighted by each row's requests
        weight = sum(count for value, count in values if value is not None)
        return sum(value * count for value, count in values if value is not None) / weight if weight else None
    return sum(value for value, _ in values if value is not None)


def _number(metric: str, value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        digits = 4 if metric == "cost" else 0 if metric.startswith("avg_") else 1
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def usage_table(rows: Sequence[dict[str, Any]]) -> str:
    """The report as a table: group columns, then numbers right-aligned; a total row when there are several."""
    labels, metrics = _usage_columns(rows)
    cells = [[_plain(row.get(n)) for n in labels] + [_number(m, row.get(m)) for m in metrics] for row in rows]
    if len(rows) > 1:
        first = ["TOTAL"] + [""] * (len(labels) - 1) if labels else []
        cells.append(first + [_number(m, _total(rows, m)) for m in metrics])
    headers = [name.removesuffix("_id").replace("_", " ").upper() for name in labels + metrics]
    return table(headers, cells, numeric=set(range(len(labels), len(headers))))


def usage_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The report as CSV: a header line of the gateway's column names, then one line per row."""
    if not rows:
        return ""
    labels, metrics = _usage_columns(rows)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=labels + metrics, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()
