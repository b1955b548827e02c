"""`synapse keys` and `synapse usage`: keys made offline load as config, options are checked before any
call, reports print as tables, CSV and JSON, and the commands drive a real gateway's key routes."""

from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import openai
import pytest
from click.testing import CliRunner, Result
from openai.types.chat import ChatCompletionMessageParam
from ruamel.yaml import YAML

from synapse_gateway.access.keys import key_id_of, matches_hash
from synapse_gateway.cli import main, open_access_warning
from synapse_gateway.cli_access import key_table, moment, usage_csv, usage_table
from synapse_gateway.config import parse_config
from synapse_gateway.config.access import DeclaredKey
from tests.conftest import GatewayFactory, dead_url
from tests.fakes.vllm import FakeVLLM
from tests.gateway_harness import ThreadGateway

MASTER = "sk-test-master"
KEY = re.compile(r"sk-syn-[0-9a-z]{12}-[A-Za-z0-9_-]+")
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]


@pytest.fixture(autouse=True)
def _no_gateway_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own gateway settings must not leak into these tests."""
    for name in ("SYNAPSE_MASTER_KEY", "SYNAPSE_API_KEY", "SYNAPSE_URL"):
        monkeypatch.delenv(name, raising=False)


def synapse(*args: str, **env: str) -> Result:
    return CliRunner(env=env).invoke(main, list(args))


def _secret(key: str) -> str:
    """What follows `sk-syn-<id>-` (it may hold dashes itself)."""
    return key[len("sk-syn-") + 13:]


def _hashed(*options: str) -> tuple[str, str, dict[str, Any]]:
    """`synapse keys hash`: the key it printed, the YAML snippet, and the snippet parsed."""
    result = synapse("keys", "hash", *options)
    assert result.exit_code == 0, result.output
    keys = KEY.findall(result.output)
    snippet = result.output[result.output.index("auth:\n"):]
    return keys[0], snippet, YAML(typ="safe").load(snippet)


# keys hash (offline)


def test_keys_hash_prints_a_key_once_and_an_entry_with_its_id_and_hash() -> None:
    key, snippet, parsed = _hashed("--alias", "ci: deploys", "--model", "llama-*", "--model", "qwen*",
                                   "--rpm", "60", "--budget-period", "1mo", "--token-budget", "1000000",
                                   "--expires-in", "30d", "--metadata", "team=ml")
    entry = parsed["auth"]["keys"][0]
    assert matches_hash(key, entry["hash"]), "the hash in the snippet is the printed key's"
    assert key_id_of(key) == entry["id"]
    assert _secret(key) not in snippet, "the secret must never reach a file that gets committed"
    declared = DeclaredKey.model_validate(entry)
    assert (declared.key_alias, declared.models, declared.rpm_limit) == ("ci: deploys", ["llama-*", "qwen*"], 60)
    assert (declared.budget_duration, declared.token_budget, declared.metadata) == ("1mo", 1_000_000, {"team": "ml"})
    assert declared.expires_at is not None and abs(declared.expires_at - (time.time() + 30 * 86400)) < 60
    assert "#" in snippet.split("expires_at:")[1].splitlines()[0], "the expiry is annotated as a date"


def test_keys_hash_makes_a_new_key_each_time() -> None:
    first, _, _ = _hashed()
    second, _, parsed = _hashed()
    assert first != second
    assert parsed["auth"]["keys"][0] == {"id": key_id_of(second), "hash": parsed["auth"]["keys"][0]["hash"]}, \
        "no settings given: only the id and the hash"


def test_a_hashed_key_calls_a_gateway_that_loads_its_snippet(vllm: FakeVLLM) -> None:
    key, snippet, _ = _hashed("--model", "llama-*")
    config = snippet + f"backends:\n  v: {{url: '{vllm.url}'}}\n"
    assert parse_config(config, "gitops.yaml").config.auth.required, "a declared key turns authentication on"
    with ThreadGateway(config) as gw, openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as c:
        assert c.chat.completions.create(model="llama-3.2-8b", messages=MESSAGES).choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            c.with_options(api_key=key[:-1] + ("A" if key[-1] != "A" else "B")).models.list()


# options are checked before anything is sent


@pytest.mark.parametrize(("args", "complaint"), [
    (["keys", "create", "--rpm", "0"], "0 is not in the range x>=1"),
    (["keys", "create", "--budget-period", "fortnight"], "1mo"),
    (["keys", "create", "--expires-in", "soon"], "24h, 30d"),
    (["keys", "create", "--metadata", "team"], "KEY=VALUE"),
    (["keys", "create", "--scope", "root"], "'root' is not one of 'inference', 'admin'"),
    (["keys", "update", "abc"], "nothing to change"),
    (["keys", "delete"], "Missing argument"),
    (["keys", "hash", "--budget", "-1"], "x>=0"),
    (["usage", "--json", "--csv"], "one of --json and --csv"),
    (["usage", "--by", "key,team"], "cannot group by team"),
    (["usage", "--since", "yesterday"], "7d (7 days ago)"),
    (["keys", "list", "--url", "localhost:4000"], "write e.g. http://127.0.0.1:4000"),
])
def test_bad_options_are_refused_before_any_call(args: list[str], complaint: str) -> None:
    result = synapse(*args, SYNAPSE_URL=dead_url())  # a call would exit 1 with "cannot reach"
    assert result.exit_code == 2, result.output
    assert complaint in result.output
    assert "cannot reach" not in result.output


def test_an_unreachable_gateway_is_named_with_how_to_start_it() -> None:
    url = dead_url()
    result = synapse("keys", "list", "--url", url)
    assert result.exit_code == 1
    assert f"cannot reach the gateway at {url}" in result.output and "synapse serve" in result.output


# report formatting

ROWS: list[dict[str, Any]] = [
    {"requests": 3, "errors": 1, "tokens_in": 1200, "tokens_out": 30, "cost": 0.0125, "avg_latency_ms": 100.0,
     "key_id": "aaaaaaaaaaaa", "model": "llama-3.2-8b", "day": "2026-11-29"},
    {"requests": 1, "errors": 0, "tokens_in": 5, "tokens_out": 7, "cost": 0.5, "avg_latency_ms": 500.0,
     "key_id": "bbbbbbbbbbbb", "model": "qwen", "day": "2026-11-30"},
]


def test_the_usage_table_puts_groups_first_right_aligns_numbers_and_totals() -> None:
    header, first, second, total = usage_table(ROWS).splitlines()
    assert header.split() == ["KEY", "MODEL", "DAY", "REQUESTS", "ERRORS", "TOKENS", "IN", "TOKENS", "OUT", "COST",
                              "AVG", "LATENCY", "MS"]
    assert first.split()[:3] == ["aaaaaaaaaaaa", "llama-3.2-8b", "2026-11-29"]
    assert total.split() == ["TOTAL", "4", "1", "1,205", "37", "0.5125", "200"], "latency: weighted by requests"
    # Right-aligned: every number column ends where its header ends.
    for column in ("REQUESTS", "TOKENS IN", "COST"):
        end = header.index(column) + len(column)
        assert all(line[end - 1] != " " and (len(line) == end or line[end] == " ")
                   for line in (first, second, total)), column


def test_one_row_has_no_total_and_missing_values_show_as_a_dash() -> None:
    # Requests without a key (authentication off) have no key id: still a group column, not a number.
    lines = usage_table([{"requests": 2, "avg_latency_ms": None, "key_id": None, "model": "m"}]).splitlines()
    assert lines == ["KEY  MODEL  REQUESTS  AVG LATENCY MS", "-    m             2               -"]


def test_usage_csv_has_a_header_and_the_gateways_values() -> None:
    text = usage_csv(ROWS)
    assert text.splitlines()[0] == "key_id,model,day,requests,errors,tokens_in,tokens_out,cost,avg_latency_ms"
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert parsed == [{name: str(value) for name, value in row.items()} for row in ROWS]
    assert usage_csv([]) == ""


def test_usage_json_prints_the_rows(vllm: FakeVLLM, start_gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = start_gateway(_keyed(vllm, tmp_path))
    result = synapse("usage", "--json", SYNAPSE_URL=gw.url, SYNAPSE_MASTER_KEY=MASTER)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == []


def test_since_reads_a_time_ago_and_passes_dates_and_unix_seconds() -> None:
    now = 1_800_000_000.0
    assert moment("7d", now) == str(int(now) - 7 * 86400)
    assert moment("90m", now) == str(int(now) - 5400)
    assert moment("2026-11-01", now) == "2026-11-01"
    assert moment("1700000000", now) == "1700000000"
    with pytest.raises(click.BadParameter):
        moment("last tuesday", now)


def test_the_key_table_shows_limits_budget_and_state() -> None:
    now = time.time()
    base = {"scope": "inference", "models": [], "revoked": False, "expires": None, "spend": 0, "spend_tokens": 0}
    listed = [
        {**base, "key_id": "aaaaaaaaaaaa", "key_alias": "ci", "models": ["llama-*"], "rpm_limit": 60,
         "tpm_limit": 100_000, "max_budget": 5, "spend": 1.25, "budget_duration": "30d"},
        {**base, "key_id": "bbbbbbbbbbbb", "revoked": True, "token_budget": 2_000_000, "spend_tokens": 1500},
        {**base, "key_id": "cccccccccccc", "expires": "2020-01-01T00:00:00Z", "max_parallel_requests": 4},
    ]
    header, active, revoked, expired = key_table(listed, now).splitlines()
    assert header.split()[:4] == ["ID", "ALIAS", "SCOPE", "MODELS"]
    assert active.split() == ["aaaaaaaaaaaa", "ci", "inference", "llama-*", "60/100k/-", "1.25/5.00", "per",
                              "30d", "never", "active"]
    assert revoked.split()[-5:] == ["1.5k/2M", "tok", "total", "never", "revoked"]
    assert expired.split()[3:] == ["all", "-/-/4", "-", "2020-01-01", "expired"]


# serve's warning


@pytest.mark.parametrize(("host", "required", "warned"), [
    ("0.0.0.0", False, True), ("::", False, True), ("192.168.1.20", False, True), ("gpu-box.lan", False, True),
    ("127.0.0.1", False, False), ("127.8.0.1", False, False), ("::1", False, False), ("[::1]", False, False),
    ("localhost", False, False), ("0.0.0.0", True, False),
])
def test_an_open_gateway_off_this_machine_is_warned_about(host: str, required: bool, warned: bool) -> None:
    warning = open_access_warning(host, 4000, auth_required=required)
    assert (warning is not None) == warned
    if warning:
        assert (f"[{host}]:4000" if ":" in host else f"{host}:4000") in warning
        assert "every model" in warning and "/metrics" in warning
        lines = warning.splitlines()
        assert len({len(line) for line in lines}) == 1 and set(lines[0]) == {"!"}, "a framed block"
        inside = [line[2:-2].rstrip() for line in lines[1:-1]]
        fix = inside.index("  auth:")
        assert inside[fix:fix + 3] == ["  auth:", "    mode: required", "    master_key: os.environ/SYNAPSE_MASTER_KEY"]


def test_serve_prints_the_warning_for_the_config_it_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[tuple[str, int]] = []
    monkeypatch.setattr("synapse_gateway.server.run", lambda _loaded, host, port: served.append((host, port)))
    open_config, keyed_config = tmp_path / "open.yaml", tmp_path / "keyed.yaml"
    open_config.write_text("backends:\n  v: {url: 'http://127.0.0.1:9'}\n")
    keyed_config.write_text("auth: {mode: required, master_key: sk-x}\nbackends:\n  v: {url: 'http://127.0.0.1:9'}\n")
    warned = synapse("serve", "--config", str(open_config), "--host", "0.0.0.0", "--port", "4100")
    quiet = synapse("serve", "--config", str(keyed_config), "--host", "0.0.0.0", "--port", "4100")
    assert served == [("0.0.0.0", 4100), ("0.0.0.0", 4100)]
    assert "0.0.0.0:4100" in warned.stderr and "WARNING" in warned.stderr
    assert "WARNING" not in quiet.stderr


# against a real gateway


def _keyed(vllm: FakeVLLM, tmp_path: Path) -> dict[str, Any]:
    return {"auth": {"mode": "required", "master_key": MASTER}, "database_url": f"sqlite:///{tmp_path / 's.db'}",
            "usage": {"flush_interval": 0.05}, "backends": {"v": {"url": vllm.url}}}


@pytest.fixture
def gateway(vllm: FakeVLLM, start_gateway: GatewayFactory, tmp_path: Path) -> Iterator[ThreadGateway]:
    yield start_gateway(_keyed(vllm, tmp_path))


def _admin(gw: ThreadGateway, *args: str) -> Result:
    result = synapse(*args, SYNAPSE_URL=gw.url, SYNAPSE_MASTER_KEY=MASTER)
    assert result.exit_code == 0, result.output
    return result


def _chat(gw: ThreadGateway, key: str) -> str | None:
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as c:
        return c.chat.completions.create(model="llama-3.2-8b", messages=MESSAGES).choices[0].message.content


def test_create_prints_a_working_key_once_and_list_and_show_describe_it(gateway: ThreadGateway) -> None:
    created = _admin(gateway, "keys", "create", "--alias", "ci", "--model", "llama-*", "--rpm", "60",
                     "--budget", "5", "--budget-period", "30d", "--expires-in", "30d", "--metadata", "team=ml")
    [key] = KEY.findall(created.output)
    key_id = key_id_of(key)
    assert key_id is not None and f"New key {key_id} (ci)" in created.output and "only time" in created.output
    assert _chat(gateway, key)
    listed = _admin(gateway, "keys", "list").output.splitlines()
    assert listed[1].split()[:5] == [key_id, "ci", "inference", "llama-*", "60/-/-"]
    assert listed[1].split()[-1] == "active"
    shown = _admin(gateway, "keys", "show", key_id).output
    assert re.search(r"^metadata\s+\{\"team\": \"ml\"\}$", shown, re.MULTILINE), shown
    assert re.search(r"^budget duration\s+30d$", shown, re.MULTILINE), shown
    assert _secret(key) not in listed[1] + shown
    as_json = json.loads(_admin(gateway, "keys", "show", key_id, "--json").output)
    assert as_json["info"]["max_budget"] == 5 and as_json["info"]["models"] == ["llama-*"]


def test_update_revoke_rotate_and_delete_reach_the_gateway(gateway: ThreadGateway) -> None:
    created = json.loads(_admin(gateway, "keys", "create", "--json").output)
    key, key_id = created["key"], created["key_id"]
    updated = _admin(gateway, "keys", "update", key_id, "--tpm", "5000", "--alias", "renamed").output
    assert re.search(r"^tpm limit\s+5000$", updated, re.MULTILINE) and "renamed" in updated
    _admin(gateway, "keys", "revoke", key_id)
    with pytest.raises(openai.AuthenticationError):
        _chat(gateway, key)
    _admin(gateway, "keys", "unrevoke", key_id)
    assert _chat(gateway, key)
    [rotated] = KEY.findall(_admin(gateway, "keys", "rotate", key_id).output)
    assert rotated != key and key_id_of(rotated) == key_id
    with pytest.raises(openai.AuthenticationError):
        _chat(gateway, key)
    assert _chat(gateway, rotated)
    assert _admin(gateway, "keys", "delete", key_id).output == f"{key_id}: deleted\n"
    assert key_id not in _admin(gateway, "keys", "list").output
    missing = synapse("keys", "show", key_id, SYNAPSE_URL=gateway.url, SYNAPSE_MASTER_KEY=MASTER)
    assert missing.exit_code == 1 and "no such key" in missing.stderr


def test_the_api_key_option_wins_over_the_master_key_variable(gateway: ThreadGateway) -> None:
    admin = json.loads(_admin(gateway, "keys", "create", "--scope", "admin", "--json").output)["key"]
    wrong = synapse("keys", "list", SYNAPSE_URL=gateway.url, SYNAPSE_MASTER_KEY="sk-wrong")
    assert wrong.exit_code == 1
    assert "invalid API key" in wrong.stderr and "SYNAPSE_MASTER_KEY" in wrong.stderr, "what to do next"
    assert synapse("keys", "list", "--api-key", admin, SYNAPSE_URL=gateway.url,
                   SYNAPSE_MASTER_KEY="sk-wrong").exit_code == 0
    assert synapse("keys", "list", SYNAPSE_URL=gateway.url, SYNAPSE_MASTER_KEY="sk-wrong",
                   SYNAPSE_API_KEY=admin).exit_code == 0


def _usage_once(gw: ThreadGateway, requests: int) -> list[dict[str, Any]]:
    """`usage --json` once the ledger holds `requests` (it is written in batches, off the request path)."""
    deadline = time.monotonic() + 5
    while True:
        rows: list[dict[str, Any]] = json.loads(_admin(gw, "usage", "--json", "--by", "key,model").output)
        if sum(row["requests"] for row in rows) >= requests or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_usage_reports_what_a_key_used(gateway: ThreadGateway) -> None:
    key = json.loads(_admin(gateway, "keys", "create", "--json").output)["key"]
    for _ in range(3):
        _chat(gateway, key)
    rows = _usage_once(gateway, requests=3)
    assert [(r["key_id"], r["model"], r["requests"]) for r in rows] == [(key_id_of(key), "llama-3.2-8b", 3)]
    table = _admin(gateway, "usage", "--by", "key", "--key", str(key_id_of(key))).output.splitlines()
    assert table[0].split()[:2] == ["KEY", "REQUESTS"] and table[1].split()[:2] == [key_id_of(key), "3"]
    lines = _admin(gateway, "usage", "--csv", "--by", "model", "--since", "2020-01-01").output.splitlines()
    assert lines[0].startswith("model,requests,") and lines[1].startswith("llama-3.2-8b,3,")
    future = _admin(gateway, "usage", "--since", "2999-01-01").output
    assert "no requests in this period" in future
