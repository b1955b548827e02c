"""The admin guard without a master key, decided from the peer address, the Host header and the body type."""

from __future__ import annotations

from unittest import mock

import pytest
from aiohttp.test_utils import make_mocked_request

from synapse_gateway.auth import _only_from_this_machine, presented_key
from synapse_gateway.errors import Forbidden


def _request(method: str, peer: str, host: str, content_type: str | None = None) -> object:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (peer, 50000) if name == "peername" else default
    headers = {"Host": host, **({"Content-Type": content_type} if content_type else {})}
    return make_mocked_request(method, "/admin/gpu", headers=headers, transport=transport)


@pytest.mark.parametrize(("peer", "host"), [("127.0.0.1", "localhost:4000"), ("::1", "[::1]:4000"),
                                            ("127.0.0.5", "127.0.0.1")])
def test_local_peers_addressing_localhost_pass(peer: str, host: str) -> None:
    _only_from_this_machine(_request("GET", peer, host))  # type: ignore[arg-type]


@pytest.mark.parametrize(("peer", "host"), [("10.1.2.3", "localhost:4000"), ("192.168.1.9", "127.0.0.1:4000"),
                                            ("127.0.0.1", "evil.example:4000"), ("127.0.0.1", "synapse.lan")])
def test_other_peers_or_names_are_refused(peer: str, host: str) -> None:
    with pytest.raises(Forbidden):
        _only_from_this_machine(_request("GET", peer, host))  # type: ignore[arg-type]


def test_a_change_must_be_json() -> None:
    with pytest.raises(Forbidden, match="application/json"):
        _only_from_this_machine(_request("POST", "127.0.0.1", "localhost", "text/plain"))  # type: ignore[arg-type]
    _only_from_this_machine(_request("POST", "127.0.0.1", "localhost", "application/json"))  # type: ignore[arg-type]


def test_keys_are_read_from_every_header_sdks_use() -> None:
    for headers in ({"Authorization": "Bearer sk-1"}, {"x-api-key": "sk-1"}, {"api-key": "sk-1"}):
        assert presented_key(make_mocked_request("GET", "/", headers=headers)) == "sk-1"
    assert presented_key(make_mocked_request("GET", "/", headers={"Authorization": "Basic abc"})) is None
