"""Text for training: documents -> GPT-2 tokens -> fixed-length windows, split train/validation.

Where the text comes from (`data=`):

* ``"tinystories"``: the first stories of TinyStories (`roneneldan/TinyStories` on the
  Hugging Face Hub): short stories in simple English, written so that models of a few
  million parameters can learn fluent grammar. The online default.
* ``"builtin"``: English prose already on every machine with Python: the language
  reference that ships with CPython (`pydoc_data`, what `help("for")` shows), about
  110,000 tokens. No network, no generated text. The offline default, and what CI
  trains on. (Where a Python lacks `pydoc_data`, the standard library's docstrings.)
* ``"builtin-large"``: the language reference and the docstrings of the standard
  library, about half a million tokens: for longer runs.
* a path, a glob or a folder of ``.txt`` files (or a list of them): your own text,
  one document per file.
* ``"auto"``: TinyStories when the Hub answers within a few seconds, otherwise
  ``"builtin"``, and it says so.

Tokenising goes through `datasets` (a batched `map`), so its results are cached in the
course's cache folder (`GPT2_COURSE_CACHE`, default ``~/.cache/gpt2-course/datasets``)
and a second run starts at once.

Every document ends with ``<|endoftext|>``; the documents, shuffled with the seed, are
joined into one stream of tokens, cut into windows of `seq_len` tokens (the remainder is
dropped), and the last `val_fraction` of the windows is the validation split.
"""

import ast
import glob
import importlib.util
import math
import sys
import sysconfig
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from gpt2_course.tokenizer import END_OF_TEXT_ID, cache_dir, get_tokenizer

TINYSTORIES = "roneneldan/TinyStories"
TINYSTORIES_DOCUMENTS = 20_000  # about 4M tokens: more than a laptop trains on in an hour
HUB_DEADLINE_SECONDS = 300.0  # give up on a download that stalls, and fall back
BUILTIN = ("builtin", "builtin-large")
BUILTIN_VERSION = 3  # bump when the builtin corpora change, to refresh the cache
# Parts of the standard library whose docstrings are not prose (tests, demos, GUI glue).
_SKIP_STDLIB = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "ensurepip",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "encodings",
    "tkinter",
}


class DataError(ValueError):
    """The text asked for cannot be used (missing file, too little text, ...)."""


@dataclass
class TokenData:
    """Tokenised text cut into windows, ready to train on."""

    train: Int[Tensor, "n_train seq_len"]
    val: Int[Tensor, "n_val seq_len"]
    source: str  # "tinystories", "builtin" or "files"
    description: str  # one line saying what the text is
    n_documents: int
    n_tokens: int  # tokens in the whole corpus, <|endoftext|> separators included

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]

    # The trainer reads windows through these three, so that memory-mapped shards
    # (`gpt2_course.shards.ShardData`) can stand in for data held in memory.
    def n_windows(self, split: str) -> int:
        return len(self._split(split))

    def read(self, split: str, indices: Int[Tensor, "n"]) -> Int[Tensor, "n seq_len"]:
        return self._split(split)[indices]

    def sample(self, split: str, n: int) -> Int[Tensor, "m seq_len"]:
        """`n` windows evenly spread over the split (all of them if it has fewer)."""
        return spread_windows(self._split(split), n)

    def _split(self, split: str) -> Tensor:
        if split not in ("train", "val"):
            raise ValueError(f"split is 'train' or 'val', not {split!r}")
        return self.train if split == "train" else self.val

    def summary(self) -> str:
        return (
            f"{self.description}: {self.n_documents:,} documents, {self.n_tokens:,} tokens -> "
            f"{len(self.train):,} training and {len(self.val):,} validation windows "
            f"of {self.seq_len} tokens"
        )


def spread_windows(windows: Tensor, n: int) -> Tensor:
    """`n` windows evenly spread over the split (the first n would come from one or two
    documents only): the same ones every time."""
    if n >= len(windows):
        return windows
    return windows[torch.linspace(0, len(windows) - 1, n).round().long()]


def datasets_cache() -> Path:
    return cache_dir() / "datasets"


# ------------------------------------------------------------------ documents


def _module_docstrings(path: Path) -> str | None:
    """Every docstring of one source file, as one document (None when there are none)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return None
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, kinds):
            doc = ast.get_docstring(node)
            if doc and len(doc.split()) >= 8:  # skip one-word stubs like "Return x."
                parts.append(doc.strip())
    return "\n\n".join(parts) or None


def _new_paragraphs(text: str, seen: set[str]) -> str:
    """`text` without the paragraphs already seen in an earlier document.

    The reference reuses whole sections across topics (the `if` statement appears under
    "if" and under "compound"); left in, the same paragraph could land in both the
    training and the validation split, and the validation loss would reward memorising.
    """
    kept = []
    for paragraph in text.split("\n\n"):
        key = " ".join(paragraph.split())
        if len(key) >= 40:  # short lines ("Note:", "Example:") may repeat freely
            if key in seen:
                continue
            seen.add(key)
        kept.append(paragraph)
    return "\n\n".join(kept).strip()


def python_documentation(
    stdlib: str, python: str, version: int, reference: bool = True, docstrings: bool = False
) -> Iterator[dict[str, str]]:
    """The builtin corpora: CPython's language-reference topics and/or stdlib docstrings,
    each paragraph once.

    `python` (sys.version) and `version` only key the cache.
    """
    del python, version
    seen: set[str] = set()
    if reference:
        from pydoc_data.topics import topics

        for name in sorted(topics):
            text = _new_paragraphs(topics[name], seen)
            if text:
                yield {"text": text, "name": f"pydoc:{name}"}
    if docstrings:
        root = Path(stdlib)
        for path in sorted(root.rglob("*.py")):
            if _SKIP_STDLIB.intersection(path.relative_to(root).parts):
                continue
            text = _new_paragraphs(_module_docstrings(path) or "", seen)
            if text:
                yield {"text": text, "name": f"stdlib:{path.relative_to(root).as_posix()}"}


def tinystories_documents(repo: str, count: int) -> Iterator[dict[str, str]]:
    """The first `count` stories of TinyStories' training split, streamed from the Hub."""
    import datasets

    stream = datasets.load_dataset(repo, split="train", streaming=True)
    for i, row in enumerate(stream):
        if i >= count:
            break
        yield {"text": row["text"].strip(), "name": f"{repo}:{i}"}


def _from_generator(generator: Callable[..., Iterator[dict]], **kwargs: Any):
    import datasets

    return datasets.Dataset.from_generator(
        generator, gen_kwargs=kwargs, cache_dir=str(datasets_cache())
    )


def text_files(data: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expand paths, globs and folders into a sorted list of existing text files."""
    items = [data] if isinstance(data, str | Path) else list(data)
    files: list[Path] = []
    for item in items:
        item = Path(item).expanduser()
        if item.is_dir():
            found = sorted(item.rglob("*.txt"))
            if not found:
                raise DataError(f"the folder {item} holds no .txt files")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            found = sorted(Path(p) for p in glob.glob(str(item), recursive=True))
            found = [p for p in found if p.is_file()]
            if not found:
                raise DataError(f"no text file matches {str(item)!r}")
            files += found
    return sorted(set(files))


def _load_files(files: list[Path]):
    import datasets

    for path in files:
        try:
            with path.open(encoding="utf-8") as handle:
                handle.read(1 << 16)
        except UnicodeDecodeError as error:
            raise DataError(
                f"{path} is not UTF-8 text ({error.reason} at byte {error.start})"
            ) from None
    return datasets.load_dataset(
        "text",
        data_files=[str(p) for p in files],
        sample_by="document",
        split="train",
        cache_dir=str(datasets_cache()),
    )


def _with_deadline(fn: Callable[[], Any], seconds: float) -> Any:
    """Run `fn` in a thread; raise TimeoutError if it has not finished after `seconds`."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as error:  # handed back to the caller below
            result["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"gave up after {seconds:.0f} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def documents(data: str | Path | Sequence[str | Path] = "auto", *, verbose: bool = True):
    """A `datasets.Dataset` with a "text" column, and (source, description)."""
    from gpt2_course.reference import hub_reachable

    say = print if verbose else (lambda *a, **k: None)
    if isinstance(data, str) and data == "auto":
        if hub_reachable():
            data = "tinystories"
        else:
            say(
                "The Hugging Face Hub is not reachable (or offline mode is on), so we train on "
                "the builtin corpus: Python's own documentation, which ships with every Python."
            )
            data = "builtin"
    if isinstance(data, str) and data == "tinystories":
        try:
            dataset = _with_deadline(
                lambda: _from_generator(
                    tinystories_documents, repo=TINYSTORIES, count=TINYSTORIES_DOCUMENTS
                ),
                HUB_DEADLINE_SECONDS,
            )
            return dataset, "tinystories", f"TinyStories ({TINYSTORIES}, first stories)"
        except Exception as error:  # no network, a stalled download, a moved data set...
            say(f"Could not load TinyStories ({type(error).__name__}: {error}).")
            say("Falling back to the builtin corpus: Python's own documentation.")
            data = "builtin"
    if isinstance(data, str) and data in BUILTIN:
        has_reference = importlib.util.find_spec("pydoc_data") is not None
        docstrings = data == "builtin-large" or not has_reference
        dataset = _from_generator(
            python_documentation,
            stdlib=sysconfig.get_paths()["stdlib"],
            python=sys.version,
            version=BUILTIN_VERSION,
            reference=has_reference,
            docstrings=docstrings,
        )
        if len(dataset) == 0:
            raise DataError(
                "this Python installation ships no documentation to train on; "
                "point to your own text instead (data='path/to/*.txt')"
            )
        what = " + ".join(
            name
            for name, used in [("language reference", has_reference), ("docstrings", docstrings)]
            if used
        )
        python = ".".join(map(str, sys.version_info[:3]))
        return dataset, "builtin", f"Python {python}'s documentation ({what})"
    files = text_files(data)
    names = ", ".join(p.name for p in files[:3]) + (", ..." if len(files) > 3 else "")
    return _load_files(files), "files", f"your text files ({len(files)}: {names})"


# ------------------------------------------------------------------ tokens and windows


def tokenize_batch(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
    """GPT-2 tokens of each document, each followed by <|endoftext|>."""
    ids = get_tokenizer()(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
    return {"ids": [doc + [END_OF_TEXT_ID] for doc in ids]}


def tokenized_dataset(dataset, num_proc: int | None = None):
    """`dataset` (a "text" column) as one "ids" column of tokens per document, cached by
    `datasets`; in `num_proc` processes where given."""
    return dataset.map(
        tokenize_batch,
        batched=True,
        batch_size=256,
        num_proc=num_proc,
        remove_columns=dataset.column_names,
        desc="Tokenizing",
    )


def tokenize(dataset) -> tuple[np.ndarray, np.ndarray]:
    """All tokens of all documents, concatenated, and where each document starts.

    Returns (tokens [n_tokens], offsets [n_documents + 1]).
    """
    tokenized = tokenized_dataset(dataset)
    # Straight from the Arrow column: one flat array of tokens and where each document starts.
    column = tokenized.data.column("ids").combine_chunks()
    offsets = np.asarray(column.offsets, dtype=np.int64)
    tokens = np.asarray(column.values, dtype=np.int64)[offsets[0] : offsets[-1]]
    return tokens, offsets - offsets[0]


def cut_windows(stream: Int[Tensor, "n_tokens"], seq_len: int) -> Int[Tensor, "n seq_len"]:
    """The course's rule for windows (notebook 06's `make_windows`, whose check compares with
    this): consecutive, non-overlapping windows of `seq_len` tokens, the remainder dropped,
    a copy of `stream`."""
    n_windows = len(stream) // seq_len
    return stream[: n_windows * seq_len].reshape(n_windows, seq_len).clone()


WindowCutter = Callable[[Tensor, int], Tensor]


def windows(
    tokens: np.ndarray,
    offsets: np.ndarray,
    seq_len: int,
    val_fraction: float,
    seed: int,
    cut: WindowCutter | None = None,
) -> tuple[Tensor, Tensor]:
    """Shuffle the documents, join them, cut windows of `seq_len`; the last ones validate.

    `cut(stream, seq_len)` cuts the windows: `cut_windows` unless given (the trainer
    passes the learner's `make_windows`).
    """
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2 (a token and the next one), got {seq_len}")
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(offsets) - 1)
    stream = (
        np.concatenate([tokens[offsets[i] : offsets[i + 1]] for i in order])
        if len(order)
        else tokens
    )
    n_windows = len(stream) // seq_len
    if n_windows < 2:
        raise DataError(
            f"the text has {len(stream):,} tokens: too few for one training and one validation "
            f"window of {seq_len} tokens. Use more text or a shorter context."
        )
    cut_up = (cut or cut_windows)(torch.from_numpy(np.ascontiguousarray(stream)), seq_len)
    if not isinstance(cut_up, Tensor) or tuple(cut_up.shape) != (n_windows, seq_len):
        got = list(cut_up.shape) if isinstance(cut_up, Tensor) else type(cut_up).__name__
        raise DataError(
            f"make_windows cut {len(stream):,} tokens into {got}, expected "
            f"[{n_windows}, {seq_len}] (consecutive windows, the remainder dropped): check it with "
            'check("training.make_windows")'
        )
    n_val = min(n_windows - 1, max(1, round(n_windows * val_fraction)))
    return cut_up[:-n_val].clone(), cut_up[-n_val:].clone()


def load_data(
    data: str | Path | Sequence[str | Path] = "auto",
    *,
    seq_len: int = 128,
    val_fraction: float = 0.1,
    seed: int = 0,
    verbose: bool = True,
    cut: WindowCutter | None = None,
) -> TokenData:
    """Tokenised windows of `seq_len` tokens from `data` (see the module docstring).

    `cut(stream, seq_len)` cuts the windows: the course's `cut_windows` unless given
    (notebook 06 and the trainer pass your `make_windows`).
    """
    import datasets

    datasets_cache().mkdir(parents=True, exist_ok=True)
    bars = not datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # our own one-line summary says what happened
    try:
        dataset, source, description = documents(data, verbose=verbose)
        tokens, offsets = tokenize(dataset)
    finally:
        if not bars:
            datasets.enable_progress_bars()
    train, val = windows(tokens, offsets, seq_len, val_fraction, seed, cut)
    result = TokenData(train, val, source, description, len(offsets) - 1, len(tokens))
    if verbose:
        print(result.summary())
    return result


# ------------------------------------------------------------------ baselines


@dataclass
class Baselines:
    """Validation loss (nats per token) of models that ignore all but the last token, or all."""

    uniform: float  # every token equally likely: ln(d_vocab)
    unigram: float  # token frequencies of the training split
    bigram: float  # P(next | current) from the training split
    unigram_k: float  # the add-k smoothing chosen for each
    bigram_k: float

    def as_dict(self) -> dict[str, float]:
        return {"uniform": self.uniform, "unigram": self.unigram, "bigram": self.bigram}


SMOOTHING_GRID = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 3e-4, 1e-4, 3e-5, 1e-5)


def _pairs(windows: Tensor) -> tuple[Tensor, Tensor]:
    """(current, next) for every prediction the model makes inside the windows."""
    return windows[:, :-1].reshape(-1), windows[:, 1:].reshape(-1)


def unigram_loss(train: Tensor, val: Tensor, d_vocab: int, k: float) -> float:
    """Mean -ln P(next) on `val`, with P from add-k smoothed token counts of `train`."""
    counts = torch.bincount(_pairs(train)[1], minlength=d_vocab).double()
    targets = _pairs(val)[1]
    log_p = torch.log(counts[targets] + k) - math.log(counts.sum().item() + k * d_vocab)
    return -log_p.mean().item()


def bigram_loss(train: Tensor, val: Tensor, d_vocab: int, k: float) -> float:
    """Mean -ln P(next | current) on `val`, add-k smoothed bigram counts of `train`.

    A d_vocab x d_vocab table would hold 2.5 billion counts, so we count only the pairs
    that occur: each pair becomes one number current * d_vocab + next, and a sorted
    list of those numbers with their counts answers every lookup by binary search.
    """
    current, following = _pairs(train)
    keys, pair_counts = torch.unique(current * d_vocab + following, return_counts=True)
    row_totals = torch.bincount(current, minlength=d_vocab).double()
    v_current, v_next = _pairs(val)
    query = v_current * d_vocab + v_next
    where = torch.searchsorted(keys, query).clamp(max=len(keys) - 1)
    seen = keys[where] == query
    count = torch.where(seen, pair_counts[where].double(), torch.zeros((), dtype=torch.float64))
    log_p = torch.log(count + k) - torch.log(row_totals[v_current] + k * d_vocab)
    return -log_p.mean().item()


def _best_k(
    loss: Callable[[Tensor, Tensor, int, float], float], train: Tensor, d_vocab: int
) -> float:
    """The smoothing k that does best on the last tenth of the training windows.

    Chosen without looking at the validation split, so the baselines stay honest.
    """
    n_dev = len(train) // 10
    if n_dev < 1:
        return 1.0
    fit, dev = train[:-n_dev], train[-n_dev:]
    return min(SMOOTHING_GRID, key=lambda k: loss(fit, dev, d_vocab, k))


def baselines(train: Tensor, val: Tensor, d_vocab: int = 50257) -> Baselines:
    """Uniform, unigram and bigram losses on `val`, the n-gram models counted on `train`.

    Pass the very windows the model is evaluated on: every number then averages the
    same predictions (token t+1 of each window from what comes before it).
    """
    train, val = train.long(), val.long()
    k1 = _best_k(unigram_loss, train, d_vocab)
    k2 = _best_k(bigram_loss, train, d_vocab)
    return Baselines(
        uniform=math.log(d_vocab),
        unigram=unigram_loss(train, val, d_vocab, k1),
        bigram=bigram_loss(train, val, d_vocab, k2),
        unigram_k=k1,
        bigram_k=k2,
    )


def unigram_log_probs(train: Tensor, d_vocab: int, k: float) -> Tensor:
    """ln P(token) of the add-k smoothed unigram model of `train`: shape [d_vocab]."""
    counts = torch.bincount(_pairs(train.long())[1], minlength=d_vocab).double()
    return (torch.log(counts + k) - math.log(counts.sum().item() + k * d_vocab)).float()


__all__ = [
    "Baselines",
    "DataError",
    "TokenData",
    "baselines",
    "bigram_loss",
    "cut_windows",
    "load_data",
    "unigram_log_probs",
    "unigram_loss",
]
