"""``python -m voxlive_bench.accuracy``: how far quantized models are from the float one, measured.

The float model transcribes the audio (greedy tokens) and gives teacher-forced logits over the
prompt and its own tokens; each quantized model then gives (a) its own greedy tokens, (b) logits
on the same token ids with its own audio embeddings (encoder + decoder quantized), and (c) logits
on the float model's audio embeddings (the decoder alone). Reported: max logit error over the
largest float logit, top-1 agreement of the teacher-forced logits, greedy token agreement.
Each model runs in its own subprocess, one after the other, so two full-size models are never in
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


def _float_worker(model_dir: str, audio_path: str, dtype: str, out: Path) -> None:
    import voxlive
    from voxlive_bench.reference import offline_padded_audio

    model = voxlive.load(model_dir, dtype=dtype, device="cpu")
    audio = voxlive.load_audio(audio_path)
    tokens = model.transcribe(audio).tokens
    delay = model.config.delay_tokens(None)
    mel = voxlive.log_mel(offline_padded_audio(audio, delay, model.config.audio))
    embeds = model.embed_audio(mel)
    ids = model.tokenizer.prompt(model.config.audio.n_left_pad_tokens, delay) + tokens[:-1]
    np.savez(out, tokens=np.array(tokens), ids=np.array(ids), mel=mel, embeds=embeds, logits=model.logits(ids, embeds))


def _quantized_worker(model_dir: str, audio_path: str, dtype: str, mode: str, ref: Path) -> dict:
    import voxlive

    r = np.load(ref)
    model = voxlive.load(model_dir, dtype=dtype, device="cpu", quantize=mode)
    tokens = model.transcribe(voxlive.load_audio(audio_path)).tokens
    ids, logits = r["ids"].tolist(), r["logits"]
    scale = float(np.abs(logits).max())
    whole = model.logits(ids, model.embed_audio(r["mel"]))
    decoder = model.logits(ids, r["embeds"])
    return {
        "mode": mode, "positions": len(ids), "logit_scale": scale,
        "max_error_whole": float(np.abs(whole - logits).max()) / scale,
        "max_error_decoder": float(np.abs(decoder - logits).max()) / scale,
        "top1_whole": float((whole.argmax(-1) == logits.argmax(-1)).mean()),
        "top1_decoder": float((decoder.argmax(-1) == logits.argmax(-1)).mean()),
        "greedy_agreement": float(np.mean([a == b for a, b in zip(tokens, r["tokens"].tolist())])),
        "greedy_tokens": len(tokens), "distinct_float_tokens": len(set(r["tokens"].tolist())),
    }


def _run(args: list[str]) -> str:
    out = subprocess.run([sys.executable, "-m", "voxlive_bench.accuracy", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"accuracy worker failed:\n{out.stderr[-4000:]}")
    return out.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m voxlive_bench.accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="float checkpoint directory")
    p.add_argument("--audio", required=True, help="an audio file (speech)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantize", nargs="+", default=["int8", "int4"])
    p.add_argument("--worker", choices=["float", "quantized"], help=argparse.SUPPRESS)
    p.add_argument("--ref", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker == "float":
        _float_worker(a.model, a.audio, a.dtype, Path(a.ref))
        return 0
    if a.worker == "quantized":
        print(json.dumps(_quantized_worker(a.model, a.audio, a.dtype, a.quantize[0], Path(a.ref))))
        return 0
    common = ["--model", a.model, "--audio", a.audio, "--dtype", a.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "float.npz"
        _run([*common, "--worker", "float", "--ref", str(ref)])
        for mode in a.quantize:
            r = json.loads(_run([*common, "--worker", "quantized", "--ref", str(ref), "--quantize", mode])
                           .strip().splitlines()[-1])
            print(f"{mode} vs {a.dtype}, {r['positions']} teacher-forced positions (logit scale {r['logit_scale']:.1f}):"
                  f" max logit error {100 * r['max_error_whole']:.2f} % of scale (decoder alone "
                  f"{100 * r['max_error_decoder']:.2f} %), top-1 agreement {100 * r['top1_whole']:.1f} % (decoder "
                  f"alone {100 * r['top1_decoder']:.1f} %); greedy tokens {100 * r['greedy_agreement']:.1f} % equal "
                  f"of {r['greedy_tokens']} ({r['distinct_float_tokens']} distinct in the float run)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
