"""The fakes answer the official openai and ollama clients the way the real servers do."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import ollama
import openai
import orjson
import pytest

from .faults import FAULTS, Fault
from .ollama import FakeOllama
from .server import BackgroundServer
from .vllm import FakeVLLM


@pytest.fixture
def vllm() -> Iterator[FakeVLLM]:
    with FakeVLLM(["m1", "m1-alias"], stream_chunks=3, sleep_mode=True) as fake:
        yield fake


@pytest.fixture
def oai(vllm: FakeVLLM) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=vllm.url + "/v1", api_key="sk-test", max_retries=0) as client:
        yield client


@pytest.fixture
def raw(vllm: FakeVLLM) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=vllm.url, timeout=5) as client:
        yield client


@pytest.fixture
def olla() -> Iterator[FakeOllama]:
    with FakeOllama(["llama3.2:1b", "qwen2.5:0.5b", "phi3"], embedding_models=["all-minilm"]) as fake:
        yield fake


@pytest.fixture
def ocli(olla: FakeOllama) -> Iterator[ollama.Client]:
    with ollama.Client(host=olla.url) as client:
        yield client


@pytest.fixture
def olla_oai(olla: FakeOllama) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=olla.url + "/v1", api_key="ollama", max_retries=0) as client:
        yield client


def chat(client: openai.OpenAI, model: str = "m1", **kw: Any) -> Any:
    """A chat completion (or its stream, with stream=True) for one short user message."""
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi there"}], **kw)


# -- vLLM -------------------------------------------------------------------------------------
def test_vllm_models_and_chat(vllm: FakeVLLM, oai: openai.OpenAI) -> None:
    assert [m.id for m in oai.models.list()] == ["m1", "m1-alias"]
    resp = chat(oai, "m1-alias")
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion" and resp.model == "m1-alias"
    assert resp.choices[0].message.content == "fake reply from m1-alias"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (2, 3)
    path, body, headers = vllm.requests[-1]
    assert path == "/v1/chat/completions" and body["model"] == "m1-alias"
    assert headers["authorization"] == "Bearer sk-test"


def test_vllm_stream_with_usage(oai: openai.OpenAI) -> None:
    with chat(oai, stream=True, stream_options={"include_usage": True}) as stream:
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "fake reply from m1"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 5


def test_vllm_sse_wire_format(raw: httpx.Client) -> None:
    body = {"model": "m1", "messages": [{"role": "user", "content": "x"}], "stream": True}
    resp = raw.post("/v1/chat/completions", json=body)
    assert resp.headers["content-type"].startswith("text/event-stream")
    frames = resp.text.split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""] and all(f.startswith("data: {") for f in frames[:-2])
    assert all("usage" not in orjson.loads(f[6:]) for f in frames[:-2])


def test_vllm_completions_and_max_tokens(oai: openai.OpenAI) -> None:
    resp = oai.completions.create(model="m1", prompt="say something", max_tokens=2)
    assert resp.object == "text_completion" and resp.choices[0].finish_reason == "length"
    assert resp.choices[0].text == "fake reply from m1"[:12]
    pieces = [c.choices[0].text for c in oai.completions.create(model="m1", prompt="x", stream=True)]
    assert "".join(pieces) == "fake reply from m1"


def test_vllm_embeddings_need_an_embedding_model(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="does not support Embeddings"):
        oai.embeddings.create(model="m1", input="x")
    with (
        FakeVLLM(["bge"], task="embed") as fake,
        openai.OpenAI(base_url=fake.url + "/v1", api_key="k") as client,
    ):
        b64 = client.embeddings.create(model="bge", input=["a", "b"])  # the SDK asks for base64
        floats = client.embeddings.create(model="bge", input="a", encoding_format="float")
    assert len(b64.data) == 2 and len(b64.data[0].embedding) == 8
    assert b64.data[0].embedding == pytest.approx(floats.data[0].embedding, rel=1e-6)


def test_vllm_errors(vllm: FakeVLLM, oai: openai.OpenAI, raw: httpx.Client) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        chat(oai, "nope")
    assert info.value.body == {
        "message": "The model `nope` does not exist.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }
    resp = raw.post("/v1/chat/completions", json={"model": "m1"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages"
    assert raw.post("/v1/chat/completions", content=b"{not json").status_code == 400
    vllm.fail_status = 503
    with pytest.raises(openai.InternalServerError) as err:
        chat(oai)
    assert err.value.status_code == 503 and err.value.body == {
        "message": "fake engine failure (503)",
        "type": "ServiceUnavailableError",
        "param": None,
        "code": 503,
    }
    assert raw.get("/nowhere").json() == {"detail": "Not Found"}


def test_vllm_sleep_routes_need_sleep_mode() -> None:
    with FakeVLLM() as fake, httpx.Client(base_url=fake.url) as client:
        assert client.post("/sleep?level=1").status_code == 404
        assert client.get("/is_sleeping").status_code == 404


def test_vllm_sleep_level1_and_violation(vllm: FakeVLLM, oai: openai.OpenAI, raw: httpx.Client) -> None:
    assert raw.post("/sleep", json={"level": 2}).status_code == 200  # body ignored: level 1
    assert raw.get("/is_sleeping").json() == {"is_sleeping": True} and vllm.sleep_level == 1
    assert raw.get("/health").status_code == 200  # not a sleep indicator
    with pytest.raises(openai.InternalServerError):
        chat(oai)
    assert vllm.requests_while_sleeping == 1
    assert raw.post("/wake_up").status_code == 200
    assert raw.get("/is_sleeping").json() == {"is_sleeping": False}
    assert chat(oai).choices[0].message.content == "fake reply from m1"


def test_vllm_sleep_level2_wake_sequence(vllm: FakeVLLM, oai: openai.OpenAI, raw: httpx.Client) -> None:
    raw.post("/sleep?level=2")
    raw.post("/wake_up?tags=weights")
    assert raw.get("/is_sleeping").json()["is_sleeping"] is True
    assert raw.post("/collective_rpc", json={"method": "reload_weights"}).json() == {"results": [None]}
    raw.post("/wake_up?tags=kv_cache")
    assert raw.post("/reset_prefix_cache").status_code == 200
    assert raw.get("/is_sleeping").json()["is_sleeping"] is False
    assert chat(oai).choices[0].message.content == "fake reply from m1"
    raw.post("/sleep?level=2")
    raw.post("/wake_up")  # no reload_weights: the engine answers garbage
    assert "garbage" in (chat(oai).choices[0].message.content or "")
    assert vllm.requests_with_stale_weights == 1


def test_vllm_wake_failure_and_delay(vllm: FakeVLLM, raw: httpx.Client) -> None:
    vllm.fail_next_wake, vllm.wake_delay = True, 0.05
    raw.post("/sleep")
    started = time.monotonic()
    assert raw.post("/wake_up").status_code == 500
    assert time.monotonic() - started >= 0.05 and vllm.is_sleeping
    assert raw.post("/wake_up").status_code == 200 and not vllm.is_sleeping


def test_vllm_sleep_while_busy_is_recorded_and_aborts_the_request(vllm: FakeVLLM, oai: openai.OpenAI,
                                                                  raw: httpx.Client) -> None:
    vllm.hang = True
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(chat, oai)
        vllm.wait_until(lambda: vllm.in_flight == 1)
        raw.post("/sleep?level=1")  # mode=abort, vLLM's default: what runs is aborted
        assert vllm.sleeps_while_busy == 1
        raw.post("/wake_up")
        vllm.release()
        with pytest.raises(openai.InternalServerError, match="Request aborted"):
            pending.result(5)
    assert vllm.aborted_requests == 1
    assert chat(oai).choices[0].message.content == "fake reply from m1"  # later requests are served


def test_vllm_abort_mode_cuts_a_running_stream_and_wait_mode_drains(vllm: FakeVLLM, raw: httpx.Client) -> None:
    vllm.stream_chunks, vllm.chunk_delay = 50, 0.02
    body = {"model": "m1", "messages": [{"role": "user", "content": "x"}], "stream": True}
    with ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(lambda: raw.post("/v1/chat/completions", json=body).text)
        vllm.wait_until(lambda: vllm.in_flight == 1)
        raw.post("/sleep")
        frames = streaming.result(5).split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""] and '"Request aborted' in frames[-3]
    raw.post("/wake_up")
    vllm.stream_chunks = 10
    with ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(lambda: raw.post("/v1/chat/completions", json=body).text)
        vllm.wait_until(lambda: vllm.in_flight == 1)
        raw.post("/sleep?mode=wait")  # returns once the stream is done (server side: the client may still read)
        assert vllm.in_flight == 0
        assert "Request aborted" not in streaming.result(5)
    assert vllm.aborted_requests == 1 and vllm.sleeps_while_busy == 1


def test_vllm_fail_next_canary(vllm: FakeVLLM, oai: openai.OpenAI, raw: httpx.Client) -> None:
    raw.post("/sleep")
    vllm.fail_next_canary = True
    assert raw.post("/wake_up").status_code == 200 and not vllm.is_sleeping  # the wake itself "succeeds"
    with pytest.raises(openai.InternalServerError):
        chat(oai)
    assert chat(oai).choices[0].message.content == "fake reply from m1"


@pytest.mark.parametrize("fault", FAULTS)
def test_vllm_admin_faults(vllm: FakeVLLM, fault: Fault) -> None:
    vllm.admin_fault = fault
    with httpx.Client(base_url=vllm.url, timeout=0.5) as client:
        if fault == "bad-json":
            with pytest.raises(ValueError):
                client.get("/is_sleeping").json()
        elif fault == "wrong-shape":
            assert client.get("/is_sleeping").json() == ["not", "an", "object"]
        else:
            with pytest.raises(httpx.HTTPError):
                client.get("/is_sleeping")
        vllm.admin_fault = None
        assert client.get("/is_sleeping").json() == {"is_sleeping": False}
        assert client.get("/health").status_code == 200  # only the sleep-mode routes are affected


def test_vllm_hang_release_and_max_in_flight(vllm: FakeVLLM, oai: openai.OpenAI) -> None:
    vllm.hang = True
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(chat, oai) for _ in range(3)]
        vllm.wait_until(lambda: vllm.in_flight == 3)
        assert not any(f.done() for f in futures)
        vllm.release()
        assert all(f.result(5).choices for f in futures)
    assert vllm.max_in_flight == 3 and vllm.in_flight == 0 and vllm.disconnects == 0


def test_stop_does_not_wait_for_hung_or_streaming_requests() -> None:
    fake = FakeVLLM(["m1"], stream_chunks=1000, chunk_delay=0.01).start()
    with openai.OpenAI(base_url=fake.url + "/v1", api_key="k", max_retries=0) as client:
        fake.hang = True
        with ThreadPoolExecutor(2) as pool:
            hung = pool.submit(chat, client)
            fake.wait_until(lambda: fake.in_flight == 1)
            fake.hang = False
            streaming = pool.submit(lambda: list(chat(client, stream=True)))
            fake.wait_until(lambda: fake.in_flight == 2)
            started = time.monotonic()
            fake.stop()
            assert time.monotonic() - started < 3
            for future in (hung, streaming):
                with pytest.raises((openai.APIConnectionError, httpx.HTTPError)):
                    future.result(5)


def test_vllm_drop_after_chunks(vllm: FakeVLLM, oai: openai.OpenAI) -> None:
    vllm.drop_after_chunks = 2
    got = []
    with pytest.raises(openai.APIConnectionError):  # the SDK wraps the truncated chunked body
        for chunk in chat(oai, stream=True):
            got.append(chunk)
    assert len(got) == 2 and vllm.disconnects == 0
    with pytest.raises(openai.APIConnectionError):
        chat(oai)


def test_vllm_client_disconnect_is_counted(vllm: FakeVLLM, oai: openai.OpenAI) -> None:
    vllm.stream_chunks, vllm.chunk_delay = 100, 0.02
    with chat(oai, stream=True) as stream:
        next(iter(stream))
    vllm.wait_until(lambda: vllm.disconnects == 1 and vllm.in_flight == 0)


def test_vllm_first_byte_delay_and_metrics(vllm: FakeVLLM, oai: openai.OpenAI, raw: httpx.Client) -> None:
    vllm.first_byte_delay = 0.1
    started = time.monotonic()
    chat(oai)
    assert time.monotonic() - started >= 0.1
    text = raw.get("/metrics").text
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "time_to_first_token_seconds_count",
        "prefix_cache_queries_total",
    ):
        assert f"vllm:{name}{{" in text
    assert "gpu_cache_usage_perc" not in text


# -- Ollama, native API -----------------------------------------------------------------------
def test_ollama_metadata(ocli: ollama.Client) -> None:
    names = [m.model for m in ocli.list().models]
    assert names == ["llama3.2:1b", "qwen2.5:0.5b", "phi3:latest", "all-minilm:latest"]
    tag = ocli.list().models[0]
    assert tag.details is not None and tag.details.parameter_size == "1B" and tag.size and tag.digest
    show = ocli.show("phi3")
    assert show.details is not None and show.details.format == "gguf" and show.capabilities == ["completion"]
    assert ocli.ps().models == []


def test_ollama_chat_loads_model(olla: FakeOllama, ocli: ollama.Client) -> None:
    resp = ocli.chat(model="phi3", messages=[{"role": "user", "content": "hello you"}], stream=False)
    assert resp.message.content == "fake reply from phi3" and resp.done and resp.done_reason == "stop"
    assert resp.prompt_eval_count == 2 and resp.eval_count == 4 and (resp.total_duration or 0) > 0
    (loaded,) = ocli.ps().models
    assert loaded.model == "phi3:latest" and loaded.size_vram == loaded.size and loaded.expires_at is not None
    assert olla.loads == ["phi3:latest"]


def test_ollama_streams_ndjson_by_default(olla: FakeOllama, ocli: ollama.Client) -> None:
    with httpx.Client(base_url=olla.url) as client:
        resp = client.post("/api/generate", json={"model": "phi3", "prompt": "hi"})
    assert resp.headers["content-type"] == "application/x-ndjson"
    lines = [orjson.loads(line) for line in resp.text.splitlines()]
    assert [line["done"] for line in lines] == [False] * 4 + [True]
    assert "".join(line["response"] for line in lines) == "fake reply from phi3"
    assert lines[-1]["done_reason"] == "stop" and lines[-1]["eval_count"] == 4 and lines[-1]["context"]
    parts = list(ocli.chat(model="phi3", messages=[{"role": "user", "content": "x"}], stream=True))
    assert "".join(p.message.content or "" for p in parts) == "fake reply from phi3" and parts[-1].done


def test_ollama_preload_and_unload(olla: FakeOllama, ocli: ollama.Client) -> None:
    assert ocli.generate(model="phi3").done_reason == "load"
    assert [m.model for m in ocli.ps().models] == ["phi3:latest"]
    assert ocli.generate(model="phi3", keep_alive=0).done_reason == "unload"
    assert ocli.ps().models == [] and olla.unloads == ["phi3:latest"]
    ocli.chat(model="phi3", messages=[{"role": "user", "content": "x"}], keep_alive="30ms")
    assert olla.loaded == ["phi3:latest"]
    olla.wait_until(lambda: olla.loaded == [], timeout=2)


def test_ollama_lru_eviction() -> None:
    with FakeOllama(["a", "b", "c"], max_loaded_models=2) as fake, ollama.Client(host=fake.url) as client:
        for name in ("a", "b", "a", "c"):
            client.generate(model=name, prompt="x")
        assert fake.loaded == ["a:latest", "c:latest"] and fake.unloads == ["b:latest"]


def test_ollama_load_delay_is_shared_by_concurrent_requests() -> None:
    with FakeOllama(["a"], load_delay=0.1) as fake, ollama.Client(host=fake.url) as client:
        with ThreadPoolExecutor(2) as pool:
            runs = [pool.submit(client.generate, model="a", prompt="x", stream=False) for _ in range(2)]
            results = [run.result(5) for run in runs]
        assert fake.loads == ["a:latest"] and fake.max_in_flight == 2
        assert all((r.load_duration or 0) >= 0.09e9 for r in results)
        assert (client.generate(model="a", prompt="x").load_duration or 0) < 0.05e9


def test_ollama_errors(olla: FakeOllama, ocli: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        ocli.chat(model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 404 and info.value.error == "model 'nope' not found"
    with pytest.raises(ollama.ResponseError, match="does not support chat"):
        ocli.chat(model="all-minilm", messages=[{"role": "user", "content": "x"}])
    with httpx.Client(base_url=olla.url) as client:
        bad = client.post("/api/generate", json={"model": "phi3", "prompt": "x", "keep_alive": "10"})
        assert bad.status_code == 400 and "invalid duration" in bad.json()["error"]
        assert client.post("/api/chat", json={"messages": []}).json() == {"error": "model is required"}
        assert client.get("/api/nothing").text == "404 page not found"
        assert client.get("/").text == "Ollama is running"
    olla.fail_status = 500
    with pytest.raises(ollama.ResponseError) as failed:
        ocli.generate(model="phi3", prompt="x", stream=False)
    assert failed.value.status_code == 500


def test_ollama_num_parallel_queues_and_max_queue_refuses() -> None:
    with FakeOllama(["a"], chunk_delay=0.1, stream_chunks=4) as fake, ollama.Client(host=fake.url) as client:
        fake.num_parallel, fake.max_queue = 1, 1

        def generate() -> list[Any]:
            return list(client.generate(model="a", prompt="x", stream=True))

        with ThreadPoolExecutor(2) as pool:
            runs = [pool.submit(generate)]
            fake.wait_until(lambda: fake.max_served_at_once == 1)
            runs.append(pool.submit(generate))
            fake.wait_until(lambda: fake.queued == 1)
            with pytest.raises(ollama.ResponseError) as busy:
                client.generate(model="a", prompt="x", stream=False)
            assert busy.value.status_code == 503 and "maximum pending requests exceeded" in busy.value.error
            assert all(run.result(5)[-1].done for run in runs)
        assert fake.max_served_at_once == 1 and fake.queued == 0


def test_ollama_admin_faults_hit_ps_and_loads_only(olla: FakeOllama, ocli: ollama.Client) -> None:
    olla.admin_fault = "wrong-shape"
    with httpx.Client(base_url=olla.url) as client:
        assert client.get("/api/ps").json() == ["not", "an", "object"]
        assert client.post("/api/generate", json={"model": "phi3", "keep_alive": -1}).json() == ["not", "an",
                                                                                                "object"]
    assert ocli.generate(model="phi3", prompt="x", stream=False).done  # inference is untouched
    olla.admin_fault = None
    assert [m.model for m in ocli.ps().models] == ["phi3:latest"]


def test_ollama_embeddings(ocli: ollama.Client) -> None:
    vectors = ocli.embed(model="all-minilm", input=["a", "b"]).embeddings
    assert len(vectors) == 2 and len(vectors[0]) == 8 and sum(v * v for v in vectors[0]) == pytest.approx(1.0)
    assert list(ocli.embeddings(model="all-minilm", prompt="a").embedding) == pytest.approx(list(vectors[0]))


def test_ollama_drop_and_disconnect(olla: FakeOllama, ocli: ollama.Client) -> None:
    olla.drop_after_chunks = 1
    with pytest.raises(httpx.RemoteProtocolError):
        list(ocli.generate(model="phi3", prompt="x", stream=True))
    olla.drop_after_chunks, olla.stream_chunks, olla.chunk_delay = None, 100, 0.02
    with (
        httpx.Client(base_url=olla.url) as client,
        client.stream("POST", "/api/generate", json={"model": "phi3", "prompt": "x"}) as resp,
    ):
        next(resp.iter_lines())
    olla.wait_until(lambda: olla.disconnects == 1 and olla.in_flight == 0)


# -- Ollama, OpenAI-compatible API ------------------------------------------------------------
def test_ollama_v1(olla: FakeOllama, olla_oai: openai.OpenAI) -> None:
    assert [m.id for m in olla_oai.models.list()][:2] == ["llama3.2:1b", "qwen2.5:0.5b"]
    assert olla_oai.models.retrieve("phi3").owned_by == "library"
    resp = chat(olla_oai, "qwen2.5:0.5b")
    assert resp.choices[0].message.content == "fake reply from qwen2.5:0.5b"
    assert resp.system_fingerprint == "fp_ollama" and olla.loaded == ["qwen2.5:0.5b"]
    with chat(olla_oai, "phi3", stream=True, stream_options={"include_usage": True}) as stream:
        chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "fake reply from phi3"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    emb = olla_oai.embeddings.create(model="all-minilm", input="a")
    assert len(emb.data[0].embedding) == 8


def test_ollama_v1_errors(olla_oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        chat(olla_oai, "nope")
    assert info.value.body == {
        "message": "model 'nope' not found",
        "type": "not_found_error",
        "param": None,
        "code": None,
    }
    with pytest.raises(openai.NotFoundError):
        olla_oai.models.retrieve("nope")
    with pytest.raises(openai.BadRequestError, match="too short"):
        olla_oai.chat.completions.create(model="phi3", messages=[])


def test_background_server_call_and_context_manager() -> None:
    fake = FakeVLLM()
    with BackgroundServer(fake.app) as server:
        assert server.url.startswith("http://127.0.0.1:")
        assert server.call(lambda: _answer_42()) == 42
        assert httpx.get(server.url + "/health").status_code == 200


async def _answer_42() -> int:
    return 42
