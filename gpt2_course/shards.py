"""Text at scale: a corpus tokenised once into uint16 shard files, read back through memory maps.

`load_data` keeps every token in memory, which is fine for a few million tokens. Training
GPT-2 small wants billions, so `prepare_shards` tokenises a corpus once, in parallel, into a
folder of plain files:

    val_000000.bin      the first `val_tokens` tokens (validation)
    train_000000.bin    the next `shard_tokens` tokens, then train_000001.bin, ...
    shards.json         what is in the folder: source, tokenizer, every file's token count
                        and sha256; written last, so a folder with it is complete

Each .bin file is raw little-endian uint16 (GPT-2's 50,257 token ids fit in 16 bits, half
the disk of int32), every document followed by <|endoftext|>, in the corpus's order.

`ShardData` opens the files with `np.memmap`: nothing is read until a window is asked for,
so starting is instant whatever the size, and every DDP process shares the OS page cache.
Windows are consecutive, non-overlapping runs of `seq_len` tokens inside one shard (each
shard's remainder is dropped), numbered across the shards of a split.

Sources: "fineweb-edu" (FineWeb-Edu's 10-billion-token sample) and "openwebtext", streamed
from the Hugging Face Hub, or anything `gpt2_course.data.documents` takes ("builtin", .txt
files). When the Hub cannot be reached we prepare "builtin" instead, and say so.

    gpt2-course shards --source fineweb-edu --out data/fineweb --tokens 1B
"""

import argparse
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import sys
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from gpt2_course.data import (
    DataError,
    _with_deadline,
    documents,
    tokenize_batch,
    tokenized_dataset,
)
from gpt2_course.tokenizer import cache_dir, get_tokenizer
from gpt2_course.trainer import _sha256, _write_atomically  # checkpoints' helpers, shared

FORMAT = "gpt2-course-shards"
VERSION = 1
MANIFEST = "shards.json"
LOCK = ".shards.lock"
SHARD_TOKENS = 100_000_000  # 200 MB a file: few files, each small enough to copy around
VAL_TOKENS_MAX = 10_000_000  # the automatic validation split: a tenth of the text, at most this
FIRST_RUN_TOKENS = 10_000_000  # what `open_shards` prepares by itself: minutes, not hours
STREAM_BATCH_DOCS = 512  # documents per task sent to a tokenising process
HUB_OPEN_SECONDS = 120.0  # give up on a Hub stream whose first document does not come
UINT16_LIMIT = 1 << 16
SHARD_FILE = re.compile(r"(val|train)_\d{6}\.bin")
OUR_TEMP_FILE = re.compile(r"\.(shards\.json|(val|train)_\d{6}\.bin)\..+\.tmp")
SPLITS = ("train", "val")
REQUIRED_KEYS = ("source_asked", "source_used", "description", "n_documents", "n_tokens")


@dataclass(frozen=True)
class HubCorpus:
    repo: str
    config: str | None
    description: str


HUB_SOURCES = {
    "fineweb-edu": HubCorpus(
        "HuggingFaceFW/fineweb-edu",
        "sample-10BT",
        "FineWeb-Edu (HuggingFaceFW/fineweb-edu, sample-10BT): educational web pages",
    ),
    "openwebtext": HubCorpus(
        "Skylion007/openwebtext",
        None,
        "OpenWebText (Skylion007/openwebtext): web pages linked from Reddit, as GPT-2's WebText",
    ),
}


# ------------------------------------------------------------------ small helpers


def _say(verbose: bool):
    return print if verbose else (lambda *args, **kwargs: None)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One preparation per folder at a time: a second process (another DDP rank) waits,
    then finds the folder complete."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; prepare from one process there
        yield
        return
    with (folder / LOCK).open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _vocab_size() -> int:
    return len(get_tokenizer())


def _as_uint16(tokens: np.ndarray) -> np.ndarray:
    if tokens.size and (tokens.min() < 0 or tokens.max() >= UINT16_LIMIT):
        raise DataError(
            f"token id {int(tokens.max())} does not fit in uint16: shards need a vocabulary "
            f"of fewer than {UINT16_LIMIT:,} tokens"
        )
    return tokens.astype("<u2")


def _prepare_command(source: Any, folder: Path, request: dict[str, Any] | None = None) -> str:
    """The command that prepares `folder` again, for error messages."""
    words = ["gpt2-course shards", f"--source {source}", f"--out {folder}"]
    for key, flag in [("max_tokens", "--tokens"), ("val_tokens", "--val-tokens")]:
        if request and request.get(key) is not None:
            words.append(f"{flag} {request[key]}")
    if request and request.get("shard_tokens") not in (None, SHARD_TOKENS):
        words.append(f"--shard-tokens {request['shard_tokens']}")
    return " ".join(words)


# ------------------------------------------------------------------ shards.json


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """shards.json of a prepared folder, checked (not the hashes: see `ShardData.verify`).

    Raises DataError, saying what to do, when the folder is not a complete preparation.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(
            f"there is no folder {folder}: prepare shards first, e.g. "
            f"{_prepare_command('fineweb-edu', folder)}"
        )
    path = folder / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{folder} holds no {MANIFEST}: it is not a shards folder, or its preparation was "
            f"interrupted. Prepare it (again): {_prepare_command('SOURCE', folder)}"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(
            f"{path} is not valid JSON ({error}): the folder is damaged; prepare it again into "
            f"a new folder: {_prepare_command('SOURCE', folder)}"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(
            f"{path} is not a {FORMAT} file (format: {found!r}): point to a folder made by "
            "`gpt2-course shards`"
        )
    if manifest.get("version") != VERSION:
        raise DataError(
            f"{path} has version {manifest.get('version')!r}; this gpt2-course reads version "
            f"{VERSION}. Update gpt2-course, or prepare the folder again"
        )
    asked = manifest.get("source_asked", "SOURCE")
    again = _prepare_command(asked, folder, manifest.get("request"))
    shards = manifest.get("shards")
    if not isinstance(shards, dict) or set(shards) != set(SPLITS):
        raise DataError(f"{path} lists no train and val shards: prepare it again: {again}")
    for split in SPLITS:
        entries = shards[split]
        if not isinstance(entries, list) or not entries:
            raise DataError(f"{path} lists no {split} shard: prepare it again: {again}")
        for entry in entries:
            name = entry.get("file") if isinstance(entry, dict) else None
            tokens = entry.get("tokens") if isinstance(entry, dict) else None
            # plain names only: a manifest must never point outside its folder
            if not isinstance(name, str) or not SHARD_FILE.fullmatch(name):
                raise DataError(f"{path} lists a bad shard entry {entry!r}: prepare it again")
            if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
                raise DataError(f"{path} gives {name} a bad token count {tokens!r}")
            file = folder / name
            if not file.is_file():
                raise DataError(
                    f"{name} is missing from {folder}: the folder is incomplete; "
                    f"prepare it again: {again}"
                )
            size = file.stat().st_size
            if size != 2 * tokens:
                raise DataError(
                    f"{name} holds {size:,} bytes, but {MANIFEST} says {tokens:,} tokens "
                    f"({2 * tokens:,} bytes of uint16): the file was truncated or changed; "
                    f"prepare the folder again: {again}"
                )
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}: prepare the folder again: {again}")
    if manifest.get("dtype") != "uint16" or manifest.get("byte_order") != "little":
        raise DataError(f"{path} stores {manifest.get('dtype')!r} tokens; expected uint16")
    return manifest


def _request(
    source: Any, max_tokens: int | None, val_tokens: int | None, shard_tokens: int
) -> dict[str, Any]:
    """What was asked, as JSON holds it: two preparations are the same when this is."""
    if isinstance(source, str | Path):
        source = str(source)
    else:
        source = [str(item) for item in source]
    return {
        "source": source,
        "max_tokens": max_tokens,
        "val_tokens": val_tokens,
        "shard_tokens": shard_tokens,
        "tokenizer": "gpt2",
    }


# ------------------------------------------------------------------ writing


class _ShardWriter:
    """Takes the token stream in order; writes val_000000.bin, then train shards.

    Each file is written under a temporary name and moved into place once full (or at the
    end), so a file with a shard's name is always complete.
    """

    def __init__(
        self, folder: Path, val_tokens: int, shard_tokens: int, max_tokens: int | None
    ) -> None:
        self.folder, self.val_tokens, self.shard_tokens = folder, val_tokens, shard_tokens
        self.max_tokens = max_tokens
        self.n_tokens = 0
        self.n_documents = 0
        self.shards: dict[str, list[dict[str, Any]]] = {"val": [], "train": []}
        self._open: dict[str, Any] | None = None

    @property
    def full(self) -> bool:
        return self.max_tokens is not None and self.n_tokens >= self.max_tokens

    def add(self, tokens: np.ndarray, doc_lengths: np.ndarray) -> None:
        """Append the tokens of some documents (`doc_lengths` says how many each has)."""
        if self.max_tokens is not None and len(tokens) > self.max_tokens - self.n_tokens:
            room = self.max_tokens - self.n_tokens
            starts = np.cumsum(doc_lengths) - doc_lengths
            doc_lengths = doc_lengths[: int(np.searchsorted(starts, room))]  # those begun
            tokens = tokens[:room]
        self.n_documents += len(doc_lengths)
        tokens = _as_uint16(np.asarray(tokens))
        while len(tokens):
            if self._open is None:
                self._start_file()
            current = self._open
            take = min(len(tokens), current["capacity"] - current["tokens"])
            data = tokens[:take].tobytes()
            current["handle"].write(data)
            current["hash"].update(data)
            current["tokens"] += take
            self.n_tokens += take
            tokens = tokens[take:]
            if current["tokens"] == current["capacity"]:
                self._finish_file()

    def _start_file(self) -> None:
        split = "train" if self.shards["val"] else "val"
        name = f"{split}_{len(self.shards[split]):06d}.bin"
        capacity = self.val_tokens if split == "val" else self.shard_tokens
        handle, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{name}.", suffix=".tmp")
        self._open = dict(
            split=split,
            name=name,
            tmp=tmp,
            handle=os.fdopen(handle, "wb"),
            hash=hashlib.sha256(),
            tokens=0,
            capacity=capacity,
        )

    def _finish_file(self) -> None:
        current, self._open = self._open, None
        current["handle"].close()
        os.chmod(current["tmp"], 0o644)
        os.replace(current["tmp"], self.folder / current["name"])
        digest = current["hash"].hexdigest()
        entry = {"file": current["name"], "tokens": current["tokens"], "sha256": digest}
        self.shards[current["split"]].append(entry)

    def close(self) -> None:
        """Move the last, partly filled file into place."""
        if self._open is not None:
            self._finish_file()

    def abandon(self) -> None:
        """Remove the file being written (after an error or Ctrl-C)."""
        if self._open is not None:
            self._open["handle"].close()
            with contextlib.suppress(OSError):
                os.unlink(self._open["tmp"])
            self._open = None


def _tokenize_texts(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of some documents, each followed by <|endoftext|>, and each one's length.

    Runs in the tokenising processes; returns uint16 to send half the bytes back.
    """
    ids = tokenize_batch({"text": texts})["ids"]
    lengths = np.fromiter((len(doc) for doc in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    return _as_uint16(flat), lengths


def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(texts)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _fresh_processes():
    """Workers that do not inherit this process's threads (a Hub stream runs some, torch
    others; forking them can deadlock): forked from a clean server that has imported this
    module once, or spawned where there is no such server (Windows)."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return context
    return multiprocessing.get_context("spawn")


def _tokenized_stream(
    texts: Iterable[str], num_proc: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens, document lengths) per batch of documents, in order, from `num_proc` processes.

    At most two batches per process are in flight: a stream of billions of tokens is
    never read ahead into memory.
    """
    batches = _batches(texts, STREAM_BATCH_DOCS)
    if num_proc == 1:
        yield from map(_tokenize_texts, batches)
        return
    with _fresh_processes().Pool(num_proc) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_tokenize_texts, (batch,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _dataset_stream(dataset, num_proc: int) -> tuple[Iterator[tuple[np.ndarray, np.ndarray]], int]:
    """Tokenise a `datasets.Dataset` with a parallel `map`; (batches as above, total tokens)."""
    import pyarrow.compute as pc

    tokenized = tokenized_dataset(dataset, num_proc if num_proc > 1 else None)
    column = tokenized.data.column("ids")
    total = int(pc.sum(pc.list_value_length(column)).as_py() or 0)

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for chunk in column.chunks:  # straight from Arrow, a record batch at a time
            lengths = pc.list_value_length(chunk).to_numpy(zero_copy_only=False)
            yield chunk.flatten().to_numpy(zero_copy_only=False), lengths.astype(np.int64)

    return chunks(), total


def _hub_unavailable() -> str | None:
    """Why the Hub cannot be used now, or None when it answers."""
    from gpt2_course.reference import hub_reachable, offline_forced

    if offline_forced():
        return "offline mode is on (GPT2_COURSE_OFFLINE / HF_HUB_OFFLINE)"
    if not hub_reachable():
        return "the Hugging Face Hub did not answer"
    return None


def _hub_texts(name: str) -> Iterator[str]:
    """The documents of a Hub corpus, streamed (nothing is downloaded ahead)."""
    import datasets

    corpus = HUB_SOURCES[name]
    stream = datasets.load_dataset(corpus.repo, corpus.config, split="train", streaming=True)
    for row in stream:
        yield row["text"]


def _open_hub_stream(name: str) -> Iterator[str]:
    """`_hub_texts`, once its first document has come (within HUB_OPEN_SECONDS)."""
    texts = iter(_hub_texts(name))
    first = _with_deadline(lambda: next(texts), HUB_OPEN_SECONDS)
    return itertools.chain([first], texts)


# ------------------------------------------------------------------ preparing


def _check_count(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise DataError(f"{name} must be a whole number >= {minimum}, got {value!r}")


def _refuse_other_files(folder: Path) -> None:
    """A folder without shards.json may hold only what an interrupted preparation leaves."""
    if (folder / MANIFEST).exists() or not folder.is_dir():
        return
    foreign = sorted(
        p.name
        for p in folder.iterdir()
        if p.name != LOCK
        and not SHARD_FILE.fullmatch(p.name)
        and not OUR_TEMP_FILE.fullmatch(p.name)
    )
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise DataError(
            f"{folder} already holds other files ({shown}): choose an empty or new folder "
            "for the shards"
        )


def _existing_preparation(folder: Path, request: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of a preparation of `request` already in `folder` (maybe damaged), or None.

    Raises DataError when the folder holds anything else: we never overwrite it.
    """
    if not (folder / MANIFEST).exists():
        _refuse_other_files(folder)
        return None  # empty, or what an interrupted preparation left: ours to overwrite
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(
            f"{folder / MANIFEST} cannot be read ({error}): choose another folder, or delete "
            f"{folder} yourself to prepare it again"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{folder / MANIFEST} is not a {FORMAT} file: choose another folder")
    held = manifest.get("request")
    if held != request:
        held = held if isinstance(held, dict) else {}
        differ = [key for key in request if held.get(key) != request[key]]
        theirs = ", ".join(f"{key}={held.get(key)!r}" for key in differ)
        yours = ", ".join(f"{key}={request[key]!r}" for key in differ)
        raise DataError(
            f"{folder} already holds a different preparation ({theirs}; you asked for {yours}): "
            f"choose another --out folder, or delete {folder} yourself to prepare it again"
        )
    return manifest


def _auto_val_tokens(total: int | None) -> int:
    """A tenth of the text (at most VAL_TOKENS_MAX); VAL_TOKENS_MAX when the size is unknown."""
    return VAL_TOKENS_MAX if total is None else max(1, min(VAL_TOKENS_MAX, total // 10))


def prepare_shards(
    source: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    *,
    max_tokens: int | None = None,
    val_tokens: int | None = None,
    shard_tokens: int = SHARD_TOKENS,
    num_proc: int | None = None,
    verbose: bool = True,
) -> Path:
    """Tokenise `source` into uint16 shard files in `out_dir` (see the module docstring).

    `max_tokens`: stop there (default: the whole corpus). `val_tokens`: the validation
    split, the first tokens (default: a tenth, at most 10M). `num_proc`: tokenising
    processes (default: one per CPU for Hub corpora, one per 1,000 local documents).
    A second call with the same arguments returns at once. Returns the folder.
    """
    _check_count("max_tokens", max_tokens, 2, optional=True)
    _check_count("val_tokens", val_tokens, 1, optional=True)
    _check_count("shard_tokens", shard_tokens, 1)
    _check_count("num_proc", num_proc, 1, optional=True)
    if max_tokens is not None and val_tokens is not None and val_tokens >= max_tokens:
        raise DataError(
            f"val_tokens={val_tokens:,} leaves nothing to train on out of max_tokens="
            f"{max_tokens:,}: lower val_tokens (or leave it out: a tenth of the text)"
        )
    request = _request(source, max_tokens, val_tokens, shard_tokens)
    folder = Path(out_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder} is a file, not a folder: choose a folder for the shards")
    _refuse_other_files(folder)  # before the lock file: leave other people's folders alone
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        _prepare_locked(source, folder, request, num_proc, verbose)
    except BaseException:
        if created:  # a failed first run leaves no empty folder behind
            with contextlib.suppress(OSError):
                (folder / LOCK).unlink()
                folder.rmdir()  # only if nothing else is in it
        raise
    return folder


def _prepare_locked(
    source: Any, folder: Path, request: dict[str, Any], num_proc: int | None, verbose: bool
) -> None:
    say = _say(verbose)
    with _locked(folder):
        old = _existing_preparation(folder, request)
        if old is not None:
            try:
                read_manifest(folder)
            except DataError as damage:
                say(f"{folder} is damaged ({damage}); preparing it again.")
            else:
                reason = old.get("fallback_reason")
                if not reason or _hub_unavailable():
                    say(f"{folder} already holds this preparation: nothing to do.")
                    if reason:
                        say(
                            f"Note: it holds {old['source_used']!r} instead of "
                            f"{old['source_asked']!r}, because {reason}."
                        )
                    return
                say(f"The Hub answers now: replacing the {old['source_used']!r} stand-in.")
            (folder / MANIFEST).unlink()  # the folder is incomplete until the new one is written
        for leftover in folder.iterdir():  # temporary files of an interrupted run
            if OUR_TEMP_FILE.fullmatch(leftover.name):
                leftover.unlink()
        manifest = _write_shards(source, folder, request, num_proc, verbose)
        text = json.dumps(manifest, indent=1)
        _write_atomically(folder / MANIFEST, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        if old is not None:  # files of the replaced preparation that the new one did not reuse
            kept = {entry["file"] for split in SPLITS for entry in manifest["shards"][split]}
            for split in SPLITS:
                for entry in old.get("shards", {}).get(split, []):
                    name = entry.get("file") if isinstance(entry, dict) else None
                    if isinstance(name, str) and SHARD_FILE.fullmatch(name) and name not in kept:
                        with contextlib.suppress(OSError):
                            (folder / name).unlink()
    say(shards_summary(folder))


def _write_shards(
    source: Any,
    folder: Path,
    request: dict[str, Any],
    num_proc: int | None,
    verbose: bool,
) -> dict[str, Any]:
    """Tokenise and write every shard file; returns the manifest (not yet written)."""
    import datasets
    from tqdm.auto import tqdm

    say = _say(verbose)
    max_tokens, val_tokens = request["max_tokens"], request["val_tokens"]
    vocab = _vocab_size()
    if vocab >= UINT16_LIMIT:
        raise DataError(
            f"the tokenizer has {vocab:,} tokens: uint16 shards hold ids below {UINT16_LIMIT:,}"
        )
    asked = request["source"]
    fallback = texts = None
    if isinstance(asked, str) and asked in HUB_SOURCES:
        fallback = _hub_unavailable()
        if fallback is None:
            try:
                texts = _open_hub_stream(asked)
            except Exception as error:  # a moved data set, a stalled or refused download...
                fallback = f"streaming it failed ({type(error).__name__}: {error})"
        if fallback is not None:
            say(f"Cannot stream {asked}: {fallback}.")
            say("Preparing the builtin corpus instead (Python's documentation, offline).")
            source = "builtin"
    bars_were_on = datasets.is_progress_bar_enabled()
    if not verbose:
        datasets.disable_progress_bars()
    try:
        if texts is not None:
            used, description = asked, HUB_SOURCES[asked].description
            batches = _tokenized_stream(texts, num_proc or os.cpu_count() or 1)
            known = max_tokens  # a stream's length is known only at its end
        else:
            dataset, used, description = documents(source, verbose=verbose)
            if fallback is None and asked in ("auto", "tinystories") and used != "tinystories":
                fallback = "the Hugging Face Hub did not answer (or offline mode is on)"
            workers = num_proc or max(1, min(os.cpu_count() or 1, len(dataset) // 1000))
            batches, total = _dataset_stream(dataset, workers)
            known = total if max_tokens is None else min(total, max_tokens)
            if val_tokens is not None and val_tokens >= known:
                raise DataError(
                    f"{description} gives {known:,} tokens: val_tokens={val_tokens:,} leaves "
                    "none to train on. Lower val_tokens, or use more text"
                )
        val = val_tokens or _auto_val_tokens(known)
        writer = _ShardWriter(folder, val, request["shard_tokens"], max_tokens)
        bar = tqdm(total=known, unit="tok", unit_scale=True, desc="Shards", disable=not verbose)
        with contextlib.closing(batches), bar:
            try:
                for tokens, lengths in batches:
                    before = writer.n_tokens
                    writer.add(tokens, lengths)
                    bar.update(writer.n_tokens - before)
                    if writer.full:
                        break
                writer.close()
            except BaseException as error:
                writer.abandon()
                hub_failed = isinstance(error, Exception) and not isinstance(error, DataError)
                if texts is None or not hub_failed:
                    raise
                raise DataError(  # the connection dropped, the Hub stopped answering...
                    f"streaming {asked} failed after {writer.n_tokens:,} tokens "
                    f"({type(error).__name__}: {error}): {folder} is incomplete; run the same "
                    "preparation again"
                ) from error
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    if not writer.shards["train"]:
        raise DataError(
            f"the text ran out after {writer.n_tokens:,} tokens, all of them taken by the "
            f"validation split ({val:,} tokens): lower val_tokens, or use more text"
        )
    return {
        "format": FORMAT,
        "version": VERSION,
        "request": request,
        "source_asked": asked,
        "source_used": used,
        "fallback_reason": fallback,
        "description": description,
        "tokenizer": "gpt2",
        "vocab_size": vocab,
        "dtype": "uint16",
        "byte_order": "little",
        "shards": writer.shards,
        "n_documents": writer.n_documents,
        "n_tokens": writer.n_tokens,
    }


def shards_summary(folder: str | Path) -> str:
    """A few lines saying what a prepared folder holds."""
    manifest = read_manifest(folder)
    shards = manifest["shards"]
    val = sum(entry["tokens"] for entry in shards["val"])
    train = sum(entry["tokens"] for entry in shards["train"])
    lines = [
        f"{folder}: {manifest['description']}: {manifest['n_documents']:,} documents, "
        f"{manifest['n_tokens']:,} tokens",
        f"  validation: {val:,} tokens; training: {train:,} tokens in "
        f"{len(shards['train'])} shard(s)",
    ]
    if manifest.get("fallback_reason"):
        lines.append(
            f"  (stands in for {manifest['source_asked']!r}, because {manifest['fallback_reason']})"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ reading


class ShardData:
    """A prepared shards folder, cut into windows of `seq_len` tokens, read through memory maps.

    Window i of a split is the i-th run of `seq_len` tokens, counting through the split's
    shards in order; a window never crosses from one shard into the next.
    """

    def __init__(self, folder: str | Path, seq_len: int) -> None:
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
            raise DataError(f"seq_len must be at least 2 (a token and the next one), got {seq_len}")
        self.folder = Path(folder).expanduser()
        manifest = read_manifest(self.folder)
        self.seq_len = seq_len
        self.source: str = manifest["source_used"]
        self.source_asked = manifest["source_asked"]
        self.fallback: str | None = manifest.get("fallback_reason")
        self.description: str = manifest["description"]
        self.n_documents: int = manifest["n_documents"]
        self.n_tokens: int = manifest["n_tokens"]
        self._entries = manifest["shards"]
        self._maps = self._open_maps()
        self._first: dict[str, np.ndarray] = {}  # window number each shard starts at, and the end
        for split in SPLITS:
            entries = self._entries[split]
            per_shard = [e["tokens"] // seq_len for e in entries]
            self._first[split] = np.concatenate([[0], np.cumsum(per_shard)]).astype(np.int64)
            if self.n_windows(split) == 0:
                longest = max(e["tokens"] for e in entries)
                raise DataError(
                    f"the {split} split of {self.folder} has no window of {seq_len} tokens "
                    f"(its largest shard holds {longest:,} tokens, and windows stay inside a "
                    "shard): use a shorter seq_len, or prepare more tokens"
                )

    def _open_maps(self) -> dict[str, list[np.ndarray]]:
        return {
            split: [
                np.memmap(self.folder / e["file"], dtype="<u2", mode="r")
                if e["tokens"]
                else np.zeros(0, dtype="<u2")  # an empty file cannot be mapped
                for e in self._entries[split]
            ]
            for split in SPLITS
        }

    # Sent to another process (a DataLoader worker), a memmap would travel as a copy of
    # every token: send the folder's description and map the files again there.
    def __getstate__(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "_maps"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._maps = self._open_maps()

    def _split(self, split: str) -> str:
        if split not in SPLITS:
            raise DataError(f"split must be 'train' or 'val', got {split!r}")
        return split

    def n_windows(self, split: str) -> int:
        return int(self._first[self._split(split)][-1])

    def read(self, split: str, indices: Int[Tensor, "n"]) -> Int[Tensor, "n seq_len"]:
        """The windows numbered `indices` of `split`, read from disk, as torch.long."""
        total = self.n_windows(split)
        indices = torch.as_tensor(indices)
        dtype = indices.dtype
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            raise TypeError(f"window indices must be integers, got a {indices.dtype} tensor")
        if indices.dim() != 1:
            raise IndexError(
                f"window indices must be a 1-D tensor, got shape {list(indices.shape)}"
            )
        wanted = indices.cpu().numpy().astype(np.int64)
        bad = wanted[(wanted < 0) | (wanted >= total)]
        if bad.size:
            raise IndexError(
                f"window {int(bad[0])} is out of range: the {split} split has {total:,} windows "
                f"of {self.seq_len} tokens (0 to {total - 1:,})"
            )
        first = self._first[split]
        shard = np.searchsorted(first, wanted, side="right") - 1
        start = (wanted - first[shard]) * self.seq_len
        out = np.empty((len(wanted), self.seq_len), dtype=np.int64)
        maps = self._maps[split]
        for row, (s, begin) in enumerate(zip(shard.tolist(), start.tolist(), strict=True)):
            out[row] = maps[s][begin : begin + self.seq_len]
        return torch.from_numpy(out)

    def sample(self, split: str, n: int) -> Int[Tensor, "n seq_len"]:
        """`n` windows spread evenly over `split` (all of them if it has fewer): the same
        windows every call, so evaluations compare."""
        total = self.n_windows(split)
        if not isinstance(n, int) or n < 0:
            raise DataError(f"n must be a whole number >= 0, got {n!r}")
        if n >= total:
            return self.read(split, torch.arange(total))
        # the first, the last and evenly between, as TokenData.sample picks them
        return self.read(split, torch.from_numpy(np.linspace(0, total - 1, n).round()).long())

    def verify(self) -> None:
        """Hash every shard and compare with shards.json (slow: reads every byte)."""
        for split in SPLITS:
            for entry in self._entries[split]:
                if _sha256(self.folder / entry["file"]) != entry.get("sha256"):
                    raise DataError(
                        f"{entry['file']} in {self.folder} has changed since it was prepared "
                        f"(its sha256 differs from {MANIFEST}): prepare the folder again"
                    )

    def summary(self) -> str:
        text = (
            f"{self.description}: {self.n_documents:,} documents, {self.n_tokens:,} tokens -> "
            f"{self.n_windows('train'):,} training and {self.n_windows('val'):,} validation "
            f"windows of {self.seq_len} tokens (memory-mapped shards in {self.folder})"
        )
        if self.fallback:
            text += f"; stands in for {self.source_asked!r}, because {self.fallback}"
        return text


def _looks_like_shards(folder: Path) -> bool:
    return folder.is_dir() and any(
        p.name == MANIFEST or SHARD_FILE.fullmatch(p.name) for p in folder.iterdir()
    )


def open_shards(data: Any, seq_len: int, *, verbose: bool = True) -> ShardData | None:
    """Shards for `data` when it names them, else None (the caller loads it into memory).

    A folder prepared by `prepare_shards` opens as it is; "fineweb-edu" or "openwebtext"
    is prepared first (FIRST_RUN_TOKENS tokens, into the course's cache folder).
    """
    say = _say(verbose)
    if not isinstance(data, str | Path):
        return None
    folder = Path(data).expanduser()
    if _looks_like_shards(folder):
        shards = ShardData(folder, seq_len)
    elif str(data) in HUB_SOURCES:
        folder = cache_dir() / "shards" / str(data)
        prepare_shards(str(data), folder, max_tokens=FIRST_RUN_TOKENS, verbose=verbose)
        shards = ShardData(folder, seq_len)
        if not shards.fallback:
            say(
                f"{FIRST_RUN_TOKENS:,} tokens of {data}, enough for a first run. For more, "
                f"prepare them once: gpt2-course shards --source {data} --out DIR --tokens 1B, "
                "and train with --data DIR"
            )
    else:
        return None
    say(shards.summary())
    return shards


# ------------------------------------------------------------------ command line


def _token_count(text: str) -> int:
    """A count of tokens as people write it: 5000, 10_000, 10M, 1.5B."""
    scale = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}
    cleaned = text.strip().replace("_", "").replace(",", "").upper()
    try:
        if cleaned and cleaned[-1] in scale:
            value = float(cleaned[:-1]) * scale[cleaned[-1]]
            if value != int(value):
                raise ValueError
            return int(value)
        return int(cleaned)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a count of tokens (write e.g. 5000, 10M or 1B)"
        ) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def _shards_command(args: argparse.Namespace) -> int:
    try:
        prepare_shards(
            args.source,
            args.out,
            max_tokens=args.tokens,
            val_tokens=args.val_tokens,
            shard_tokens=args.shard_tokens,
            num_proc=args.num_proc,
        )
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: {args.out} is incomplete; run the same command again", file=sys.stderr)
        return 130
    print(f"Train on it with --data {args.out}")
    return 0


def add_cli(subparsers: Any) -> None:
    """Register `gpt2-course shards`."""
    p = subparsers.add_parser(
        "shards",
        help="tokenise a large corpus once into uint16 shard files, to train at scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--source",
        required=True,
        help="fineweb-edu, openwebtext (streamed from the Hub), builtin, builtin-large, "
        "or .txt files (a path, glob or folder)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    p.add_argument(
        "--tokens", type=_token_count, metavar="N", help="stop after N tokens (10M, 1B, ...)"
    )
    p.add_argument(
        "--val-tokens",
        type=_token_count,
        metavar="N",
        help=f"validation tokens (default: a tenth, at most {VAL_TOKENS_MAX:,})",
    )
    p.add_argument(
        "--shard-tokens",
        type=_token_count,
        default=SHARD_TOKENS,
        metavar="N",
        help=f"tokens per training shard (default {SHARD_TOKENS:,})",
    )
    p.add_argument(
        "--num-proc", type=_positive_int, metavar="N", help="tokenising processes (default: CPUs)"
    )
    p.set_defaults(func=_shards_command)


__all__ = [
    "ShardData",
    "add_cli",
    "open_shards",
    "prepare_shards",
    "read_manifest",
    "shards_summary",
]
