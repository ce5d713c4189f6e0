"""Notebook 01: byte-pair encoding, the way GPT-2 turns one word into tokens.

Keep the function's name and arguments: the check calls it by name.
"""


def bpe_encode(word: bytes, ranks: dict[tuple[bytes, bytes], int]) -> list[bytes]:
    """Split one pre-split word into GPT-2's tokens, as byte strings.

    `word` is one piece of `gpt2_course.tokenizer.pre_split(text)` as UTF-8 bytes, e.g.
    b" hello" (the leading space belongs to the word). `ranks` maps a pair of adjacent
    pieces to the order in which training learned to merge it: (b"h", b"e") -> 2, rank 0
    first (`gpt2_course.tokenizer.merge_ranks()`).

    Start from one piece per byte. Then, until no adjacent pair is in `ranks`: find the
    adjacent pair with the lowest rank and merge it into one piece (every occurrence
    of it, left to right). Return the pieces, e.g. [b" hello"]; they join back to `word`.
    Do not change `ranks`.
    """
    raise NotImplementedError("bpe_encode: write it in gpt2_course/exercises/bpe.py")
