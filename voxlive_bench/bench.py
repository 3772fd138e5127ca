"""``voxlive bench``: load time, encoder ms per audio second, decoder ms per step, real-time factor
and peak RSS; optionally the transformers reference on the same weights in the same run.

Each engine runs in its own subprocess, one after the other, so each peak RSS is its own and two
full-size models are never in memory at once.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from voxlive.audio import SAMPLE_RATE


def best_seconds(fn, repeats: int) -> float:
    """The shortest of ``repeats`` timed calls of ``fn`` after one untimed warm-up (on a shared
    machine other work only ever adds time)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def random_checkpoint_dir(size: str = "full", seed: int = 0) -> Path:
    """A random-weight checkpoint in the user cache, written on first use."""
    base = Path(os.environ.get("VOXLIVE_CACHE", Path.home() / ".cache" / "voxlive"))
    path = base / f"random-{size}-seed{seed}"
    if not (path / "consolidated.safetensors").is_file():
        from voxlive.testing import write_random_checkpoint

        print(f"writing a {size}-size random checkpoint to {path} (once)...", file=sys.stderr)
        write_random_checkpoint(path, size=size, seed=seed)
    return path


def bench_audio(seconds: float, seed: int = 0) -> np.ndarray:
    """Noise shaped like speech loudness; compute per second does not depend on the content."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * np.arange(n) / SAMPLE_RATE)
    return (0.1 * envelope * rng.standard_normal(n)).astype(np.float32)


def rss_mb(pid: int | str = "self") -> float:
    """A process's resident memory now (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Timed:
    """Wraps a runtime, accumulating wall time per method (the stream calls it through this)."""

    def __init__(self, runtime, sync):
        self._rt, self._sync = runtime, sync
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def __getattr__(self, name):
        attr = getattr(self._rt, name)
        if name not in ("encode", "encode_batch", "decode"):
            return attr

        def timed(*args, **kwargs):
            # decode calls with output counts run prompt positions; plain ones are decode steps
            key = "encode" if name == "encode_batch" else "prefill" if "outputs" in kwargs else name
            t = time.perf_counter()
            out = attr(*args, **kwargs)
            self._sync()
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t
            self.calls[key] = self.calls.get(key, 0) + 1
            return out

        return timed


def torch_floors(runtime, sync, repeats: int = 3) -> dict:
    """What one decode step cannot beat on this machine, measured on the loaded weights themselves.

    gemv_floor_ms: every decoder matrix (and the LM head) multiplied by one vector, with the same
    ``linear`` (stock ``F.linear`` or the quantized kernel) and nothing else: the step minus
    attention, norms and Python. memory_floor_ms: the decoder's weight bytes (as stored: quantized
    bytes and scales) over the bandwidth of a plain read (a sum over a 1 GB float32 buffer,
    allocated after the peak RSS is taken).
    """
    import torch

    from voxlive.backends.torch.quant import linear
    from voxlive.backends.torch.quant import nbytes as weight_bytes

    d = runtime.decoder
    c = d.c
    x = torch.randn(1, c.dim, dtype=runtime.dtype, device=runtime.device)
    a = torch.randn(1, c.n_heads * c.head_dim, dtype=runtime.dtype, device=runtime.device)
    h = torch.randn(1, c.hidden_dim, dtype=runtime.dtype, device=runtime.device)
    weights = [d.embedding] + [w for L in d.layers for w in (L.wqkv, L.wo, L.w13, L.w2)]
    nbytes = sum(weight_bytes(w) for w in weights)

    def gemvs():
        linear(x, d.embedding)
        for L in d.layers:
            linear(x, L.wqkv), linear(a, L.wo), linear(x, L.w13), linear(h, L.w2)

    def best(fn):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return min(times)

    with torch.inference_mode():
        gemv = best(gemvs)
        # The same 1 GB read whatever the weights' format, so floors compare across modes.
        plain = torch.ones(2**28, dtype=torch.float32, device=runtime.device)
        read = best(plain.sum)
    bandwidth = plain.nbytes / read
    del plain
    return {"decoder_weight_gb": nbytes / 1e9, "gemv_floor_ms": 1000 * gemv,
            "read_gb_per_s": bandwidth / 1e9, "memory_floor_ms": 1000 * nbytes / bandwidth}


def load_timed(model_dir: str, dtype: str | None, device: str | None, quantize: str | None, compile: bool,
               backend: str = "auto", **options):
    """``voxlive.load`` (``options`` too), its runtime wrapped in a ``_Timed``; also a synchronize
    function and what the report says about the engine."""
    import torch

    from voxlive.model import load

    t = time.perf_counter()
    model = load(model_dir, backend=backend, device=device, dtype=dtype, quantize=quantize, compile=compile,
                 **options)
    load_s = time.perf_counter() - t
    dev = model.runtime.device
    if model.backend == "mlx":
        sync = model.runtime.synchronize  # MLX returns before queued work is done
    else:
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    model.runtime = timed = _Timed(model.runtime, sync)
    info = {"engine": "voxlive", "backend": model.backend,
            "device": dev.type.name if model.backend == "mlx" else str(dev),
            "dtype": str(timed.dtype).replace("torch.", "").replace("mlx.core.", ""),
            "quantize": timed.quantize, "compile": compile, "threads": torch.get_num_threads(),
            "load_s": load_s}
    if model.backend == "torch" and dev.type == "cpu":
        from voxlive.backends.torch import cpu_kernels

        info["cpu_kernels"] = cpu_kernels.variant() or "PyTorch's"
    return model, timed, sync, info


def timed_transcribe(model, timed: _Timed, wav, *, delay_ms: int | None, chunk_seconds: float,
                     drafts: bool | None = None) -> dict:
    """One ``model.transcribe(wav)``, from outside: its wall time, the runtime's share per method,
    and ``rest``, the wall time outside the runtime (audio decoding, mel, the session layer, words)."""
    timed.seconds, timed.calls = {}, {}
    t = time.perf_counter()
    transcript = model.transcribe(wav, delay_ms=delay_ms, chunk_seconds=chunk_seconds, drafts=drafts)
    wall = time.perf_counter() - t
    # the positions this call decoded: the file, rounded up to whole tokens, and its right pad
    decoded_seconds = len(transcript.tokens) * model.config.audio.ms_per_token / 1000
    return {"tokens": len(transcript.tokens), "wall_s": wall,
            "encoder_ms_per_audio_s": 1000 * timed.seconds.get("encode", 0) / decoded_seconds,
            "prefill_ms": 1000 * timed.seconds.get("prefill", 0),
            "decode_ms_per_step": 1000 * timed.seconds.get("decode", 0) / max(1, timed.calls.get("decode", 0)),
            "decode_passes": timed.calls.get("decode", 0),
            "rest_ms": 1000 * (wall - sum(timed.seconds.values()))}


def bench_wav(directory: Path, seconds: float) -> Path:
    import soundfile as sf

    wav = Path(directory) / "bench.wav"
    sf.write(wav, bench_audio(seconds), SAMPLE_RATE, subtype="FLOAT")
    return wav


def run_voxlive(model_dir: str, seconds: float, dtype: str | None, device: str | None, chunk_ms: int | None,
                delay_ms: int | None, quantize: str | None = None, compile: bool = False, backend: str = "auto") -> dict:
    """Times what users run: ``model.transcribe(file)`` from outside, twice on one loaded model.

    The first call is what ``voxlive transcribe FILE`` pays after loading: it also starts the
    delay's first stream (encodes and decodes the silent left pad; a compiled step compiles here).
    The second is an API user's next file: its stream forks that state; its runtime share is
    timed per method.
    """
    import tempfile

    model, timed, sync, info = load_timed(model_dir, dtype, device, quantize, compile, backend)
    chunk_seconds = chunk_ms / 1000 if chunk_ms else max(30.0, seconds)  # default: the file in one chunk
    with tempfile.TemporaryDirectory() as tmp:
        wav = bench_wav(tmp, seconds)
        first = timed_transcribe(model, timed, wav, delay_ms=delay_ms, chunk_seconds=chunk_seconds)
        r = timed_transcribe(model, timed, wav, delay_ms=delay_ms, chunk_seconds=chunk_seconds)
    rss = peak_rss_mb()
    floors = torch_floors(timed._rt, sync) if model.backend == "torch" else {}
    return {**floors, **info, **r, "audio_s": seconds, "chunk_ms": chunk_ms,
            "first_wall_s": first["wall_s"], "first_rtf": first["wall_s"] / seconds,
            "rtf": r["wall_s"] / seconds, "peak_rss_mb": rss}


def run_reference(model_dir: str, seconds: float, dtype: str | None, delay_ms: int | None) -> dict:
    import torch

    from voxlive.config import load_config
    from voxlive.tokens import Tokenizer

    from .reference import load_reference, reference_generate, reference_log_mel

    dtype = dtype or "bfloat16"
    t = time.perf_counter()
    ref = load_reference(model_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    load_s = time.perf_counter() - t
    config = load_config(Path(model_dir))
    delay = config.delay_tokens(delay_ms)
    tok = Tokenizer(Path(model_dir) / "tekken.json")
    audio = bench_audio(seconds)
    a = config.audio
    right = -len(audio) % a.samples_per_token + (delay + 11) * a.samples_per_token
    padded = np.pad(audio, (a.n_left_pad_tokens * a.samples_per_token, right))
    t = time.perf_counter()
    mel = reference_log_mel(padded)
    tokens = reference_generate(ref, mel, tok.prompt(a.n_left_pad_tokens, delay), delay)
    wall = time.perf_counter() - t
    return {
        "engine": "transformers", "device": "cpu", "dtype": dtype, "threads": torch.get_num_threads(),
        "load_s": load_s, "audio_s": seconds, "tokens": len(tokens),
        "ms_per_token": 1000 * wall / max(1, len(tokens)), "wall_s": wall, "rtf": wall / seconds,
        "peak_rss_mb": peak_rss_mb(),
    }


def _subprocess(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "voxlive_bench.bench", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark worker failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def reference_subprocess(model_dir: str, seconds: float, dtype: str | None, delay_ms: int | None) -> dict:
    """``run_reference`` in its own process (its peak RSS its own; never two models at once)."""
    return _subprocess(["reference", "--model", model_dir, "--seconds", str(seconds),
                        *(["--dtype", dtype] if dtype else []), *(["--delay-ms", str(delay_ms)] if delay_ms else [])])


def report(results: list[dict]) -> str:
    lines = []
    for r in results:
        weights = (f"{r['dtype']}" + (f", {r['quantize']} weights" if r.get("quantize") else "")
                   + (", compiled step" if r.get("compile") else ""))
        backend = f", {r['backend']} backend" if "backend" in r else ""
        if r.get("cpu_kernels"):
            backend += f" ({r['cpu_kernels']} CPU kernels)"
        lines.append(f"[{r['engine']}] {r['device']} {weights}{backend}, {r['threads']} threads, "
                     f"{r['audio_s']:.0f} s of audio, {r['tokens']} tokens")
        lines.append(f"  load            {r['load_s']:8.1f} s")
        if r["engine"] == "voxlive":
            lines.append(f"  encoder         {r['encoder_ms_per_audio_s']:8.1f} ms per audio second")
            lines.append(f"  prompt prefill  {r['prefill_ms']:8.1f} ms (39 positions; 31 run when the first stream starts)")
            lines.append(f"  decoder         {r['decode_ms_per_step']:8.1f} ms per pass ({r['decode_passes']} passes for "
                         f"{r['tokens']} tokens of 80 ms: drafts verify several per pass)")
            if "gemv_floor_ms" in r:
                lines.append(f"    GEMV floor    {r['gemv_floor_ms']:8.1f} ms ({r['decode_ms_per_step'] / r['gemv_floor_ms']:.2f}x): "
                             f"the matmuls alone over the {r['decoder_weight_gb']:.2f} GB of decoder weights")
                lines.append(f"    memory floor  {r['memory_floor_ms']:8.1f} ms ({r['decode_ms_per_step'] / r['memory_floor_ms']:.2f}x): "
                             f"the same bytes at a plain read's {r['read_gb_per_s']:.1f} GB/s")
        else:
            lines.append(f"  whole pipeline  {r['ms_per_token']:8.1f} ms per token (80 ms of audio)")
        if r["engine"] == "voxlive":
            lines.append(f"  rest            {r['rest_ms']:8.1f} ms (audio file, mel, session layer, words: the wall "
                         f"time outside the runtime)")
            lines.append(f"  transcribe()    RTF {r['first_rtf']:.2f} the first call (wall {r['first_wall_s']:.1f} s, "
                         f"starts the delay's first stream), {r['rtf']:.2f} the next")
        lines.append(f"  real-time factor{r['rtf']:8.2f}   (wall {r['wall_s']:.1f} s)")
        lines.append(f"  peak RSS        {r['peak_rss_mb']:8.0f} MB")
    if len(results) == 2 and results[1]["engine"] == "transformers":
        lines.append(f"speed-up vs transformers (whole pipeline, same weights): "
                     f"{results[1]['wall_s'] / results[0]['wall_s']:.2f}x")
    return "\n".join(lines)


def bench(model: str | None, *, random_weights: bool, seconds: float, dtype: str | None, device: str | None,
          chunk_ms: int | None, delay_ms: int | None, reference: bool, quantize: list[str | None] = (None,),
          compile: bool = False, backend: str = "auto") -> list[dict]:
    """One subprocess per quantization mode, one after the other."""
    if random_weights:
        model_dir = str(random_checkpoint_dir("full"))
    else:
        from voxlive.checkpoint import resolve

        model_dir = str(resolve(model))
    common = ["--model", model_dir, "--seconds", str(seconds)]
    if dtype:
        common += ["--dtype", dtype]
    if delay_ms:
        common += ["--delay-ms", str(delay_ms)]
    mine = common + (["--device", device] if device else []) + (["--compile"] if compile else [])
    mine += ["--backend", backend] + (["--chunk-ms", str(chunk_ms)] if chunk_ms else [])
    results = []
    for mode in quantize:
        results.append(_subprocess(["voxlive", *mine, *(["--quantize", mode] if mode else [])]))
    if reference:
        results.append(reference_subprocess(model_dir, seconds, dtype, delay_ms))
    return results


def _worker(argv: list[str]) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m voxlive_bench.bench")
    p.add_argument("engine", choices=["voxlive", "reference"])
    p.add_argument("--model", required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--dtype")
    p.add_argument("--device")
    p.add_argument("--chunk-ms", type=int)
    p.add_argument("--delay-ms", type=int)
    p.add_argument("--quantize")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--backend", default="auto")
    a = p.parse_args(argv)
    if a.engine == "voxlive":
        r = run_voxlive(a.model, a.seconds, a.dtype, a.device, a.chunk_ms, a.delay_ms, a.quantize, a.compile,
                        a.backend)
    else:
        r = run_reference(a.model, a.seconds, a.dtype, a.delay_ms)
    print(json.dumps(r))


if __name__ == "__main__":
    _worker(sys.argv[1:])
