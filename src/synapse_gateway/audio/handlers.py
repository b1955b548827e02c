"""HTTP handlers of the audio engine: transcriptions, translations, speech, models and health."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Future

from aiohttp import web

from ..errors import InvalidRequest
from ..web.errors import STARTED, request_id_of
from ..web.responses import json_response
from .encode import SPEECH_FORMATS, speech_encoder
from .engine import ENGINE_KEY, AudioEngine
from .formats import render_transcript
from .forms import read_speech_request, read_transcription_form
from .stt import Task, decode_upload
from .tts import SpeechJob

log = logging.getLogger("synapse.audio")


class AudioApi:
    """The route handlers; each reads the engine from the app it serves."""

    def __init__(self, app: web.Application) -> None:
        self.app = app

    @property
    def engine(self) -> AudioEngine:
        """The engine built by the app's lifespan."""
        return self.app[ENGINE_KEY]

    async def transcriptions(self, request: web.Request) -> web.Response:
        """POST /v1/audio/transcriptions: speech to text in the spoken language."""
        return await self._speech_to_text(request, "transcribe")

    async def translations(self, request: web.Request) -> web.Response:
        """POST /v1/audio/translations: speech to English text (needs a multilingual model)."""
        return await self._speech_to_text(request, "translate")

    async def _speech_to_text(self, request: web.Request, task: Task) -> web.Response:
        engine = self.engine
        form = await read_transcription_form(request, task=task, max_bytes=engine.config.max_upload_bytes)
        resident = engine.whisper(form.model)
        started = time.perf_counter()
        # a file that is not audio, or too long, never loads a model
        audio = await engine.run(decode_upload, form.file, engine.config.max_audio_seconds)
        async with resident.use() as whisper:
            whisper.check(form.options, form.model)
            began = time.perf_counter()
            transcript = await engine.run(whisper.transcribe, audio, form.options)
        now = time.perf_counter()
        log.info("%s %s: %.2fs of audio in %.2fs", task, resident.name, transcript.duration, now - started,
                 extra={"fields": {"request_id": request_id_of(request), "model": resident.name,
                                   "audio_s": round(transcript.duration, 3), "total_s": round(now - started, 3),
                                   "rtf": round((now - began) / max(transcript.duration, 1e-6), 4)}})
        body, content_type = render_transcript(transcript, form.response_format)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def speech(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/audio/speech: Piper speaks `input`; the audio streams out sentence by sentence."""
        engine = self.engine
        speech = await read_speech_request(request, max_input_chars=engine.config.max_input_chars)
        resident = engine.voice(speech.model, speech.voice)
        async with resident.use() as voice:
            encoder = speech_encoder(speech.response_format, voice.sample_rate,
                                     pcm_rate=engine.config.pcm_sample_rate)
            job = SpeechJob(voice, speech.input, speed=speech.speed, encoder=encoder)
            started = time.perf_counter()
            response = await self._stream(request, job, SPEECH_FORMATS[speech.response_format].content_type)
            seconds = job.samples / voice.sample_rate
            log.info("spoke %.2fs of audio with %s in %.2fs", seconds, resident.name, time.perf_counter() - started,
                     extra={"fields": {"request_id": request_id_of(request), "voice": resident.name,
                                       "format": speech.response_format, "sentences": job.sentences}})
            return response

    async def _stream(self, request: web.Request, job: SpeechJob, content_type: str) -> web.StreamResponse:
        """Send each sentence as soon as it is encoded while the next one is synthesized."""
        first = self._step(job)
        pending: Future[tuple[bytes, bool]] | None = first
        try:
            data, done = await asyncio.wrap_future(first)
            if done:
                raise InvalidRequest("`input` has nothing Piper can speak", param="input", code="empty_input")
            response = web.StreamResponse(headers={"Content-Type": content_type})
            response.enable_chunked_encoding()
            await response.prepare(request)  # only now: errors until here get a proper status
            request[STARTED] = True
            while True:
                pending = None if done else self._step(job)
                if data:  # a codec may hold a sentence back (an Ogg page not full yet)
                    await response.write(data)
                if pending is None:
                    break
                data, done = await asyncio.wrap_future(pending)
            await response.write_eof()
            return response
        finally:
            if pending is None:
                job.close()
            else:  # a step may still be running on its thread: close after it
                pending.add_done_callback(lambda _: job.close())

    def _step(self, job: SpeechJob) -> Future[tuple[bytes, bool]]:
        return self.engine.executor.submit(job.step)

    async def list_models(self, request: web.Request) -> web.Response:
        """GET /v1/models: the Whisper model names and aliases, and the speech model names."""
        created = int(self.engine.started_at)
        data = [{"id": name, "object": "model", "created": created, "owned_by": "synapse-audio"}
                for name in self.engine.model_ids()]
        return json_response({"object": "list", "data": data})

    async def health(self, request: web.Request) -> web.Response:
        """GET /health: which models are loaded, in use, and how long each has been idle."""
        return json_response(self.engine.health())
