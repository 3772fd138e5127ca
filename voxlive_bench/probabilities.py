"""``python -m voxlive_bench.probabilities``: what the tokens' log-probabilities cost a decode step.

A decode step reads the decoder's logits once per fed position and returns the greedy token, the
pad's margin, the best other token and the greedy token's log-probability (``Decoded``). The
log-probability is one more pass over each row of logits (a float32 logsumexp) and a gather. This
times, on both backends (MLX when installed), in one process:

- ``step``: the tiny model's whole decode step (one stream, one position);
- ``greedy``: the runtime's ``_greedy`` on logits of the tiny vocabulary (2048) and of the full one
  (131072), for 1 row (a step) and 9 rows (a verification pass of 8 drafts), in bfloat16 (the full
  model's activations) and float32;
- ``logprob``: the log-probability's own operations on the same logits (the gather, the float32
  logsumexp, the copy out; the greedy tokens given), so its share of ``greedy`` and of the step is
  read off one run;
- ``lm head``: with ``--lm-head``, the full-size LM head (131072 x 3072 bf16, 805 MB) on one row,
  the matrix product the same step already runs for those logits (allocates the 805 MB).

Each figure is the best of ``--repeats`` calls, in ms. One CPU thread by default (``--threads``).
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np

import voxlive
from voxlive.testing import FULL, write_random_checkpoint

from .bench import best_seconds

FULL_VOCAB, FULL_DIM = FULL["vocab_size"], FULL["dim"]  # the full-size LM head, from the random checkpoint's sizes


def best_ms(fn, repeats: int) -> float:
    return 1000 * best_seconds(fn, repeats)


def torch_logits(rows: int, vocab: int, dtype: str):
    import torch

    return (4 * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows))).to(getattr(torch, dtype))


def torch_logprob(logits, tokens):
    import torch

    chosen = logits.gather(-1, tokens[:, None])[:, 0].float()
    return (chosen - torch.logsumexp(logits.float(), -1)).cpu().numpy()


def mlx_logits(rows: int, vocab: int, dtype: str):
    import mlx.core as mx

    out = (4 * mx.random.normal((rows, vocab), key=mx.random.key(rows))).astype(getattr(mx, dtype))
    mx.eval(out)
    return out


def mlx_logprob(logits, tokens):
    import mlx.core as mx

    chosen = mx.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0].astype(mx.float32)
    return np.array(chosen - mx.logsumexp(logits.astype(mx.float32), axis=-1))


def mx_argmax(logits):
    import mlx.core as mx

    tokens = mx.argmax(logits, axis=-1)
    mx.eval(tokens)
    return tokens


def tiny_step_ms(model, repeats: int) -> float:
    rt = model.runtime
    state = rt.new_state(6)
    rng = np.random.default_rng(0)
    rt.add_embeddings(state, rng.standard_normal((repeats + 1, model.config.decoder.dim)).astype(np.float32))
    return best_ms(lambda: rt.decode([state], [[1000]]), repeats)


def run(backend: str, repeats: int, directory) -> list[dict]:
    model = voxlive.load(directory, backend=backend, device="cpu", dtype="float32")
    make, logprob = (torch_logits, torch_logprob) if backend == "torch" else (mlx_logits, mlx_logprob)
    rows = [{"backend": backend, "what": "step (tiny model, 1 stream)", "ms": tiny_step_ms(model, repeats)}]
    for vocab in (model.config.decoder.vocab_size, FULL_VOCAB):
        for dtype in ("bfloat16", "float32"):
            for n in (1, 9):
                logits = make(n, vocab, dtype)
                tokens = logits.argmax(-1) if backend == "torch" else mx_argmax(logits)
                rows.append({"backend": backend, "what": f"greedy {n}x{vocab} {dtype}",
                             "ms": best_ms(lambda: model.runtime._greedy(logits), repeats),
                             "logprob_ms": best_ms(lambda: logprob(logits, tokens), repeats)})
    return rows


def lm_head_ms(repeats: int) -> float:
    import torch

    from voxlive.backends.torch import cpu_kernels

    w = torch.randn(FULL_VOCAB, FULL_DIM).bfloat16()
    x = torch.randn(1, FULL_DIM).bfloat16()
    if cpu_kernels.bf16_available():
        return best_ms(lambda: cpu_kernels.linear_bf16(x, w), repeats)
    return best_ms(lambda: torch.nn.functional.linear(x, w), repeats)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lm-head", action="store_true", help="also time the full-size LM head (805 MB)")
    args = parser.parse_args(argv)
    import importlib.util

    import torch

    torch.set_num_threads(args.threads)
    backends = ["torch"] + (["mlx"] if importlib.util.find_spec("mlx") else [])
    with tempfile.TemporaryDirectory() as tmp:
        directory = write_random_checkpoint(tmp, "tiny", seed=0, dtype="float32")
        for backend in backends:
            for row in run(backend, args.repeats, directory):
                extra = ""
                if "logprob_ms" in row:
                    extra = f"  of which log-probability {row['logprob_ms']:.4f} ms"
                print(f"{row['backend']:5}  {row['what']:32} {row['ms']:.4f} ms{extra}")
    if args.lm_head:
        print(f"torch  lm head 1x{FULL_VOCAB} bf16 (full size)    {lm_head_ms(max(3, args.repeats // 10)):.3f} ms")


if __name__ == "__main__":
    main()
