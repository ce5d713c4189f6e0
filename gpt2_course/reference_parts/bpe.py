"""Byte-pair encoding of one word, one merge at a time (the way tiktoken's core loop works)."""


def bpe_encode(word: bytes, ranks: dict[tuple[bytes, bytes], int]) -> list[bytes]:
    """GPT-2's pieces of one pre-split word: merge the lowest-ranked adjacent pair
    (the leftmost of equals) until no adjacent pair has a rank."""
    parts = [word[i : i + 1] for i in range(len(word))]
    while True:
        candidates = [
            (ranks[(parts[i], parts[i + 1])], i)
            for i in range(len(parts) - 1)
            if (parts[i], parts[i + 1]) in ranks
        ]
        if not candidates:
            return parts
        _, i = min(candidates)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
