"""The queue of a stream's audio embeddings waiting for the decoder, the same for every backend."""

from __future__ import annotations


def take_rows(queue: list, n: int) -> list:
    """Remove the first ``n`` rows from a queue of ``[k, dim]`` arrays; return them as pieces.

    Arrays are sliced, never written, so a forked stream may share them. The caller concatenates
    the pieces with its backend's own function.
    """
    if sum(a.shape[0] for a in queue) < n:
        raise RuntimeError("decoding a position whose audio has not been encoded")
    got, taken = [], 0
    while taken < n:
        head = queue[0]
        need = n - taken
        if head.shape[0] <= need:
            got.append(queue.pop(0))
            taken += head.shape[0]
        else:
            got.append(head[:need])
            queue[0] = head[need:]
            taken = n
    return got
