"""The full-size model (random weights): loads in bf16 within ~10 GB of RSS (int4: 4 GB) and transcribes.

Needs ~9 GB of RAM, ~9 GB of disk and minutes, so it only runs with VOXLIVE_FULL_TESTS=1
(`voxlive bench --random-weights` exercises the same path and reports its numbers).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(os.environ.get("VOXLIVE_FULL_TESTS") != "1",
                                reason="full-size model: set VOXLIVE_FULL_TESTS=1 (needs ~10 GB RAM)")


def test_full_size_load_memory_and_streaming():
    import voxlive
    from voxlive_bench.bench import random_checkpoint_dir

    model = voxlive.load(random_checkpoint_dir("full"), device="cpu", dtype="bfloat16")
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert rss_gb < 10.5, f"peak RSS {rss_gb:.1f} GB after load"
    c = model.config
    assert (c.decoder.dim, c.decoder.n_layers, c.encoder.n_layers, c.decoder.vocab_size) == (3072, 26, 32, 131072)
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(16000 * 2)).astype(np.float32)
    offline = model.transcribe(audio)
    s = model.stream()
    for start in range(0, len(audio), 7000):
        s.feed(audio[start:start + 7000])
    assert s.finish().tokens == offline.tokens
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 < 10.5


INT4_RUN = """
import resource, numpy as np, voxlive
from voxlive_bench.bench import random_checkpoint_dir
model = voxlive.load(random_checkpoint_dir("full"), device="cpu", dtype="bfloat16", quantize="int4")
rng = np.random.default_rng(0)
tokens = model.transcribe((0.1 * rng.standard_normal(16000 * 2)).astype(np.float32)).tokens
print(len(tokens), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
"""


def test_full_size_int4_loads_and_runs_in_under_4_gb():
    # its own process: peak RSS is per process, and the bf16 test above has its own
    out = subprocess.run([sys.executable, "-c", INT4_RUN], capture_output=True, text=True, check=True)
    n_tokens, rss_gb = out.stdout.split()
    assert int(n_tokens) == 25 + 1 + 10  # 2 s = 25 audio tokens, then delay + 1 + 10 of padding, less the delay
    assert float(rss_gb) < 4.0, f"peak RSS {rss_gb} GB"
