"""The ``voxlive`` command: transcribe, listen, serve, bench, convert, demo-checkpoint.

Every argument that can be checked without the model is checked before it loads, so an ordinary
mistake costs one line on stderr and exit status 2, not a traceback after a minute of loading.
Torch and the backends are imported inside the commands: ``voxlive --help`` stays light.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import socket
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from . import __version__
from .transcript import FORMATS

EXTENSIONS = {"text": "txt", "json": "json", "srt": "srt", "vtt": "vtt"}
PROGRESS_MIN_SECONDS = 30.0  # a progress bar only for files long enough to need one


class UsageError(Exception):
    """A mistake on the command line, found before anything is loaded."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like every other mistake (the usage is in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory or Hugging Face repo id (default: the official model)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "mlx"])
    p.add_argument("--device", help="torch: cpu, cuda, cuda:N, mps; mlx: cpu, gpu (default: best available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16")
    p.add_argument("--quantize", choices=["int8", "int4", "int6"],
                   help="weight-only quantization at load (int6: MLX only); a converted checkpoint has its own")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow start; see README)")
    p.add_argument("--delay-ms", type=int, help="transcription delay: 80..1200 in steps of 80, or 2400 (default 480)")
    p.add_argument("--no-drafts", action="store_true",
                   help="decode one token per decoder pass (default: guess pad runs and repeats, verify them in one pass)")


def _rut_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("blank ruts", "a penalty on [STREAMING_PAD]'s logit once a run of pads is long "
                                           "(vLLM PR #47615's calibration; see the README)")
    g.add_argument("--rut-after", type=int, default=200, metavar="N", help="pads in a run before the penalty (200)")
    g.add_argument("--rut-speech-after", default="50", metavar="N|off",
                   help="pads over VAD speech before the penalty (50 = 4 s; off: no VAD)")
    g.add_argument("--rut-slope", type=float, default=0.5, help="penalty per pad past the threshold (0.5)")
    g.add_argument("--rut-cap", type=float, default=7.0, help="the largest penalty (7.0; true silence is +8.5)")
    g.add_argument("--no-rut-penalty", action="store_true", help="pure greedy decoding: no blank-rut penalty")


def _rut_policy(a):
    """The blank-rut policy the flags ask for (None: off); a UsageError for bad values."""
    from .rut import RutPolicy

    if a.no_rut_penalty:
        return None
    speech = a.rut_speech_after
    if speech.lower() == "off":
        speech = None
    elif speech.isdigit():
        speech = int(speech)
    else:
        raise UsageError(f"--rut-speech-after must be a count of positions or off, got {speech!r}")
    try:
        return RutPolicy(after=a.rut_after, speech_after=speech, slope=a.rut_slope, cap=a.rut_cap).check()
    except ValueError as e:
        raise UsageError(f"--rut-*: {e}") from None


def _check_model_args(a) -> None:
    """The model options, checked against the backend without opening any checkpoint."""
    from .config import check_delay_ms
    from .model import check_options

    check_options(backend=a.backend, device=a.device, quantize=a.quantize, compile=a.compile)
    if a.delay_ms is not None:
        check_delay_ms(a.delay_ms)


def _status(message: str) -> None:
    print(f"voxlive: {message}", file=sys.stderr, flush=True)


def _show_progress_logs(quiet: bool) -> None:
    """voxlive's own log lines (the CPU kernels' build, a fallback, a damaged file) on stderr."""
    logger = logging.getLogger("voxlive")
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    if not any(getattr(h, "voxlive_cli", False) for h in logger.handlers):  # once, even if main() runs again
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.voxlive_cli = True
        logger.addHandler(handler)
        logger.propagate = False


def _load(a, *, quiet: bool = False):
    from .checkpoint import DEFAULT_MODEL
    from .model import load

    name = a.model or DEFAULT_MODEL
    if not quiet:
        _status(f"loading {name}")
    started = time.monotonic()
    model = load(a.model, backend=a.backend, device=a.device, dtype=a.dtype, quantize=a.quantize, compile=a.compile,
                 drafts=not a.no_drafts)
    if not quiet:
        _status(f"loaded in {time.monotonic() - started:.1f} s: {model.summary}")
    return model


def _progress_bar(name: str):
    from tqdm import tqdm

    bar = None

    def update(done: float, total: float) -> None:
        nonlocal bar
        if total < PROGRESS_MIN_SECONDS:
            return
        if bar is None:
            bar = tqdm(total=round(total, 1), unit="s", desc=name, file=sys.stderr, leave=False)
        bar.update(round(done - bar.n, 1))
        if done >= total:
            bar.close()

    return update


def _output_paths(files: list[str], out_dir: Path, fmt: str) -> dict[str, Path]:
    """One output file per input; two inputs that would write the same file are refused."""
    targets: dict[str, Path] = {}
    by_target: dict[Path, str] = {}
    for f in files:
        target = out_dir / f"{Path(f).stem}.{EXTENSIONS[fmt]}"
        other = by_target.setdefault(target, f)
        if Path(other).resolve() != Path(f).resolve():
            raise UsageError(f"{other} and {f} would both write {target}: transcribe them with different "
                             f"--output-dir")
        targets[f] = target
    return targets


def _make_output_dir(path: str) -> None:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {path}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output-dir {path}: cannot create it ({e.strerror})") from None


def cmd_transcribe(a) -> int:
    from .audio import AudioError

    for f in a.files:
        if not Path(f).exists():
            raise UsageError(f"{f}: no such file")
        if Path(f).is_dir():
            raise UsageError(f"{f}: is a directory (give audio files)")
    several = len(a.files) > 1
    if several and a.format in ("srt", "vtt") and not a.output_dir:
        raise UsageError(f"several files in {a.format} need --output-dir (one subtitle file each)")
    _check_model_args(a)
    rut = _rut_policy(a)
    targets = _output_paths(a.files, Path(a.output_dir), a.format) if a.output_dir else {}
    if targets:
        _make_output_dir(a.output_dir)
    model = _load(a, quiet=a.quiet)
    failed = 0
    for f in a.files:
        try:
            transcript = model.transcribe(f, delay_ms=a.delay_ms, rut=rut,
                                          progress=None if a.quiet else _progress_bar(Path(f).name))
        except AudioError as e:
            print(f"voxlive: {e}", file=sys.stderr)
            failed += 1
            continue
        if transcript.ruts and not a.quiet:
            _status(f"{f}: {len(transcript.ruts)} blank rut(s) broken, at " +
                    ", ".join(f"{r.start:.1f}-{r.end:.1f} s" for r in transcript.ruts[:5]))
        if targets:
            targets[f].write_text(transcript.format(a.format), encoding="utf-8")
            if not a.quiet:
                _status(f"{f} -> {targets[f]}")
        elif several and a.format == "json":  # JSON Lines: one object per file, named
            line = json.dumps({"file": f, **transcript.to_dict()}, ensure_ascii=False)
            sys.stdout.write(line + "\n")
        else:
            sys.stdout.write((f"{f}: " if several else "") + transcript.format(a.format))
        sys.stdout.flush()
    return 1 if failed else 0


def cmd_listen(a) -> int:
    from .microphone import MicrophoneError, input_device, listen

    _check_model_args(a)
    device = int(a.input) if a.input and a.input.isdigit() else a.input
    try:
        input_device(device)  # fail with a clear message before loading gigabytes of weights
    except MicrophoneError as e:
        raise UsageError(str(e)) from None
    model = _load(a)

    def show(words):
        sys.stdout.write("".join(f"{w.text} " for w in words))
        sys.stdout.flush()

    _status("listening... (Ctrl-C to stop)")
    try:
        transcript = listen(model, show, delay_ms=a.delay_ms, device=device)
    except MicrophoneError as e:
        print(f"\nvoxlive: {e}", file=sys.stderr)
        return 2
    print(file=sys.stdout)
    if a.format != "text":
        sys.stdout.write(transcript.format(a.format))
    return 0


def _listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads, so that a busy port is said at once."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port}: not a port (0 to 65535)")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        busy = " (another server is using it: choose another --port)" if e.errno == errno.EADDRINUSE else ""
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}{busy}") from None
    return sock


def cmd_serve(a) -> int:
    from .checkpoint import DEFAULT_MODEL
    from .server import serve

    for flag, value, least in (("--max-sessions", a.max_sessions, 1), ("--max-message-kb", a.max_message_kb, 1),
                               ("--max-upload-mb", a.max_upload_mb, 0.001), ("--idle-timeout", a.idle_timeout, 0),
                               ("--send-timeout", a.send_timeout, 0)):
        if not value >= least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")
    _check_model_args(a)
    rut = _rut_policy(a)
    if a.ray:
        return _serve_on_ray(a, rut)
    for flag in ("replicas", "min_replicas", "max_replicas", "target_sessions", "gpus_per_replica", "cpus_per_replica",
                 "address"):
        if getattr(a, flag) is not None:
            raise UsageError(f"--{flag.replace('_', '-')} needs --ray")
    sock = _listening_socket(a.host, a.port)
    model = _load(a)
    serve(model, model_id=a.model or DEFAULT_MODEL, sock=sock, max_sessions=a.max_sessions, api_key=a.api_key,
          delay_ms=a.delay_ms, max_message_bytes=a.max_message_kb * 1024, max_upload_mb=a.max_upload_mb,
          idle_timeout=a.idle_timeout or None, send_timeout=a.send_timeout or None, rut=rut)
    return 0


def _serve_on_ray(a, rut) -> int:
    """``serve --ray``: the same app as a Ray Serve deployment; each replica loads its own model
    and serves with the plain server's options (``rut``: the blank-rut policy the flags ask for)."""
    from .checkpoint import DEFAULT_MODEL

    if a.replicas is not None and (a.min_replicas is not None or a.max_replicas is not None):
        raise UsageError("--replicas N, or --min-replicas A --max-replicas B to autoscale, not both")
    for flag, value, least in (("--replicas", a.replicas, 1), ("--min-replicas", a.min_replicas, 0),
                               ("--max-replicas", a.max_replicas, 1), ("--target-sessions", a.target_sessions, 1),
                               ("--gpus-per-replica", a.gpus_per_replica, 0),
                               ("--cpus-per-replica", a.cpus_per_replica, 0.01)):
        if value is not None and value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")
    if a.min_replicas is not None and a.max_replicas is not None and a.min_replicas > a.max_replicas:
        raise UsageError(f"--min-replicas {a.min_replicas} is more than --max-replicas {a.max_replicas}")
    if a.target_sessions is not None and a.min_replicas is None and a.max_replicas is None:
        raise UsageError("--target-sessions is the autoscaling target: it needs --min-replicas/--max-replicas")
    if a.port == 0:
        raise UsageError("--ray needs a --port (Ray's proxy does not pick a free one)")
    if a.address is None:
        _listening_socket(a.host, a.port).close()  # a busy port is said now, not after Ray's start
    try:
        from .server.replicas import serve_on_ray
    except ImportError as e:
        raise UsageError(f"--ray needs Ray Serve: pip install 'voxlive[ray]' ({e})") from None
    load_options = {"backend": a.backend, "device": a.device, "dtype": a.dtype, "quantize": a.quantize,
                    "compile": a.compile, "drafts": not a.no_drafts}
    serve_on_ray(a.model, address=a.address, host=a.host, port=a.port, model_id=a.model or DEFAULT_MODEL,
                 load_options=load_options, max_sessions=a.max_sessions, replicas=a.replicas,
                 min_replicas=a.min_replicas, max_replicas=a.max_replicas, target_sessions=a.target_sessions,
                 gpus_per_replica=a.gpus_per_replica or 0, cpus_per_replica=a.cpus_per_replica or 1,
                 api_key=a.api_key, delay_ms=a.delay_ms, max_upload_mb=a.max_upload_mb,
                 idle_timeout=a.idle_timeout or None, send_timeout=a.send_timeout or None, rut=rut)
    return 0


def cmd_bench(a) -> int:
    if not a.random_weights and not a.model:
        raise UsageError("bench needs --model SRC or --random-weights")
    if a.seconds <= 0:
        raise UsageError(f"--seconds must be positive, got {a.seconds}")
    if a.chunk_ms is not None and a.chunk_ms <= 0:
        raise UsageError(f"--chunk-ms must be positive, got {a.chunk_ms}")
    if a.streams and min(a.streams) < 1:
        raise UsageError("--streams takes counts of streams, e.g. 1 2 4 8 16")
    quantize = [None if q == "none" else q for q in a.quantize]
    from .config import check_delay_ms
    from .model import check_options

    for mode in quantize:
        check_options(backend=a.backend, device=a.device, quantize=mode, compile=a.compile)
    if a.delay_ms is not None:
        check_delay_ms(a.delay_ms)
    if a.streams:
        return _bench_streams(a, quantize)
    if a.drafts:
        return _bench_drafts(a, quantize)
    from voxlive_bench.bench import bench, report

    results = bench(a.model, random_weights=a.random_weights, seconds=a.seconds, dtype=a.dtype, device=a.device,
                    chunk_ms=a.chunk_ms, delay_ms=a.delay_ms, reference=a.reference, quantize=quantize,
                    compile=a.compile, backend=a.backend)
    print(report(results))
    return 0


def _bench_streams(a, modes: list[str | None]) -> int:
    import gc

    from voxlive_bench.bench import random_checkpoint_dir
    from voxlive_bench.streams import bench_streams, report_by_minute, report_streams, soak_streams

    from .model import load

    counts = sorted(set(a.streams))
    if a.by_minute and (len(counts) != 1 or a.seconds < 60 or a.age_tokens):
        raise UsageError("--by-minute takes one --streams count, --seconds of a minute or more, and no --age-tokens")
    if a.log and not a.by_minute:
        raise UsageError("--log is for --by-minute")
    source = str(random_checkpoint_dir("full")) if a.random_weights else a.model
    for mode in modes:  # one model in memory at a time
        model = load(source, backend=a.backend, device=a.device, dtype=a.dtype, quantize=mode, compile=a.compile,
                     kv_dtype=a.kv_dtype, drafts=not a.no_drafts)
        weights = model.runtime.quantize or mode  # a converted checkpoint has its own
        age = f", streams {a.age_tokens} positions old" if a.age_tokens else ""
        drafts = "one position per step" if a.no_drafts else "drafts on"
        print(f"[voxlive] {model.backend} backend, {weights or 'unquantized'} weights, {model.runtime.kv_dtype} KV{age}, "
              f"{drafts}")
        if a.by_minute:
            with open(a.log, "a") if a.log else nullcontext() as log:
                rows = soak_streams(model, counts[0], minutes=int(a.seconds // 60), delay_ms=a.delay_ms, log=log)
            print(report_by_minute(rows, counts[0]))
        else:
            print(report_streams(bench_streams(model, counts, seconds=a.seconds, delay_ms=a.delay_ms,
                                               age_tokens=a.age_tokens), a.seconds))
        del model
        gc.collect()
    return 0


def _bench_drafts(a, modes: list[str | None]) -> int:
    import gc

    from voxlive_bench.bench import load_timed, random_checkpoint_dir, reference_subprocess
    from voxlive_bench.drafts import (LIVE_DELAY_MS, ROWS, bench_drafts, report_drafts, report_summary,
                                      report_user_path, speech_passes)

    from .checkpoint import resolve

    source = str(random_checkpoint_dir("full") if a.random_weights else resolve(a.model))
    results, by_row_cost = [], {}
    for mode in modes:  # one model in memory at a time
        model, timed, _, _ = load_timed(source, a.dtype, a.device, mode, a.compile, a.backend, max_draft=max(ROWS) - 1)
        print(f"[voxlive] {model.summary}")
        cost = model.runtime.row_cost  # the drafts' length is chosen with it, so the speech's passes depend on it
        passes = by_row_cost[cost] = by_row_cost.get(cost) or speech_passes(row_cost=cost)
        r = bench_drafts(model, timed, seconds=a.seconds, passes=passes)
        print(report_drafts(r))
        print(report_user_path(r, passes))
        results.append((model.runtime.quantize or "unquantized", r))
        del model, timed
        gc.collect()
    reference = reference_subprocess(source, a.seconds, a.dtype, LIVE_DELAY_MS) if a.reference else None
    print(report_summary(results, reference))
    return 0


def cmd_convert(a) -> int:
    if Path(a.out).exists() and not Path(a.out).is_dir():
        raise UsageError(f"{a.out}: exists and is not a directory")
    if a.backend == "mlx":
        from .backends.mlx.convert import convert

        out = convert(a.src, a.out, quantize=a.quantize, dtype=a.dtype)
        _status(f"{a.src} -> {out}")
        return 0
    if a.quantize is None:
        raise UsageError("convert needs --quantize int8 or int4 (the torch backend writes quantized checkpoints)")
    if a.quantize == "int6":
        raise UsageError("the torch backend writes int8 or int4 checkpoints (int6 is MLX only: --backend mlx)")
    if a.dtype is not None:
        raise UsageError("convert's --dtype is for --backend mlx (a torch checkpoint keeps its float dtype)")
    from .backends.torch.convert import write_quantized
    from .checkpoint import open_checkpoint

    out = write_quantized(open_checkpoint(a.src), Path(a.out), a.quantize)
    _status(f"wrote {a.quantize} checkpoint to {out} (load it with --model {out})")
    return 0


def cmd_demo_checkpoint(a) -> int:
    from .testing import write_demo_checkpoint

    if Path(a.dir).exists() and not Path(a.dir).is_dir():
        raise UsageError(f"{a.dir}: exists and is not a directory")
    out = write_demo_checkpoint(a.dir)
    _status(f"wrote a demo checkpoint (tiny, random weights) to {out}: it says random words on speech and "
            f"nothing on silence; try: voxlive transcribe speech.wav --model {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="voxlive", description="Live speech-to-text with Voxtral Mini 4B Realtime")
    p.add_argument("--version", action="version", version=f"voxlive {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("transcribe", help="transcribe audio files")
    t.add_argument("files", nargs="+", metavar="FILE")
    _model_args(t)
    t.add_argument("--format", default="text", choices=FORMATS,
                   help="several files: text lines start with the file's name, json gives JSON Lines with a "
                        "'file' field, srt and vtt need --output-dir")
    t.add_argument("--output-dir", help="write <name>.<txt|json|srt|vtt> per file here instead of stdout")
    t.add_argument("--quiet", action="store_true", help="no progress bar or status lines")
    _rut_args(t)
    t.set_defaults(run=cmd_transcribe)

    m = sub.add_parser("listen", help="transcribe the microphone live")
    _model_args(m)
    m.add_argument("--input", help="input device index or name (default: the system default)")
    m.add_argument("--format", default="text", choices=FORMATS, help="also print the whole transcript at the end")
    m.set_defaults(run=cmd_listen)

    v = sub.add_parser("serve", help="serve live transcription over WebSocket and HTTP, with a web page")
    _model_args(v)
    v.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    v.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free one")
    v.add_argument("--max-sessions", type=int, default=16, help="concurrent streams and uploads")
    v.add_argument("--api-key", help="require this key (Bearer header, or ?token= for browsers) on all but the "
                                     "page and /health")
    v.add_argument("--max-message-kb", type=int, default=4096, help="largest WebSocket message accepted")
    v.add_argument("--max-upload-mb", type=float, default=200.0, help="largest file accepted by the upload route")
    v.add_argument("--idle-timeout", type=float, default=7200.0, metavar="SECONDS",
                   help="close a WebSocket that sends nothing this long (1001; default 7200; 0: never)")
    v.add_argument("--send-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="close a WebSocket that reads nothing this long while a message waits (1008; default 60; "
                        "0: never)")
    _rut_args(v)
    r = v.add_argument_group("Ray Serve", "replicas of the server, each with its own engine, behind one endpoint")
    r.add_argument("--ray", action="store_true", help="serve on Ray Serve (pip install 'voxlive[ray]')")
    r.add_argument("--address", help="join this Ray cluster (auto, or ray://head:10001; default: start a local one)")
    r.add_argument("--replicas", type=int, help="a fixed number of replicas (default 1)")
    r.add_argument("--min-replicas", type=int, help="autoscale from this many replicas...")
    r.add_argument("--max-replicas", type=int, help="...to this many, on live sessions and lag")
    r.add_argument("--target-sessions", type=float,
                   help="autoscaling: sessions per replica to aim for (default 3/4 of --max-sessions)")
    r.add_argument("--gpus-per-replica", type=float, help="GPUs each replica holds (default 0: CPU replicas)")
    r.add_argument("--cpus-per-replica", type=float,
                   help="CPUs each replica holds, and its torch threads (default 1)")
    v.set_defaults(run=cmd_serve)

    b = sub.add_parser("bench", help="measure speed: load, encoder, decoder step, RTF, peak RSS")
    b.add_argument("--model", help="checkpoint directory or Hugging Face repo id")
    b.add_argument("--random-weights", action="store_true", help="a full-size random checkpoint (written once)")
    b.add_argument("--seconds", type=float, default=10.0)
    b.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    b.add_argument("--device")
    b.add_argument("--delay-ms", type=int)
    b.add_argument("--chunk-ms", type=int, help="feed the audio in chunks of this size (default: all at once)")
    b.add_argument("--reference", action="store_true", help="also run transformers on the same weights")
    b.add_argument("--backend", default="auto", choices=["auto", "torch", "mlx"])
    b.add_argument("--quantize", nargs="+", default=["none"], choices=["none", "int8", "int4", "int6"],
                   help="weight modes to measure, one after the other (default: none)")
    b.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    b.add_argument("--streams", nargs="+", type=int,
                   help="instead: these numbers of concurrent streams through the server's engine, e.g. 1 2 4 8 16")
    b.add_argument("--drafts", action="store_true",
                   help="instead: decoder pass cost for 1..16 rows, time per token with oracle drafts of "
                        "accuracy 0..1, transcribe() one step at a time, with drafts and live, and the RTF on "
                        "speech computed from a replayed speech-shaped token stream (with --reference: "
                        "transformers too)")
    b.add_argument("--age-tokens", type=int, default=0,
                   help="with --streams: start each stream this many decoder positions old (its KV cache filled, "
                        "e.g. 8300: past the full window)")
    b.add_argument("--kv-dtype", choices=["int8"], help="with --streams: int8 KV caches")
    b.add_argument("--by-minute", action="store_true",
                   help="with --streams N (one count): one run of --seconds, a row per audio minute (step time and "
                        "RSS against the streams' age: sessions of hours)")
    b.add_argument("--log", help="with --by-minute: append each row to this file as it is sampled")
    b.add_argument("--no-drafts", action="store_true",
                   help="with --streams: one position per stream per step (random weights make drafts accept "
                        "whole runs, which real speech does not)")
    b.set_defaults(run=cmd_bench)

    c = sub.add_parser("convert", help="write a quantized checkpoint (torch), or the mlx-community layout (mlx)")
    c.add_argument("src", help="native checkpoint directory or Hugging Face repo id")
    c.add_argument("out", help="output directory")
    c.add_argument("--quantize", choices=["int8", "int4", "int6"], help="torch: int8 or int4 (required); mlx: any")
    c.add_argument("--backend", default="torch", choices=["torch", "mlx"], help="the layout to write (default torch)")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="mlx: float weights' dtype")
    c.set_defaults(run=cmd_convert)

    d = sub.add_parser("demo-checkpoint", help="write a tiny random checkpoint to try everything without the "
                                               "8.9 GB model (its words are random, but follow the audio)")
    d.add_argument("dir", help="output directory")
    d.set_defaults(run=cmd_demo_checkpoint)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from .audio import AudioError
    from .checkpoint import CheckpointError
    from .config import ConfigError

    _show_progress_logs(getattr(a, "quiet", False))
    try:
        return a.run(a)
    except (UsageError, CheckpointError, ConfigError, AudioError, ValueError, NotImplementedError, ImportError) as e:
        print(f"voxlive: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
