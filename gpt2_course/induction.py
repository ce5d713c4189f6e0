"""Induction heads that form on a CPU (notebook 09): the data, the run and its pictures.

A 2-layer model of the course (your `Transformer`, or the reference one) learns to
continue windows in which a block of fresh random tokens is written twice in a row, at a
random place and of random length, among filler that follows a small local rule. The
first copy of the block cannot be predicted: its loss stays near ln(d_vocab). The second
can, once the model looks back for the previous occurrence of the current token and
copies what came after it: an induction head in layer 1, fed by a previous-token head in
layer 0 (or a variant of that circuit: notebook 09 measures which one a run found).

The run is the course's own trainer (`gpt2_course.trainer.train`) with a fixed pool of
such sequences as its `TokenData`; `head_scores` is its `on_eval`, so every row of the
history holds each head's induction and previous-token scores and the losses on the
two halves of a probe (a random block written twice).

    result = train_induction()          # FULL, or QUICK under GPT2_COURSE_QUICK=1
    plot_half_losses(result); plot_head_scores(result)
"""

import math
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from gpt2_course.config import TransformerConfig
from gpt2_course.data import TokenData
from gpt2_course.trainer import TrainConfig, TrainResult, quick_mode, train

# ------------------------------------------------------------------ settings (one place)

INDUCTION_MODEL = TransformerConfig(
    d_model=64, n_heads=4, d_head=16, d_mlp=256, n_layers=2, n_ctx=48, d_vocab=64,
    # GPT-2's 0.02 suits 768 dimensions; at 64, weights that small leave every attention
    # pattern flat for thousands of steps. 1 / sqrt(d_model) starts the run where it can move.
    init_range=0.125,
)  # fmt: skip
FULL: dict[str, Any] = dict(
    steps=5000,
    batch_size=16,
    max_lr=3e-3,
    min_lr=1e-3,
    weight_decay=0.01,
    warmup_steps=100,
    eval_interval=100,
    eval_windows=64,
)
QUICK: dict[str, Any] = dict(
    steps=40, batch_size=32, max_lr=3e-3, weight_decay=0.01, warmup_steps=5, eval_interval=10,
    eval_windows=32,
)  # fmt: skip
MAX_POOL = 65_536  # training sequences held at most (steps * batch_size below that)
VAL_SEQUENCES = 512
DATA_SEED, PROBE_SEED = 1234, 99
PROBE_BATCH = 64  # probe sequences scored at every evaluation
LOCAL_RULE = 0.8  # how often a filler token follows the local rule (see induction_windows)
RULE_SEED = 7
# An induction score this high is far above a head that spreads its attention evenly over
# the visible positions (about 0.03 on the probe): an induction head.
FORMED_SCORE = 0.3


def probe_half(cfg: TransformerConfig = INDUCTION_MODEL) -> int:
    """The probe's block length: the longest block of the training windows."""
    return block_lengths(cfg.n_ctx)[1]


# ------------------------------------------------------------------ data


def block_lengths(n_ctx: int) -> tuple[int, int]:
    """The shortest and longest repeated block: a sixth to a third of the window, so that
    there is always filler around it for the local rule."""
    return max(1, n_ctx // 6), n_ctx // 3


def induction_windows(
    n: int,
    n_ctx: int,
    d_vocab: int,
    seed: int,
    lengths: tuple[int, int] | None = None,
    local_rule: float = LOCAL_RULE,
) -> Int[Tensor, "n n_ctx"]:
    """`n` training windows: filler with a little local structure, and in each window a block
    of fresh random tokens written twice in a row, of a random length in `lengths` (both
    ends included; default `block_lengths(n_ctx)`) and at a random place.

    The filler's local rule: each token is, with probability `local_rule`, a fixed shuffle of
    the token before it (else random). The model predicts the filler from the current token
    alone; but inside the random block that prediction is wrong, and the way to tell the
    filler from the block is to check whether the current token is the shuffle of the
    previous one. So a previous-token head pays off on its own, as it does in text; without
    that, it is useful only to an induction head not yet there, and the two take many times
    longer to appear together. The block itself is pure random: a rule inside it would be a
    cue to look for instead of induction. (A rule on the token two places back made the model
    grow a head looking three places back to tell filler from block, and build a variant of
    the circuit on it that attends one key too far.) As the block's length and place vary,
    no fixed positional offset finds the repeats.
    """
    shortest, longest = lengths or block_lengths(n_ctx)
    if not 1 <= shortest <= longest or 2 * longest > n_ctx:
        raise ValueError(
            f"blocks of {shortest} to {longest} tokens, written twice, do not fit n_ctx={n_ctx}"
        )
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, d_vocab, (n, n_ctx), generator=generator)
    shuffle = torch.randperm(d_vocab, generator=torch.Generator().manual_seed(RULE_SEED))
    follows_rule = torch.rand(n, n_ctx, generator=generator) < local_rule
    for t in range(1, n_ctx):
        tokens[:, t] = torch.where(follows_rule[:, t], shuffle[tokens[:, t - 1]], tokens[:, t])
    length = torch.randint(shortest, longest + 1, (n, 1), generator=generator)
    start = (torch.rand(n, 1, generator=generator) * (n_ctx - 2 * length + 1)).long()
    pos = torch.arange(n_ctx).expand(n, n_ctx)
    first = (pos >= start) & (pos < start + length)
    fresh = torch.randint(0, d_vocab, (n, n_ctx), generator=generator)
    tokens = torch.where(first, fresh, tokens)
    # the second copy: position p takes the token `length` places before it
    second = (pos >= start + length) & (pos < start + 2 * length)
    return tokens.gather(1, torch.where(second, pos - length, pos))


def repeated_tokens(
    batch: int, half: int, d_vocab: int, seed: int, bos: int | None = None
) -> Int[Tensor, "batch pos"]:
    """The probe: a random block of `half` tokens written twice (after `bos` if given)."""
    generator = torch.Generator().manual_seed(seed)
    block = torch.randint(0, d_vocab, (batch, half), generator=generator)
    tokens = torch.cat([block, block], dim=1)
    if bos is not None:
        tokens = torch.cat([torch.full((batch, 1), bos, dtype=tokens.dtype), tokens], dim=1)
    return tokens


def induction_data(config: TrainConfig) -> TokenData:
    """A fixed pool of training windows: one per sequence the run draws, up to MAX_POOL."""
    cfg = config.model
    n_train = min(config.steps * config.batch_size, MAX_POOL)
    train_windows = induction_windows(n_train, cfg.n_ctx, cfg.d_vocab, DATA_SEED + config.seed)
    val = induction_windows(VAL_SEQUENCES, cfg.n_ctx, cfg.d_vocab, DATA_SEED + config.seed + 1)
    return TokenData(
        train=train_windows,
        val=val,
        source="induction",
        description=(
            "tokens with a local rule, a random block of {} to {} written twice "
            "(vocabulary of {})".format(*block_lengths(cfg.n_ctx), cfg.d_vocab)
        ),
        n_documents=n_train + VAL_SEQUENCES,
        n_tokens=(n_train + VAL_SEQUENCES) * cfg.n_ctx,
    )


def induction_config(**overrides: Any) -> TrainConfig:
    """The induction run: FULL settings, or QUICK ones (a few dozen steps) in quick mode."""
    settings = QUICK if quick_mode() else FULL
    base: dict[str, Any] = dict(
        model=INDUCTION_MODEL, data="induction", sample_interval=0, save=False
    )
    return TrainConfig(**{**base, **settings, **overrides})


# ------------------------------------------------------------------ measuring


def _reference_scores() -> tuple[Any, Any]:
    from gpt2_course.reference_parts.inside import induction_score, previous_token_score

    return induction_score, previous_token_score


@torch.no_grad()
def attention_patterns(
    model: nn.Module, tokens: Int[Tensor, "batch pos"]
) -> tuple[Float[Tensor, "batch pos d_vocab"], list[Float[Tensor, "batch n_heads q k"]]]:
    """The logits, and every layer's attention pattern, of the course model on `tokens`.

    Each block's input (its residual stream) is caught with a forward pre-hook; the
    pattern is what its attention computes on `ln1` of it (`visuals.capture_pattern`).
    Needs only the model's parts, no bridge.
    """
    from gpt2_course.visuals import capture_pattern

    resid_pre: list[Tensor] = []
    handles = [
        block.register_forward_pre_hook(lambda _module, args: resid_pre.append(args[0]))
        for block in model.blocks
    ]
    was_training = model.training
    model.eval()
    try:
        logits = model(tokens)
        patterns = [
            capture_pattern(block.attn, block.ln1(resid))
            for block, resid in zip(model.blocks, resid_pre, strict=True)
        ]
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return logits, patterns


def head_scores(model: nn.Module, tokens: Int[Tensor, "batch pos"], half: int) -> dict[str, float]:
    """Per head "induction L.H" and "previous L.H" scores on the probe `tokens` (its last
    2 * half positions a block written twice), and the loss on each copy of the block."""
    induction_score, previous_token_score = _reference_scores()
    tokens = tokens.to(next(model.parameters()).device)
    logits, patterns = attention_patterns(model, tokens)
    start = tokens.shape[1] - 2 * half  # a prefix (a BOS) comes before the block

    def loss(first: int, last: int) -> float:
        # predictions made at positions first..last-1 of the tokens that follow them
        preds = logits[:, first:last].flatten(0, 1).float()
        return float(F.cross_entropy(preds, tokens[:, first + 1 : last + 1].flatten()))

    scores = {
        # the first token of each copy has nothing before it to predict it from
        "first_half_loss": loss(start, start + half - 1),
        "repeated_half_loss": loss(start + half, start + 2 * half - 1),
    }
    for layer, pattern in enumerate(patterns):
        pattern = pattern.float()
        induction = induction_score(pattern, half).tolist()
        previous = previous_token_score(pattern).tolist()
        for head in range(pattern.shape[1]):
            scores[f"induction {layer}.{head}"] = induction[head]
            scores[f"previous {layer}.{head}"] = previous[head]
    return scores


def train_induction(
    config: TrainConfig | None = None, *, progress: bool = True, verbose: bool = True
) -> TrainResult:
    """Train the induction model; every history row carries `head_scores` on the probe."""
    config = config or induction_config()
    cfg = config.model
    half = probe_half(cfg)
    probe = repeated_tokens(PROBE_BATCH, half, cfg.d_vocab, seed=PROBE_SEED)
    return train(
        config,
        data=induction_data(config),
        progress=progress,
        verbose=verbose,
        on_eval=lambda model: head_scores(model, probe, half),
    )


def biggest_drop_step(result: TrainResult) -> int:
    """The step where the repeated-half loss falls fastest (the middle of the steepest
    interval between two evaluations)."""
    rows = [r for r in result.history if "repeated_half_loss" in r]
    if len(rows) < 2:
        return int(rows[0]["step"]) if rows else 0
    slopes = [
        ((a["repeated_half_loss"] - b["repeated_half_loss"]) / max(1, b["step"] - a["step"]), i)
        for i, (a, b) in enumerate(zip(rows, rows[1:], strict=False))
    ]
    _, i = max(slopes)
    return int(round((rows[i]["step"] + rows[i + 1]["step"]) / 2))


def induction_formed(result: TrainResult, min_score: float = FORMED_SCORE) -> bool:
    """Whether some head of the final model is an induction head on the probe."""
    return bool(result.history) and best_head(result)[1] >= min_score


def best_head(result: TrainResult, kind: str = "induction") -> tuple[str, float]:
    """The head ("L.H") with the highest final `kind` score ("induction" or "previous")."""
    final = result.final
    name = max((k for k in final if k.startswith(f"{kind} ")), key=final.__getitem__)
    return name.split(" ")[1], float(final[name])


# ------------------------------------------------------------------ pictures


def plot_half_losses(result: TrainResult, ax: Any = None) -> Any:
    """Loss on the probe's first copy and on its repeat vs step, the steepest drop marked."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4))
    steps = [r["step"] for r in result.history]
    ax.plot(steps, [r["first_half_loss"] for r in result.history], "o-", ms=3,
            color="tab:gray", label="first copy (unpredictable)")  # fmt: skip
    ax.plot(steps, [r["repeated_half_loss"] for r in result.history], "o-", ms=3,
            color="tab:red", label="repeated copy")  # fmt: skip
    d_vocab, half = result.config.model.d_vocab, probe_half(result.config.model)
    ax.axhline(math.log(d_vocab), ls="--", lw=1, color="k", label=f"uniform guess, ln {d_vocab}")
    # what a model gets without induction, betting evenly on the tokens seen so far
    ax.axhline(math.log(half), ls="--", lw=1, color="tab:green",
               label=f"any token seen before, ln {half}")  # fmt: skip
    drop = biggest_drop_step(result)
    ax.axvline(drop, ls=":", color="tab:purple", label=f"steepest drop, step {drop}")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss on the probe (nats per token)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax


def plot_head_scores(result: TrainResult, ax: Any = None) -> Any:
    """Each head's induction score (left) and previous-token score (right) vs step.

    `ax`: two axes to draw on (else a new figure); returns them.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    steps = [r["step"] for r in result.history]
    cfg = result.config.model
    styles = ["-", "--", ":", "-."]
    for panel, (kind, what) in zip(
        ax, [("induction", "induction score"), ("previous", "previous-token score")], strict=True
    ):
        for layer in range(cfg.n_layers):
            for head in range(cfg.n_heads):
                key = f"{kind} {layer}.{head}"
                panel.plot(
                    steps,
                    [r[key] for r in result.history],
                    styles[layer % len(styles)],
                    color=plt.cm.tab10(head % 10),
                    label=f"head {layer}.{head}",
                )
        panel.set_title(what)
        panel.set_xlabel("training step")
        panel.set_ylim(0, 1)  # scores are attention weights: the same scale in both panels
        panel.grid(alpha=0.3)
    ax[0].set_ylabel("mean attention")
    ax[1].legend(fontsize=7, ncol=2)
    return ax


__all__ = [
    "FULL",
    "INDUCTION_MODEL",
    "QUICK",
    "attention_patterns",
    "best_head",
    "biggest_drop_step",
    "head_scores",
    "induction_config",
    "induction_formed",
    "induction_data",
    "induction_windows",
    "plot_half_losses",
    "plot_head_scores",
    "probe_half",
    "repeated_tokens",
    "train_induction",
]
