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
"""

from __future__ import annotations

import time

import numpy as np

from voxlive.drafts import Adaptive, Drafting, Fixed, Oracle
from voxlive.session import decode_step, encode_and_prefill

from .bench import bench_audio

ROWS = range(1, 17)
ACCURACIES = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)


def pass_costs(model, *, repeats: int = 15, context: int = 64) -> dict[int, float]:
    """Best seconds of one decode pass of k rows, for one stream with ``context`` positions cached."""
    rt = model.runtime
    rng = np.random.default_rng(0)
    state = rt.new_state(model.config.delay_tokens(None))
    dim, vocab = model.config.decoder.dim, model.config.decoder.vocab_size
    rt.add_embeddings(state, 0.1 * rng.standard_normal((context + max(ROWS), dim)).astype(np.float32))
    rt.decode([state], [rng.integers(0, vocab, context).tolist()], outputs=[0])
    costs = {}
    for k in ROWS:
        feed = rng.integers(0, vocab, k).tolist()
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            rt.synchronize()
            t = time.perf_counter()
            rt.decode([state], [feed])
            rt.synchronize()
            times.append(time.perf_counter() - t)
            rt.rewind(state, k)
        costs[k] = min(times[1:])
    rt.release(state)
    return costs


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


def bench_drafts(model, *, seconds: float) -> dict:
    pcm = bench_audio(seconds)
    vocab = model.config.decoder.vocab_size
    costs = pass_costs(model)
    _decode_file(model, pcm[:16000], None)  # warm-up
    base_s, truth, base_passes, _ = _decode_file(model, pcm, None)
    rows = []
    for p in ACCURACIES:
        row = {"p": p}
        for name, length in (("fixed", Fixed(model.runtime.max_draft)), ("adaptive", Adaptive())):
            secs, tokens, passes, s = _decode_file(model, pcm, Drafting(Oracle(truth, accuracy=p, vocab_size=vocab), length))
            if tokens != truth:
                raise AssertionError(f"drafted decoding (p={p}, {name}) changed the tokens")
            row[name] = {"ms_per_token": 1000 * secs / len(tokens), "passes": passes,
                         "accepted": s.drafts_accepted / max(1, s.drafts_fed)}
        rows.append(row)
    return {"costs": costs, "tokens": len(truth), "stepwise_ms_per_token": 1000 * base_s / len(truth),
            "stepwise_passes": base_passes, "max_draft": model.runtime.max_draft, "rows": rows, "seconds": seconds}


def report_drafts(r: dict) -> str:
    c1 = r["costs"][1]
    lines = ["decoder pass of k rows, one stream (measured, best of 15):", "   k   ms/pass  cost vs k=1  ms/row"]
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
