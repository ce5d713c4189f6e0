"""HellaSwag: does the model finish an everyday scene the way a person would?

Each example is a context ("A man kneels beside a car ... the man") and four endings: one
written by people, three written by a language model and kept because they fooled other
models. A language model takes the test with no training for it: it reads the context,
and we ask how likely it finds each ending. The ending it finds most likely is its answer.
Random guessing scores 0.25; GPT-2 small scores about 0.29 (0.31 normalised).

Two scores, as EleutherAI's lm-evaluation-harness reports them:

* ``acc``: the ending with the largest log-likelihood (the sum of ln p(token | all tokens
  before it) over the ending's tokens). Longer endings have more tokens to pay for.
* ``acc_norm``: the same sum divided by the ending's length in characters, so that an
  ending is not punished for being long.

The text scored is the row's ``ctx`` followed by a space and the ending, tokenized as GPT-2
does (the harness also prefixes the activity label and tidies WikiHow's ``[title]``
markers, so its numbers differ a little). Examples come from the Hub (`Rowan/hellaswag`)
when it can be reached, or from a file in the original jsonl format (`load_jsonl`).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from gpt2_course.tokenizer import END_OF_TEXT_ID, get_tokenizer

HUB_DATASET = "Rowan/hellaswag"
N_ENDINGS = 4
PAD_ID = END_OF_TEXT_ID  # padding sits after every scored token, so its value never matters


class HellaSwagError(ValueError):
    """A HellaSwag row, file or scoring request that cannot be used as it is."""


@dataclass(frozen=True)
class Example:
    """One question: the context, its four candidate endings, and the index of the right one."""

    ctx: str
    endings: list[str]
    label: int

    def __post_init__(self) -> None:
        if not isinstance(self.ctx, str) or not self.ctx.strip():
            raise HellaSwagError(
                f"ctx must be non-empty text (the endings are scored after it), got {self.ctx!r}"
            )
        if not isinstance(self.endings, list | tuple) or len(self.endings) != N_ENDINGS:
            raise HellaSwagError(f"endings must be a list of 4 strings, got {self.endings!r}")
        for i, ending in enumerate(self.endings):
            if not isinstance(ending, str) or not ending.strip():
                # acc_norm divides by the ending's length: an empty ending cannot be scored
                raise HellaSwagError(f"ending {i} must be non-empty text, got {ending!r}")
        if type(self.label) is not int or not 0 <= self.label < N_ENDINGS:
            raise HellaSwagError(
                f"label must be the index of the right ending, an int 0..3, got {self.label!r}"
            )


# ------------------------------------------------------------------ reading the data


def _label(value: Any) -> int:
    """The label as an int: the original jsonl stores 3, the Hub stores "3"."""
    if value == "" or value is None:
        raise HellaSwagError(
            "the row has no label (HellaSwag's test split is unlabeled): use the validation split"
        )
    if type(value) is int:
        label = value
    elif isinstance(value, str) and value.strip().isdigit():
        label = int(value.strip())
    else:
        raise HellaSwagError(f"label must be an int or a digit string 0..3, got {value!r}")
    if not 0 <= label < N_ENDINGS:
        raise HellaSwagError(f"label {value!r} is out of range: there are endings 0..3")
    return label


def parse(row: dict[str, Any]) -> Example:
    """One HellaSwag row (the original jsonl or the Hub's format) as an `Example`."""
    if not isinstance(row, dict):
        raise HellaSwagError(f"a HellaSwag row is a JSON object, got {type(row).__name__}")
    missing = [name for name in ("ctx", "endings", "label") if name not in row]
    if missing:
        raise HellaSwagError(
            f"the row has no {', '.join(missing)} field (fields: {', '.join(sorted(row))}); "
            "HellaSwag rows have ind, activity_label, ctx_a, ctx_b, ctx, endings, label, ..."
        )
    endings = row["endings"]
    if not isinstance(endings, list) or len(endings) != N_ENDINGS:
        count = f"{len(endings)} endings" if isinstance(endings, list) else repr(endings)
        raise HellaSwagError(f"endings must be a list of exactly 4 strings, got {count}")
    return Example(ctx=row["ctx"], endings=list(endings), label=_label(row["label"]))


def load_jsonl(path: str | Path) -> list[Example]:
    """Every row of a HellaSwag jsonl file (one JSON object per line), in order."""
    path = Path(path)
    if not path.is_file():
        raise HellaSwagError(f"no HellaSwag file at {path}")
    examples = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                examples.append(parse(json.loads(line)))
            except json.JSONDecodeError as error:
                raise HellaSwagError(f"{path}, line {number}: not JSON ({error.msg})") from None
            except HellaSwagError as error:
                raise HellaSwagError(f"{path}, line {number}: {error}") from None
    return examples


def load_hellaswag(
    split: str = "validation", limit: int | None = None, *, verbose: bool = True
) -> list[Example] | None:
    """The first `limit` examples (all when None) of a split of `Rowan/hellaswag` on the Hub.

    None when the Hub cannot be reached or offline mode is on (the caller skips HellaSwag),
    or when the download fails (it says why).
    """
    from gpt2_course.data import HUB_DEADLINE_SECONDS, _with_deadline, datasets_cache
    from gpt2_course.reference import hub_reachable

    if split not in ("train", "validation"):
        raise HellaSwagError(
            f"split must be 'train' or 'validation' (the test split has no labels), got {split!r}"
        )
    if limit is not None and limit < 1:
        raise HellaSwagError(f"limit must be a positive number of examples or None, got {limit}")
    if not hub_reachable():
        return None

    def download():
        import datasets

        return datasets.load_dataset(HUB_DATASET, split=split, cache_dir=str(datasets_cache()))

    try:
        rows = _with_deadline(download, HUB_DEADLINE_SECONDS)
    except Exception as error:  # a network failure half-way, a moved data set, ...
        if verbose:
            print(f"Could not load HellaSwag ({type(error).__name__}: {error}).")
        return None
    count = len(rows) if limit is None else min(limit, len(rows))
    return [parse(rows[i]) for i in range(count)]


# ------------------------------------------------------------------ tokens


Row = tuple[list[int], int]  # context + ending tokens, and how many of them are the ending


def _rows(example: Example, tokenizer) -> list[Row]:
    context = tokenizer.encode(example.ctx, add_special_tokens=False)
    rows = []
    for ending in example.endings:
        # GPT-2 writes a word's leading space inside the word's token (" walks"), so the
        # space between context and ending belongs to the ending.
        ending_ids = tokenizer.encode(" " + ending, add_special_tokens=False)
        rows.append((context + ending_ids, len(ending_ids)))
    return rows


def _pad(rows: list[Row]) -> tuple[Int[Tensor, "row pos"], Bool[Tensor, "row pos"]]:
    """Rows right-padded to the longest one, and a mask marking each row's ending tokens."""
    length = max(len(ids) for ids, _ in rows)
    tokens = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, (ids, n_ending) in enumerate(rows):
        tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, len(ids) - n_ending : len(ids)] = True
    return tokens, mask


def render(example: Example, tokenizer=None) -> tuple[Int[Tensor, "4 L"], Bool[Tensor, "4 L"]]:
    """The four texts as tokens, context then " " + ending, right-padded; the mask marks the
    ending tokens (the ones scored)."""
    return _pad(_rows(example, tokenizer or get_tokenizer()))


# ------------------------------------------------------------------ scoring


def _device_of(model: nn.Module) -> torch.device:
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


def _fit_context(row: Row, n_ctx: int) -> Row:
    """Keep the last n_ctx tokens: the ending whole, the context cut from the left."""
    ids, n_ending = row
    if n_ending + 1 > n_ctx:
        raise HellaSwagError(
            f"an ending of {n_ending} tokens does not fit the model's context (n_ctx={n_ctx}) "
            "with a token before it to predict it from: use a model with a longer context"
        )
    return ids[-n_ctx:], n_ending


def _batch_log_likelihoods(
    model: nn.Module, rows: list[Row], device: torch.device
) -> Float[Tensor, "row"]:
    tokens, mask = _pad(rows)
    tokens, mask = tokens.to(device), mask.to(device)
    logits = model(tokens)
    expected = (*tokens.shape, model.cfg.d_vocab)
    if not isinstance(logits, Tensor) or tuple(logits.shape) != expected:
        got = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise HellaSwagError(
            f"the model returned {got} for tokens of shape {list(tokens.shape)}; "
            f"expected logits {list(expected)} (batch, pos, d_vocab)"
        )
    # Token t is predicted at position t - 1. Only the ending tokens are scored, so the
    # log-softmax is taken at those positions alone (the full [row, pos, d_vocab] would be
    # a second copy of the logits).
    scored = mask[:, 1:]
    predicted_at = logits[:, :-1][scored].float()  # [n_scored, d_vocab]
    targets = tokens[:, 1:][scored]
    log_p = -F.cross_entropy(predicted_at, targets, reduction="none")
    which_row = scored.nonzero()[:, 0]
    return torch.zeros(len(rows), device=device).index_add_(0, which_row, log_p)


def log_likelihoods(
    model: nn.Module,
    examples: list[Example],
    *,
    device: torch.device | str | None = None,
    batch_examples: int = 8,
    tokenizer=None,
    progress: bool = False,
) -> Float[Tensor, "example 4"]:
    """ln p(ending | context) of every ending of every example, under `model` (on the CPU).

    The model maps tokens [batch, pos] to logits [batch, pos, d_vocab]; contexts longer
    than model.cfg.n_ctx lose their first tokens. Runs in eval mode, without gradients,
    and leaves the model in the mode it found it.
    """
    if batch_examples < 1:
        raise HellaSwagError(f"batch_examples must be at least 1, got {batch_examples}")
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "n_ctx") or not hasattr(cfg, "d_vocab"):
        raise HellaSwagError("the model needs a cfg with n_ctx and d_vocab (a TransformerConfig)")
    tokenizer = tokenizer or get_tokenizer()
    if len(tokenizer) > cfg.d_vocab:
        raise HellaSwagError(
            f"the model's vocabulary (d_vocab={cfg.d_vocab}) is smaller than GPT-2's tokenizer "
            f"({len(tokenizer)} tokens): HellaSwag needs a model with d_vocab >= {len(tokenizer)}"
        )
    device = torch.device(device) if device is not None else _device_of(model)
    starts = range(0, len(examples), batch_examples)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="HellaSwag", unit="batch")
    sums = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in starts:
                batch = examples[start : start + batch_examples]
                rows = [_fit_context(r, cfg.n_ctx) for ex in batch for r in _rows(ex, tokenizer)]
                sums.append(_batch_log_likelihoods(model, rows, device).cpu())
    finally:
        model.train(was_training)
    if not sums:
        return torch.zeros((0, N_ENDINGS))
    return einops.rearrange(torch.cat(sums), "(example ending) -> example ending", ending=4)


def score_examples(
    model: nn.Module,
    examples: list[Example],
    *,
    device: torch.device | str | None = None,
    batch_examples: int = 8,
    rank: int = 0,
    world: int = 1,
    tokenizer=None,
    progress: bool = False,
) -> dict[str, int]:
    """How many of examples[rank::world] the model gets right, by acc and by acc_norm.

    Returns {"n", "correct", "correct_norm"}: counts, so that the counts of all ranks can be
    summed before `accuracy` turns them into fractions.
    """
    if not 0 <= rank < world:
        raise HellaSwagError(f"rank must be in 0..world-1, got rank={rank}, world={world}")
    mine = examples[rank::world]
    scores = log_likelihoods(
        model,
        mine,
        device=device,
        batch_examples=batch_examples,
        tokenizer=tokenizer,
        progress=progress,
    )
    labels = torch.tensor([ex.label for ex in mine], dtype=torch.long)
    characters = torch.tensor([[len(e) for e in ex.endings] for ex in mine], dtype=torch.float32)
    picked = scores.argmax(dim=-1)
    picked_norm = (scores / characters.reshape(scores.shape)).argmax(dim=-1)
    return {
        "n": len(mine),
        "correct": int((picked == labels).sum()),
        "correct_norm": int((picked_norm == labels).sum()),
    }


def accuracy(counts: dict[str, int]) -> dict[str, float]:
    """{"hellaswag_acc", "hellaswag_acc_norm"} from the (summed) counts of `score_examples`."""
    if not isinstance(counts, dict) or not {"n", "correct", "correct_norm"} <= counts.keys():
        raise HellaSwagError(f"counts must be score_examples' dict, got {counts!r}")
    if counts["n"] < 1:
        raise HellaSwagError("no HellaSwag example was scored, so there is no accuracy")
    return {
        "hellaswag_acc": counts["correct"] / counts["n"],
        "hellaswag_acc_norm": counts["correct_norm"] / counts["n"],
    }


__all__ = [
    "Example",
    "HellaSwagError",
    "accuracy",
    "load_hellaswag",
    "load_jsonl",
    "log_likelihoods",
    "parse",
    "render",
    "score_examples",
]
