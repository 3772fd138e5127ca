"""The ``voxlive`` command: transcribe, listen, serve, bench, convert."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .transcript import FORMATS

EXTENSIONS = {"text": "txt", "json": "json", "srt": "srt", "vtt": "vtt"}
PROGRESS_MIN_SECONDS = 30.0  # a progress bar only for files long enough to need one


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory or Hugging Face repo id (default: the official model)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "mlx"])
    p.add_argument("--device", help="cpu, cuda, cuda:N; mlx: cpu, gpu (default: best available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16")
    p.add_argument("--quantize", choices=["int8", "int4", "int6"],
                   help="weight-only quantization at load (int6: MLX only); a converted checkpoint has its own")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow start; see README)")
    p.add_argument("--delay-ms", type=int, help="transcription delay: 80..1200 in steps of 80, or 2400 (default 480)")


def _load(a):
    from .model import load

    return load(a.model, backend=a.backend, device=a.device, dtype=a.dtype, quantize=a.quantize, compile=a.compile)


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


def cmd_transcribe(a) -> int:
    from .audio import AudioError

    for f in a.files:
        if not Path(f).is_file():
            print(f"voxlive: {f}: no such file", file=sys.stderr)
            return 2
    model = _load(a)
    model.config.delay_tokens(a.delay_ms)  # a bad delay fails before any work
    out_dir = Path(a.output_dir) if a.output_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    for f in a.files:
        try:
            transcript = model.transcribe(f, delay_ms=a.delay_ms,
                                          progress=None if a.quiet else _progress_bar(Path(f).name))
        except AudioError as e:
            print(f"voxlive: {e}", file=sys.stderr)
            failed += 1
            continue
        text = transcript.format(a.format)
        if out_dir:
            target = out_dir / f"{Path(f).stem}.{EXTENSIONS[a.format]}"
            target.write_text(text, encoding="utf-8")
            if not a.quiet:
                print(f"{f} -> {target}", file=sys.stderr)
        else:
            if len(a.files) > 1 and a.format == "text":
                sys.stdout.write(f"{f}: ")
            sys.stdout.write(text)
            sys.stdout.flush()
    return 1 if failed else 0


def cmd_listen(a) -> int:
    from .microphone import MicrophoneError, input_device, listen

    device = int(a.input) if a.input and a.input.isdigit() else a.input
    try:
        input_device(device)  # fail with a clear message before loading gigabytes of weights
    except MicrophoneError as e:
        print(f"voxlive: {e}", file=sys.stderr)
        return 2
    model = _load(a)

    def show(words):
        sys.stdout.write("".join(f"{w.text} " for w in words))
        sys.stdout.flush()

    print("listening... (Ctrl-C to stop)", file=sys.stderr)
    try:
        transcript = listen(model, show, delay_ms=a.delay_ms, device=device)
    except MicrophoneError as e:
        print(f"\nvoxlive: {e}", file=sys.stderr)
        return 2
    print(file=sys.stdout)
    if a.format != "text":
        sys.stdout.write(transcript.format(a.format))
    return 0


def cmd_bench(a) -> int:
    from voxlive_bench.bench import bench, report

    if not a.random_weights and not a.model:
        print("voxlive bench: give --model SRC or --random-weights", file=sys.stderr)
        return 2
    quantize = [None if q == "none" else q for q in a.quantize]
    if a.streams:
        return _bench_streams(a, quantize)
    results = bench(a.model, random_weights=a.random_weights, seconds=a.seconds, dtype=a.dtype, device=a.device,
                    chunk_ms=a.chunk_ms, delay_ms=a.delay_ms, reference=a.reference, quantize=quantize,
                    compile=a.compile, backend=a.backend)
    print(report(results))
    return 0


def cmd_serve(a) -> int:
    from .checkpoint import DEFAULT_MODEL
    from .server import serve

    if a.max_sessions < 1:
        print("voxlive serve: --max-sessions must be at least 1", file=sys.stderr)
        return 2
    model = _load(a)
    model.config.delay_tokens(a.delay_ms)  # a bad default delay fails before the server starts
    serve(model, model_id=a.model or DEFAULT_MODEL, host=a.host, port=a.port, max_sessions=a.max_sessions,
          api_key=a.api_key, delay_ms=a.delay_ms, max_message_bytes=a.max_message_kb * 1024,
          max_upload_mb=a.max_upload_mb)
    return 0


def _bench_streams(a, modes: list[str | None]) -> int:
    import gc

    from voxlive_bench.bench import random_checkpoint_dir
    from voxlive_bench.streams import bench_streams, report_streams

    from .model import load

    counts = sorted(set(a.streams))
    if counts[0] < 1:
        print("voxlive bench: --streams takes counts of streams, e.g. 1 2 4 8 16", file=sys.stderr)
        return 2
    source = str(random_checkpoint_dir("full")) if a.random_weights else a.model
    for mode in modes:  # one model in memory at a time
        model = load(source, backend=a.backend, device=a.device, dtype=a.dtype, quantize=mode, compile=a.compile)
        weights = getattr(model.runtime, "quantize", None) or mode  # a converted checkpoint has its own
        print(f"[voxlive] {model.backend} backend, {weights or 'unquantized'} weights")
        print(report_streams(bench_streams(model, counts, seconds=a.seconds, delay_ms=a.delay_ms), a.seconds))
        del model
        gc.collect()
    return 0


def cmd_convert(a) -> int:
    if a.backend == "mlx":
        from .backends.mlx.convert import convert

        out = convert(a.src, a.out, quantize=a.quantize, dtype=a.dtype)
        print(f"{a.src} -> {out}", file=sys.stderr)
        return 0
    from .backends.torch.convert import write_quantized
    from .checkpoint import open_checkpoint

    if a.quantize not in ("int8", "int4"):
        print("voxlive convert: the torch backend writes int8 or int4 checkpoints (int6 is MLX only)",
              file=sys.stderr)
        return 2
    out = write_quantized(open_checkpoint(a.src), Path(a.out), a.quantize)
    print(f"wrote {a.quantize} checkpoint to {out} (load it with --model {out})", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="voxlive", description="Live speech-to-text with Voxtral Mini 4B Realtime")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("transcribe", help="transcribe audio files")
    t.add_argument("files", nargs="+", metavar="FILE")
    _model_args(t)
    t.add_argument("--format", default="text", choices=FORMATS)
    t.add_argument("--output-dir", help="write <name>.<txt|json|srt|vtt> per file here instead of stdout")
    t.add_argument("--quiet", action="store_true", help="no progress bar or status lines")
    t.set_defaults(run=cmd_transcribe)

    m = sub.add_parser("listen", help="transcribe the microphone live")
    _model_args(m)
    m.add_argument("--input", help="input device index or name (default: the system default)")
    m.add_argument("--format", default="text", choices=FORMATS, help="also print the whole transcript at the end")
    m.set_defaults(run=cmd_listen)

    v = sub.add_parser("serve", help="serve live transcription over WebSocket and HTTP, with a web page")
    _model_args(v)
    v.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--max-sessions", type=int, default=16, help="concurrent streams and uploads")
    v.add_argument("--api-key", help="require this key (Bearer header, or ?token= for browsers) on all but /health")
    v.add_argument("--max-message-kb", type=int, default=4096, help="largest WebSocket message accepted")
    v.add_argument("--max-upload-mb", type=float, default=200.0, help="largest file accepted by the upload route")
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
    b.set_defaults(run=cmd_bench)

    c = sub.add_parser("convert", help="write a quantized checkpoint (torch), or the mlx-community layout (mlx)")
    c.add_argument("src", help="native checkpoint directory or Hugging Face repo id")
    c.add_argument("out", help="output directory")
    c.add_argument("--quantize", choices=["int8", "int4", "int6"], help="torch: int8 or int4 (required); mlx: any")
    c.add_argument("--backend", default="torch", choices=["torch", "mlx"], help="the layout to write (default torch)")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="mlx: float weights' dtype")
    c.set_defaults(run=cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .config import ConfigError

    try:
        return a.run(a)
    except (CheckpointError, ConfigError, ValueError, NotImplementedError, ImportError) as e:
        print(f"voxlive: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
