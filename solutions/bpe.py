"""Byte-pair encoding of one word: GPT-2's learned merges, applied lowest rank first."""

import math
from itertools import pairwise


def bpe_encode(word: bytes, ranks: dict[tuple[bytes, bytes], int]) -> list[bytes]:
    """Split one pre-split word into GPT-2's tokens, as byte strings.

    Start from single bytes. Repeatedly find the adjacent pair with the lowest rank
    (the merge learned earliest) and merge every occurrence of it, left to right;
    stop when no adjacent pair has a rank. `ranks` is left unchanged.
    """
    pieces = [bytes([byte]) for byte in word]
    while len(pieces) > 1:
        pairs = list(pairwise(pieces))
        best = min(pairs, key=lambda pair: ranks.get(pair, math.inf))
        if best not in ranks:
            break  # no adjacent pair was ever merged in training: done
        # Merge each occurrence, skipping the right half of a merged pair, so that an
        # overlapping run such as b"aaa" becomes [b"aa", b"a"], never [b"aa", b"aa"].
        merged, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == best:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces
