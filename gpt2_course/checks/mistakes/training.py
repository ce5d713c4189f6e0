"""Common next_token_loss, configure_optimizer and lr_at_step mistakes (notebook 06)."""

import math

import torch
import torch.nn.functional as F

from gpt2_course.checks.core import Mistake
from gpt2_course.reference_parts.training import BETAS, lr_at_step


def flat(logits, tokens):
    return logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1)


def loss_mean_over_batch_only(logits, tokens):
    per_token = F.cross_entropy(*flat(logits[:, :-1], tokens[:, 1:]), reduction="none")
    return per_token.view(tokens.shape[0], -1).sum(dim=1).mean()


def is_matrix(param):
    return param.dim() >= 2


def adamw(model, lr, wd, decayed=is_matrix, rest=None, rest_decay=0.0, cls=torch.optim.AdamW, **kw):
    """An optimizer of `cls` with two groups, the way a learner writes them: the `decayed`
    parameters, and the rest (or those `rest` picks) with `rest_decay` (None: unset)."""
    params = list(model.parameters())
    rest = rest or (lambda p: not decayed(p))
    second = {"params": [p for p in params if rest(p)]}
    if rest_decay is not None:
        second["weight_decay"] = rest_decay
    first = {"params": [p for p in params if decayed(p)], "weight_decay": wd}
    return cls([first, second], **{"lr": lr, "betas": BETAS, **kw})


def after_warmup(decay):
    """The right linear warmup, then `decay(step, max_lr, min_lr, warmup_steps, total_steps)`."""

    def lr(step, *, max_lr, min_lr, warmup_steps, total_steps):
        if step < warmup_steps:
            return max_lr * step / warmup_steps
        return decay(step, max_lr, min_lr, warmup_steps, total_steps)

    return lr


def cosine(step, max_lr, min_lr, start, end):
    """From max_lr at `start` to min_lr at `end`, and up again after `end`."""
    return min_lr + (max_lr - min_lr) * (1 + math.cos(math.pi * (step - start) / (end - start))) / 2


def min_lr_added(step, max_lr, min_lr, start, end):
    return min_lr if step >= end else min_lr + cosine(step, max_lr, 0.0, start, end)


def linear_decay(step, max_lr, min_lr, start, end):
    return min_lr if step >= end else max_lr - (max_lr - min_lr) * (step - start) / (end - start)


# fmt: off
MISTAKES = {
    "training.next_token_loss": [
        Mistake("no_shift", "the cross-entropy of each position's logits against its own token (no shift: position t must predict token t+1)", lambda logits, tokens: F.cross_entropy(*flat(logits, tokens))),
        Mistake("shift_wrong_way", "a shift the wrong way round: logits[:, 1:] against tokens[:, :-1] (it should be logits[:, :-1] against tokens[:, 1:])", lambda logits, tokens: F.cross_entropy(*flat(logits[:, 1:], tokens[:, :-1]))),
        Mistake("rolled_targets", "targets made with torch.roll, which wraps the first token round as the target of the last position (drop the last position instead)", lambda logits, tokens: F.cross_entropy(*flat(logits, tokens.roll(-1, dims=1)))),
        Mistake("sum_not_mean", "the sum of the losses instead of their mean (reduction='sum')", lambda logits, tokens: F.cross_entropy(*flat(logits[:, :-1], tokens[:, 1:]), reduction="sum")),
        Mistake("mean_over_batch_only", "the loss summed over positions and averaged over the batch only (average over every prediction)", loss_mean_over_batch_only),
        Mistake("softmax_over_positions", "a log-softmax over the positions axis instead of the vocabulary axis", lambda logits, tokens: -logits[:, :-1].log_softmax(dim=1).gather(-1, tokens[:, 1:, None]).mean()),
        Mistake("classes_on_wrong_axis", "cross_entropy called on [batch, pos, d_vocab] logits: it reads axis 1 as the classes, so flatten them to [batch * pos, d_vocab] first", lambda logits, tokens: F.cross_entropy(logits[:, :-1], tokens[:, 1:])),
        Mistake("softmax_first", "cross_entropy of probabilities: it expects raw logits (it applies the log-softmax itself)", lambda logits, tokens: F.cross_entropy(*flat(logits[:, :-1].softmax(dim=-1), tokens[:, 1:]))),
    ],
    "training.configure_optimizer": [
        Mistake("decay_everything", "weight decay on every parameter, biases and LayerNorm's w and b included (decay only parameters with 2 or more dimensions)", lambda model, lr, wd: torch.optim.AdamW(model.parameters(), lr=lr, betas=BETAS, weight_decay=wd)),
        Mistake("decay_nothing", "no weight decay on any parameter", lambda model, lr, wd: torch.optim.AdamW(model.parameters(), lr=lr, betas=BETAS, weight_decay=0.0)),
        Mistake("no_decay_group_default", "a no-decay group without weight_decay=0.0: AdamW then gives it its default weight_decay of 0.01", lambda model, lr, wd: adamw(model, lr, wd, rest_decay=None)),
        Mistake("only_3d_decay", "decay only on parameters with more than 2 dimensions (p.dim() > 2), which leaves the embeddings and MLP weights undecayed", lambda model, lr, wd: adamw(model, lr, wd, decayed=lambda p: p.dim() > 2)),
        Mistake("only_2d_decay", "decay only on parameters with exactly 2 dimensions (p.dim() == 2), which leaves the 3-d attention weights W_Q, W_K, W_V, W_O undecayed", lambda model, lr, wd: adamw(model, lr, wd, decayed=lambda p: p.dim() == 2)),
        Mistake("groups_swapped", "the two groups swapped: decay on biases and LayerNorm, none on the matrices", lambda model, lr, wd: adamw(model, lr, wd, decayed=lambda p: p.dim() < 2)),
        Mistake("default_betas", "AdamW's default betas (0.9, 0.999) instead of BETAS = (0.9, 0.95)", lambda model, lr, wd: adamw(model, lr, wd, betas=(0.9, 0.999))),
        Mistake("default_lr", "AdamW's default lr of 0.001 instead of the lr argument", lambda model, lr, wd: adamw(model, 1e-3, wd)),
        Mistake("parameter_twice", "a parameter in both groups (every parameter must be in exactly one group)", lambda model, lr, wd: adamw(model, lr, wd, rest=lambda p: True)),
        Mistake("adam_not_adamw", "torch.optim.Adam, whose weight_decay is an L2 penalty mixed into the gradient; AdamW decays the weights directly", lambda model, lr, wd: adamw(model, lr, wd, cls=torch.optim.Adam)),
    ],
    "training.lr_at_step": [
        Mistake("no_warmup", "a cosine from step 0 with no warmup (the lr must rise linearly from 0 during the first warmup_steps steps)", lambda step, **s: lr_at_step(step, **s | {"warmup_steps": 0})),
        Mistake("warmup_at_max_lr", "max_lr throughout the warmup instead of a linear rise from 0", lambda step, **s: s["max_lr"] if step < s["warmup_steps"] else lr_at_step(step, **s)),
        Mistake("warmup_off_by_one", "a warmup one step early: max_lr * (step + 1) / warmup_steps (step 0 must give 0)", lambda step, **s: s["max_lr"] * (step + 1) / s["warmup_steps"] if step < s["warmup_steps"] else lr_at_step(step, **s)),
        Mistake("decays_to_zero", "a cosine down to 0 instead of min_lr", lambda step, **s: lr_at_step(step, **s | {"min_lr": 0.0})),
        Mistake("cosine_ends_late", "a cosine that lasts total_steps steps after the warmup, so it reaches min_lr at warmup_steps + total_steps instead of total_steps", lambda step, **s: lr_at_step(step, **s | {"total_steps": s["warmup_steps"] + s["total_steps"]})),
        Mistake("no_clamp_after_end", "a cosine that carries on after total_steps and rises again (stay at min_lr from total_steps on)", after_warmup(cosine)),
        Mistake("min_lr_added", "min_lr added on top of a cosine from max_lr to 0, so the decay starts at max_lr + min_lr", after_warmup(min_lr_added)),
        Mistake("linear_decay", "a linear decay instead of a cosine", after_warmup(linear_decay)),
    ],
}
# fmt: on
