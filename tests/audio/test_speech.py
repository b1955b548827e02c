"""POST /v1/audio/speech end to end: Piper speaks, Whisper listens, every format decodes, audio streams."""

from __future__ import annotations

import asyncio
import io
import itertools
import time
import wave

import httpx
import openai
import pytest

from tests.audio.speech import (
    FOX,
    assert_streamed,
    ogg_pages,
    post_chunked,
    read_chunk,
    start_post,
    wav_of_pcm,
    word_errors,
)


def _speak(client: openai.OpenAI, text: str, response_format: str, **extra: object) -> bytes:
    answer = client.audio.speech.create(model="tts-1", voice="alloy", input=text,
                                        response_format=response_format,  # type: ignore[arg-type]
                                        **extra)  # type: ignore[arg-type]
    return answer.content


def test_speech_round_trip_through_whisper(client: openai.OpenAI) -> None:
    audio = _speak(client, FOX, "wav")
    heard = client.audio.transcriptions.create(model="whisper-1", file=("fox.wav", audio))
    assert word_errors(FOX, heard.text) <= 1, heard.text


def test_wav_streams_with_an_open_ended_header(client: openai.OpenAI) -> None:
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=FOX, response_format="wav") as answer:
        assert answer.headers["content-type"] == "audio/wav"
        assert answer.headers["transfer-encoding"] == "chunked"
        audio = answer.read()
    with wave.open(io.BytesIO(audio)) as clip:
        assert (clip.getnchannels(), clip.getsampwidth(), clip.getframerate()) == (1, 2, 22050)
        frames = clip.readframes(clip.getnframes())
    assert 1.0 < len(frames) / 2 / 22050 < 6.0


def test_pcm_is_24khz_16bit_little_endian(client: openai.OpenAI) -> None:
    pcm = _speak(client, FOX, "pcm")
    assert len(pcm) % 2 == 0
    assert 1.0 < len(pcm) / 2 / 24000 < 6.0
    with wave.open(io.BytesIO(wav_of_pcm(pcm, 24000))) as clip:
        assert clip.getnframes() == len(pcm) // 2
    # played at the advertised rate, it is still the sentence: the rate and byte order are right
    heard = client.audio.transcriptions.create(model="whisper-1", file=("fox.wav", wav_of_pcm(pcm, 24000)))
    assert word_errors(FOX, heard.text) <= 1, heard.text


@pytest.mark.parametrize(("response_format", "content_type", "codec"), [
    ("mp3", "audio/mpeg", "mp3"), ("opus", "audio/ogg", "opus"), ("aac", "audio/aac", "aac"),
    ("flac", "audio/flac", "flac")])
def test_compressed_formats_decode(client: openai.OpenAI, response_format: str, content_type: str,
                                   codec: str) -> None:
    answer = client.audio.speech.with_raw_response.create(
        model="tts-1", voice="alloy", input=FOX, response_format=response_format)  # type: ignore[arg-type]
    assert answer.headers["content-type"] == content_type
    audio = answer.content
    import av  # here, after the fixtures skipped a run without the audio packages

    with av.open(io.BytesIO(audio), mode="r") as container:
        stream = container.streams.audio[0]
        assert stream.codec_context.name.startswith(codec)  # mp3 decodes with "mp3float"
        samples: int = sum(frame.samples for frame in container.decode(stream))
        seconds = samples / stream.rate
    assert 1.0 < seconds < 6.0
    heard = client.audio.transcriptions.create(model="whisper-1", file=(f"fox.{response_format}", audio))
    assert word_errors(FOX, heard.text) <= 1, heard.text


def test_speed_changes_the_length(client: openai.OpenAI) -> None:
    normal = len(_speak(client, FOX, "pcm"))
    fast = len(_speak(client, FOX, "pcm", speed=2.0))
    slow = len(_speak(client, FOX, "pcm", speed=0.5))
    assert fast < normal * 0.7 < normal < slow * 0.7


async def test_speech_streams_sentence_by_sentence(client: openai.OpenAI, audio_url: str) -> None:
    _speak(client, "Warm up.", "pcm")  # the voice is loaded: its loading time is not the first sentence's
    sentences = [f"This is sentence number {n}, and it is long enough to take a while to say." for n in range(6)]
    started = time.perf_counter()
    headers, chunks = await post_chunked(audio_url, "/v1/audio/speech", {
        "model": "tts-1", "voice": "alloy", "input": " ".join(sentences), "response_format": "pcm"})
    assert headers[":status"] == "200"
    assert headers["transfer-encoding"] == "chunked"
    assert len(chunks) >= len(sentences)  # one chunk per sentence, not one blob at the end
    assert_streamed(started, chunks)


def test_opus_streams_in_small_pages(audio_url: str) -> None:
    body = {"model": "tts-1", "voice": "alloy", "input": "One. Two. Three. Four.", "response_format": "opus"}
    with httpx.Client(base_url=audio_url, timeout=60) as http, http.stream("POST", "/v1/audio/speech",
                                                                           json=body) as answer:
        assert answer.status_code == 200
        pieces = [piece for piece in answer.iter_raw() if piece]
    assert pieces[0].startswith(b"OggS")
    assert len(pieces) >= 4  # a piece per sentence at least: the pages left as they were filled
    pages = ogg_pages(b"".join(pieces))  # whole pages, checksums right
    assert [p.sequence for p in pages] == list(range(len(pages)))
    assert len({p.serial for p in pages}) == 1
    assert pages[0].first and pages[0].body.startswith(b"OpusHead") and pages[1].body.startswith(b"OpusTags")
    assert pages[-1].last and not any(p.first or p.last for p in pages[1:-1])
    audio = [p.granule for p in pages[2:]]
    assert audio == sorted(audio)
    steps = [later - earlier for earlier, later in itertools.pairwise([0, *audio])]
    assert max(steps) <= 48000 * 0.1 + 960, steps  # pages of at most 100 ms (and one 20 ms Opus frame)
    assert 1.0 < audio[-1] / 48000 < 6.0


async def test_client_leaving_mid_stream_frees_the_voice(audio_url: str) -> None:
    text = " ".join(f"Sentence {n} goes on for quite a few words before it ends." for n in range(30))
    (reader, writer), headers = await start_post(audio_url, "/v1/audio/speech", {
        "model": "tts-1", "voice": "alloy", "input": text, "response_format": "mp3"})
    assert headers[":status"] == "200"
    assert await read_chunk(reader)
    writer.close()
    await writer.wait_closed()
    async with httpx.AsyncClient(base_url=audio_url, timeout=30) as http:
        deadline = time.monotonic() + 10
        while (await http.get("/health")).json()["tts"]["joe"]["in_use"]:
            assert time.monotonic() < deadline, "the voice stayed in use after the client left"
            await asyncio.sleep(0.05)
        after = await http.post("/v1/audio/speech", json={"model": "tts-1", "voice": "alloy", "input": FOX})
    assert after.status_code == 200 and after.content[:3] in (b"ID3", b"\xff\xfb", b"\xff\xf3")
