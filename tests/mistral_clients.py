"""The voice-agent frameworks' Mistral STT clients, driven against a running server and reporting
what they emitted, one JSON object a line (test helper).

It runs as its own process beside the mistralai 2.x SDK those clients pin
(tests/test_agents_mistral_clients.py), since the test environment has mistralai 3.x:

    python tests/mistral_clients.py livekit|pipecat HOST KEY AUDIO.s16le PAUSE...

AUDIO is 16 kHz PCM16. Each client gets its own VAD (as in a real agent), which flushes the
stream at each end of speech. ``livekit``: the audio is pushed up to each PAUSE (a sample count past
a turn's end) and held there until the plugin reports the end of speech, as live audio would be.
``pipecat``: the audio goes through a pipeline of Pipecat's VAD, the Mistral service and a
recorder; the recorder counts the audio before each VAD stop (where the service flushed).
"""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np

MODEL = "voxtral-mini-transcribe-realtime-2602"
CHUNK = 1600  # 100 ms at 16 kHz
STOP_SECONDS = 0.5  # the VAD's silence before an end of speech, as the server tests use


def say(**event) -> None:
    print(json.dumps(event), flush=True)


async def livekit(host: str, key: str, pcm16: np.ndarray, pauses: list[int]) -> None:
    from livekit import rtc
    from livekit.agents import stt
    from livekit.plugins import mistralai, silero
    from mistralai.client import Mistral

    plugin = mistralai.STT(client=Mistral(api_key=key, server_url=f"http://{host}"), model=MODEL,
                           vad=silero.VAD.load(min_silence_duration=STOP_SECONDS))
    stream = plugin.stream()
    ends = asyncio.Queue()

    async def push():
        sent = 0
        for stop in [*pauses, len(pcm16)]:
            for i in range(sent, stop, CHUNK):
                chunk = pcm16[i:min(i + CHUNK, stop)]
                stream.push_frame(rtc.AudioFrame(chunk.tobytes(), 16000, 1, len(chunk)))
            sent = stop
            if stop < len(pcm16):
                await asyncio.wait_for(ends.get(), 60)
        stream.end_input()

    pusher = asyncio.create_task(push())
    async for event in stream:
        alternative = event.alternatives[0] if event.alternatives else None
        words = [w.end_time for w in alternative.words] if alternative is not None and alternative.words else []
        say(type=event.type.name, text=alternative.text if alternative else None, ends=words)
        if event.type is stt.SpeechEventType.END_OF_SPEECH:
            ends.put_nowait(True)
    await pusher
    await plugin.aclose()


async def pipecat(host: str, key: str, pcm16: np.ndarray, turns: int) -> None:
    from pipecat.audio.vad.silero import SileroVADAnalyzer
    from pipecat.audio.vad.vad_analyzer import VADParams
    from pipecat.frames.frames import (EndFrame, InputAudioRawFrame, InterimTranscriptionFrame,
                                       TranscriptionFrame, VADUserStartedSpeakingFrame, VADUserStoppedSpeakingFrame)
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.runner import PipelineRunner
    from pipecat.pipeline.task import PipelineParams, PipelineTask
    from pipecat.processors.audio.vad_processor import VADProcessor
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.services.mistral.stt import MistralSTTService

    finals = asyncio.Event()

    class Recorder(FrameProcessor):
        samples = 0
        transcripts = 0

        async def process_frame(self, frame, direction: FrameDirection):
            await super().process_frame(frame, direction)
            if isinstance(frame, InputAudioRawFrame):
                self.samples += frame.num_frames
            elif isinstance(frame, VADUserStartedSpeakingFrame):
                say(type="started", samples=self.samples)
            elif isinstance(frame, VADUserStoppedSpeakingFrame):
                say(type="stopped", samples=self.samples)
            elif isinstance(frame, InterimTranscriptionFrame):
                say(type="interim", text=frame.text)
            elif isinstance(frame, TranscriptionFrame):
                say(type="final", text=frame.text)
                self.transcripts += 1
                if self.transcripts == turns:
                    finals.set()
            await self.push_frame(frame, direction)

    vad = VADProcessor(vad_analyzer=SileroVADAnalyzer(params=VADParams(stop_secs=STOP_SECONDS)))
    service = MistralSTTService(api_key=key, base_url=f"http://{host}", sample_rate=16000)
    task = PipelineTask(Pipeline([vad, service, Recorder()]), params=PipelineParams(audio_in_sample_rate=16000),
                        idle_timeout_secs=None)
    runner = asyncio.create_task(PipelineRunner(handle_sigint=False).run(task))
    await task.queue_frames([InputAudioRawFrame(audio=pcm16[i:i + CHUNK].tobytes(), sample_rate=16000, num_channels=1)
                             for i in range(0, len(pcm16), CHUNK)])
    await asyncio.wait_for(finals.wait(), 60)
    await task.queue_frame(EndFrame())
    await runner


def main() -> None:
    client, host, key, path, *pauses = sys.argv[1:]
    pcm16 = np.fromfile(path, "<i2")
    if client == "livekit":
        asyncio.run(livekit(host, key, pcm16, [int(p) for p in pauses]))
    else:
        asyncio.run(pipecat(host, key, pcm16, len(pauses)))


if __name__ == "__main__":
    main()
