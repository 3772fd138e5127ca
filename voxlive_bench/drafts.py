"""``voxlive bench --drafts``: what verifying drafted tokens in one decoder pass costs and buys.

Two measurements on one loaded model, in one run:

- the cost of a decoder pass of k = 1..16 rows for one stream (k - 1 drafts after its token), the
  best of repeated passes (on a shared machine, other work only ever adds time), each rewound so
  the cache stays at the same length;
- the decode time per emitted token of a whole file, one-step-at-a-time (drafts off) and with an
  oracle draft of accuracy p (the true greedy tokens of that file, each replaced by a wrong one
  with probability 1 - p), with a fixed draft length and with the adaptive one.

Random weights make greedy output degenerate, so real drafters' acceptance cannot be measured here;
the oracle's p stands for it. The tokens of every drafted run are checked against the stepwise run.

Then what users run, measured: ``model.transcribe`` of the file one step at a time (drafts off:
what transformers and voxtral.c do), whole and in live 240 ms chunks with drafts on (the encoder,
prefill and the rest of the file's time). And computed, not measured: the real-time factor on
speech, from the passes the session takes on a token stream shaped like speech
(``voxlive_bench.replay``, on a tiny model: the passes depend on the session and the tokens alone),
a pass of k rows costing the measured k-row pass over the one-row pass times the mean one-step pass
of the user's ``transcribe``, plus the measured encoder, prefill and rest of the file.
"""

from __future__ import annotations

import time

import numpy as np

from voxlive.backends.runtime import MAX_DRAFT
from voxlive.config import MS_PER_TOKEN
from voxlive.drafts import Adaptive, Drafting, Fixed, Oracle
from voxlive.session import decode_step, encode_and_prefill

from .bench import bench_audio, bench_wav, timed_transcribe, torch_floors
from .replay import Replayer, real_tokenizer, relabel, speech_tokens

ROWS = range(1, 17)
ACCURACIES = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)
PAD_FRACTION = 0.65
LIVE_CHUNK_S, LIVE_DELAY_MS = 0.24, 480  # a live stream as the issue states it: 240 ms chunks, 480 ms delay


def pass_costs(model, *, repeats: int = 15, context: int = 64) -> dict[int, float]:
    """Best seconds of one decode pass of k rows, for one stream with ``context`` positions cached.

    The sizes take turns (1..16, then again): a slow spell of a shared machine then slows every size
    alike instead of the few measured during it."""
    rt = model.runtime
    rng = np.random.default_rng(0)
    state = rt.new_state(model.config.delay_tokens(None))
    dim, vocab = model.config.decoder.dim, model.config.decoder.vocab_size
    rt.add_embeddings(state, 0.1 * rng.standard_normal((context + max(ROWS), dim)).astype(np.float32))
    rt.decode([state], [rng.integers(0, vocab, context).tolist()], outputs=[0])
    feeds = {k: rng.integers(0, vocab, k).tolist() for k in ROWS}
    times: dict[int, list[float]] = {k: [] for k in ROWS}
    for _ in range(repeats + 1):  # the first round is a warm-up
        for k in ROWS:
            rt.synchronize()
            t = time.perf_counter()
            rt.decode([state], [feeds[k]])
            rt.synchronize()
            times[k].append(time.perf_counter() - t)
            rt.rewind(state, k)
    rt.release(state)
    return {k: min(t[1:]) for k, t in times.items()}


def _decode_file(model, pcm, drafting):
    """Decode seconds and the tokens of a whole file fed at once (the encoder is not timed)."""
    s = model.stream(drafts=False)
    s.use_drafting(drafting)
    s.push(pcm)
    s.end_audio()
    encode_and_prefill([s])
    model.runtime.synchronize()
    t = time.perf_counter()
    passes = 0
    while decode_step([s]):
        passes += 1
    model.runtime.synchronize()
    return time.perf_counter() - t, s.transcript().tokens, passes, s


def speech_passes(*, row_cost: float, pad_fraction: float = PAD_FRACTION) -> dict:
    """Rows of every decoder pass the session takes for speech with ``pad_fraction`` pads and for as
    long a silence: offline (``transcribe``'s default chunks), live (240 ms chunks), and one step at
    a time; delay 480 ms, the default drafts with the measured model's ``row_cost``, on a tiny
    random model."""
    import tempfile
    from pathlib import Path

    from voxlive.model import load
    from voxlive.testing import write_random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = real_tokenizer(tmp)
        model = load(write_random_checkpoint(Path(tmp) / "tiny", "tiny"), dtype="float32")
    speech = speech_tokens(tokenizer, pad_fraction=pad_fraction)
    pad = tokenizer.streaming_pad
    replayer = Replayer(model, row_cost=row_cost)
    script = relabel(speech, first=tokenizer.num_special, vocab_size=model.config.decoder.vocab_size)
    silence = [pad] * len(script)
    return {"seconds": len(script) * MS_PER_TOKEN / 1000,
            "pad_fraction": sum(t == pad for t in script) / len(script),
            "words": sum(t == tokenizer.streaming_word for t in script),
            "offline": replayer.rows(script, chunk_seconds=30.0, delay_ms=LIVE_DELAY_MS),
            "live": replayer.rows(script, chunk_seconds=LIVE_CHUNK_S, delay_ms=LIVE_DELAY_MS),
            "silence": replayer.rows(silence, chunk_seconds=30.0, delay_ms=LIVE_DELAY_MS),
            "stepwise": replayer.rows(script, chunk_seconds=30.0, delay_ms=LIVE_DELAY_MS, drafts=False)}


def bench_user_path(model, timed, *, seconds: float) -> dict:
    """``transcribe`` of a ``seconds`` file, measured (each after an untimed call of its kind):
    drafts off, drafts on, and drafts on in live 240 ms chunks, with the runtime's default number
    of drafts."""
    import tempfile

    loaded, model.runtime.max_draft = model.runtime.max_draft, MAX_DRAFT  # fewer than the pool has room for
    out = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            wav = bench_wav(tmp, seconds)
            for name, chunk, drafts in (("stepwise", 30.0, False), ("file", 30.0, True), ("live", LIVE_CHUNK_S, True)):
                timed_transcribe(model, timed, wav, delay_ms=LIVE_DELAY_MS, chunk_seconds=chunk, drafts=drafts)
                out[name] = timed_transcribe(model, timed, wav, delay_ms=LIVE_DELAY_MS, chunk_seconds=chunk,
                                             drafts=drafts)
    finally:
        model.runtime.max_draft = loaded
    return out


def _outside_decode(measured: dict, seconds: float) -> float:
    """What a measured ``seconds`` file's ``transcribe`` spent outside decoder passes, per audio
    second: the encoder, the prompt prefill and the rest."""
    return (measured["encoder_ms_per_audio_s"] + (measured["prefill_ms"] + measured["rest_ms"]) / seconds) / 1000


def computed_rtf(measured: dict, rows: list[int], rows_seconds: float, costs: dict[int, float],
                 seconds: float, pass_ms: float) -> float:
    """Wall time over audio time of a ``seconds`` file: its measured time outside the decoder, and
    the decode time per audio second of ``rows`` (passes over ``rows_seconds`` of audio), a pass of
    k rows costing ``costs[k] / costs[1]`` times ``pass_ms``, the mean one-row pass of the user's
    path. (The best of repeated passes, ``costs``, gives the curve's shape; on a shared machine
    the mean pass users get is slower than the best one.)"""
    decode = sum(costs[k] for k in rows) / costs[1] * pass_ms / 1000
    return _outside_decode(measured, seconds) + decode / rows_seconds


def computed(r: dict, passes: dict) -> dict:
    """The computed real-time factors of ``bench_drafts``' measurements ``r`` and ``speech_passes()``."""
    costs, user, seconds, speech_s = r["costs"], r["user"], r["seconds"], passes["seconds"]
    unit = user["stepwise"]["decode_ms_per_step"]
    oracle = r["rows"][-1]["adaptive"]["ms_per_token"] / 1000 * r["tokens"]  # p = 1: the file's decode time

    def rtf(name: str, measured: str) -> float:
        return computed_rtf(user[measured], passes[name], speech_s, costs, seconds, unit)

    return {"stepwise": rtf("stepwise", "stepwise"), "offline": rtf("offline", "file"),
            "live": rtf("live", "live"), "silence": rtf("silence", "file"),
            "oracle_p1": _outside_decode(user["file"], seconds) + oracle / seconds}


def bench_drafts(model, timed, *, seconds: float, passes: dict) -> dict:
    """Everything above for one loaded model; ``timed``: its ``_Timed`` runtime, ``passes``:
    ``speech_passes()``."""
    pcm = bench_audio(seconds)
    vocab = model.config.decoder.vocab_size
    costs = pass_costs(model)
    _decode_file(model, pcm[:16000], None)  # warm-up
    base_s, truth, base_passes, _ = _decode_file(model, pcm, None)
    rows = []
    for p in ACCURACIES:
        row = {"p": p}
        for name, length in (("fixed", Fixed(model.runtime.max_draft)), ("adaptive", Adaptive(row_cost=model.runtime.row_cost))):
            secs, tokens, n, s = _decode_file(model, pcm, Drafting(Oracle(truth, accuracy=p, vocab_size=vocab), length))
            if tokens != truth:
                raise AssertionError(f"drafted decoding (p={p}, {name}) changed the tokens")
            row[name] = {"ms_per_token": 1000 * secs / len(tokens), "passes": n,
                         "accepted": s.drafts_accepted / max(1, s.drafts_fed)}
        rows.append(row)
    r = {"costs": costs, "tokens": len(truth), "stepwise_ms_per_token": 1000 * base_s / len(truth),
         "stepwise_passes": base_passes, "max_draft": model.runtime.max_draft, "rows": rows, "seconds": seconds}
    r["user"] = bench_user_path(model, timed, seconds=seconds)
    r["computed"] = computed(r, passes)
    if model.backend == "torch":
        r["floors"] = torch_floors(timed._rt, timed._sync)
    return r


def report_drafts(r: dict) -> str:
    c1 = r["costs"][1]
    lines = ["decoder pass of k rows, one stream (measured, best of 15, the sizes taking turns):",
             "   k   ms/pass  cost vs k=1  ms/row"]
    for k, c in r["costs"].items():
        lines.append(f"{k:4d}  {1000 * c:8.2f}  {c / c1:11.2f}  {1000 * c / k:6.2f}")
    lines += ["", f"{r['seconds']:.0f} s file, {r['tokens']} tokens, decode only (measured): one step at a time "
                  f"{r['stepwise_ms_per_token']:.2f} ms/token in {r['stepwise_passes']} passes",
              f"oracle drafts of accuracy p, fixed length {r['max_draft']} | adaptive length:",
              "   p   ms/token  passes  accepted | ms/token  passes  accepted  | speed-up fixed, adaptive"]
    for row in r["rows"]:
        f, a = row["fixed"], row["adaptive"]
        lines.append(f"{row['p']:4.2f}  {f['ms_per_token']:8.2f}  {f['passes']:6d}  {f['accepted']:8.2f} | "
                     f"{a['ms_per_token']:8.2f}  {a['passes']:6d}  {a['accepted']:8.2f}  | "
                     f"{r['stepwise_ms_per_token'] / f['ms_per_token']:.2f}x, "
                     f"{r['stepwise_ms_per_token'] / a['ms_per_token']:.2f}x")
    return "\n".join(lines)


def report_user_path(r: dict, passes: dict) -> str:
    """The measured ``transcribe`` calls and the computed real-time factors of ``bench_drafts``."""
    lines = []
    if "floors" in r:
        f = r["floors"]
        lines += [f"this machine now: GEMV floor {f['gemv_floor_ms']:.1f} ms (the matmuls alone over the "
                  f"{f['decoder_weight_gb']:.2f} GB of decoder weights), plain read {f['read_gb_per_s']:.1f} GB/s", ""]
    lines += [f"what users run, measured: transcribe() of the {r['seconds']:.0f} s file, {LIVE_DELAY_MS} ms delay, "
             f"at most {MAX_DRAFT} drafts (each call after an untimed one like it):",
             "                RTF  encoder ms/audio s  prefill ms  passes  ms/pass  rest ms"]
    for name, label in (("stepwise", "one step a time"), ("file", "file, drafts"), ("live", "live 240 ms")):
        u = r["user"][name]
        lines.append(f"{label:15s} {u['wall_s'] / r['seconds']:5.2f}  {u['encoder_ms_per_audio_s']:18.1f}  "
                     f"{u['prefill_ms']:10.1f}  {u['decode_passes']:6d}  {u['decode_ms_per_step']:7.1f}  "
                     f"{u['rest_ms']:7.1f}")
    minutes = passes["seconds"] / 60
    lines += ["", f"speech, {100 * passes['pad_fraction']:.0f} % pads ({passes['seconds']:.0f} s, {passes['words']} "
                  f"words, {passes['words'] / minutes:.0f} a minute), COMPUTED: the session's passes on that token "
                  f"stream, a pass of k rows at the measured cost of k rows over one (above) times the mean "
                  f"one-step pass of transcribe() ({r['user']['stepwise']['decode_ms_per_step']:.1f} ms), plus the "
                  f"measured encoder, prefill and rest of the {r['seconds']:.0f} s file:",
              "                passes  rows/pass  RTF"]
    c = r["computed"]
    for name, label in (("stepwise", "one step a time"), ("offline", "file, drafts"), ("live", "live 240 ms"),
                        ("silence", "silence, file")):
        rows = passes[name]
        lines.append(f"{label:15s} {len(rows):6d}  {sum(rows) / len(rows):9.2f}  {c[name]:4.2f}")
    lines.append(f"oracle drafts p = 1 (this file's passes, measured above): RTF {c['oracle_p1']:.2f}")
    return "\n".join(lines)


def report_summary(results: list[tuple[str, dict]], reference: dict | None) -> str:
    """One row per weight mode: the measured one-step-at-a-time ``transcribe`` (and transformers on
    the same weights) against the computed real-time factors with drafts."""
    lines = ["", "summary, real-time factor (wall / audio; under 1 is faster than real time):",
             "weights      | measured: one step a time  transformers | computed: file  live 240 ms  silence"
             "  oracle p=1 | file vs one step, vs transformers"]
    ref = reference["rtf"] if reference else None
    for weights, r in results:
        stepwise, c = r["user"]["stepwise"]["wall_s"] / r["seconds"], r["computed"]
        vs_ref = f"{ref / c['offline']:.1f}x" if ref else "-"
        lines.append(f"{weights:12s} | {stepwise:26.2f}  {ref or float('nan'):12.2f} | {c['offline']:14.2f}  "
                     f"{c['live']:11.2f}  {c['silence']:7.2f}  {c['oracle_p1']:10.2f} | "
                     f"{stepwise / c['offline']:.1f}x, {vs_ref}")
    if reference:
        lines.append(f"transformers: {reference['dtype']}, {reference['ms_per_token']:.0f} ms per token, whole pipeline")
    return "\n".join(lines)
