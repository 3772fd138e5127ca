"""``python -m voxlive_bench.kvcache --model DIR``: int8 KV caches against bf16 ones, past the window.

One stream is teacher-forced over ``--positions`` decoder positions (default 8,700: past the
full-size decoder's 8,192-position window, so the ring has wrapped and every key the last
positions see was written by the int8 path), then decodes ``--greedy`` positions greedily on its
own. The audio embeddings are those of ``--audio-seconds`` of the bench's synthetic speech, tiled
(the encoder over 11 minutes of audio would cost minutes and measure nothing more about the
cache); the forced token ids are random text ids from a fixed seed (a random model's own greedy
tokens repeat one id). Reported: the largest logit error over the last ``--compare`` positions as a
fraction of the bf16 run's largest logit there, top-1 agreement over every position and over those
past the window, and how many of the greedy positions agree before the first difference.

Each cache runs in its own subprocess, one after the other, so two full-size models are never in
memory at once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

BLOCK = 256  # teacher-forced positions per call

def _worker(model_dir: str, kv_dtype: str | None, positions: int, compare: int, greedy: int,
            audio_seconds: float, out: Path) -> None:
    import voxlive
    from voxlive_bench.bench import bench_audio

    model = voxlive.load(model_dir, device="cpu", kv_dtype=kv_dtype, drafts=False)
    c = model.config
    samples = int(audio_seconds * c.audio.sample_rate) // c.audio.samples_per_token * c.audio.samples_per_token
    clip = model.embed_audio(voxlive.log_mel(bench_audio(audio_seconds)[:samples]))
    embeds = np.tile(clip, (-(-(positions + greedy) // len(clip)), 1))[:positions + greedy]
    rng = np.random.default_rng(0)
    text = [i for i in range(c.decoder.vocab_size) if model.tokenizer.is_text(i)]
    ids = rng.choice(text, size=positions).tolist()

    rt = model.runtime
    state = rt.new_state(c.delay_tokens(None))
    rt.add_embeddings(state, embeds)
    top1, tail = [], []
    tail_start = positions - compare
    for lo in range(0, positions, BLOCK):  # a block's logits at a time: all of them would be gigabytes
        logits = rt.logits(state, ids[lo:lo + BLOCK])
        top1.append(logits.argmax(-1))
        if lo + len(logits) > tail_start:
            tail.append(logits[max(0, tail_start - lo):])
    token = int(top1[-1][-1])
    continued = []
    for _ in range(greedy):
        token = rt.decode([state], [[token]])[0].tokens[0]
        continued.append(int(token))
    np.savez(out, top1=np.concatenate(top1), tail=np.concatenate(tail), greedy=np.array(continued),
             window=c.decoder.sliding_window, kv_dtype=str(rt.kv_dtype))


def _run(args: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "voxlive_bench.kvcache", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"kv cache worker failed:\n{out.stderr[-4000:]}")


def compare(ref: dict, got: dict) -> dict:
    window = int(ref["window"])
    scale = float(np.abs(ref["tail"]).max())
    agree = ref["top1"] == got["top1"]
    same = ref["greedy"] == got["greedy"]
    return {
        "positions": len(agree), "window": window, "logit_scale": scale,
        "max_error_tail": float(np.abs(ref["tail"] - got["tail"]).max()) / scale,
        "top1": float(agree.mean()), "top1_past_window": float(agree[window:].mean()) if len(agree) > window else None,
        "greedy": len(same), "greedy_before_first_difference": int(np.argmin(same)) if not same.all() else len(same),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m voxlive_bench.kvcache", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="float checkpoint directory")
    p.add_argument("--positions", type=int, default=8700, help="teacher-forced positions (default 8700)")
    p.add_argument("--compare", type=int, default=256, help="last positions whose logits are compared")
    p.add_argument("--greedy", type=int, default=64, help="greedy positions after the forced ones")
    p.add_argument("--audio-seconds", type=float, default=20.0, help="speech encoded once, then tiled")
    p.add_argument("--worker", choices=["bf16", "int8"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.compare > a.positions:
        p.error("--compare must not exceed --positions")
    common = ["--model", a.model, "--positions", str(a.positions), "--compare", str(a.compare),
              "--greedy", str(a.greedy), "--audio-seconds", str(a.audio_seconds)]
    if a.worker:
        _worker(a.model, "int8" if a.worker == "int8" else None, a.positions, a.compare, a.greedy,
                a.audio_seconds, Path(a.out))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for kv in ("bf16", "int8"):
            path = Path(tmp) / f"{kv}.npz"
            _run([*common, "--worker", kv, "--out", str(path)])
            runs[kv] = dict(np.load(path))
    r = compare(runs["bf16"], runs["int8"])
    print(json.dumps(r))
    past = f", {100 * r['top1_past_window']:.1f} % past the window" if r["top1_past_window"] is not None else ""
    print(f"int8 KV vs {runs['bf16']['kv_dtype']} KV, {r['positions']} teacher-forced positions (window "
          f"{r['window']}): max logit error over the last {a.compare} positions {100 * r['max_error_tail']:.3f} % "
          f"of the logit scale {r['logit_scale']:.1f}; top-1 agreement {100 * r['top1']:.1f} %{past}; "
          f"greedy decoding after them: {r['greedy_before_first_difference']} of {r['greedy']} positions equal "
          f"before the first difference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
