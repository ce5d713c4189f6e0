"""Common next_token_loss, configure_optimizer and lr_at_step mistakes (notebook 06)."""

import math

import torch
import torch.nn.functional as F

from gpt2_course.checks.core import Mistake

BETAS = (0.9, 0.95)

# ------------------------------------------------------------------ next_token_loss


def flat(logits, tokens):
    return logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1)


def loss_no_shift(logits, tokens):
    return F.cross_entropy(*flat(logits, tokens))


def loss_shift_wrong_way(logits, tokens):
    return F.cross_entropy(*flat(logits[:, 1:], tokens[:, :-1]))


def loss_rolled(logits, tokens):
    return F.cross_entropy(*flat(logits, tokens.roll(-1, dims=1)))


def loss_summed(logits, tokens):
    return F.cross_entropy(*flat(logits[:, :-1], tokens[:, 1:]), reduction="sum")


def loss_mean_over_batch_only(logits, tokens):
    per_token = F.cross_entropy(*flat(logits[:, :-1], tokens[:, 1:]), reduction="none")
    return per_token.view(tokens.shape[0], -1).sum(dim=1).mean()


def loss_softmax_over_positions(logits, tokens):
    log_probs = logits[:, :-1].log_softmax(dim=1)
    return -log_probs.gather(-1, tokens[:, 1:, None]).mean()


def loss_classes_on_wrong_axis(logits, tokens):
    return F.cross_entropy(logits[:, :-1], tokens[:, 1:])


def loss_of_probabilities(logits, tokens):
    return F.cross_entropy(*flat(logits[:, :-1].softmax(dim=-1), tokens[:, 1:]))


# ------------------------------------------------------------------ configure_optimizer


def adamw(decay, other, lr, weight_decay, other_decay=0.0, **kwargs):
    """Two groups, the way a learner writes them; `other_decay=None` leaves it unset."""
    second = (
        {"params": other} if other_decay is None else {"params": other, "weight_decay": other_decay}
    )
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, second],
        **{"lr": lr, "betas": BETAS, **kwargs},
    )


def by_rule(model, rule):
    params = list(model.parameters())
    return [p for p in params if rule(p)], [p for p in params if not rule(p)]


def opt_decay_everything(model, lr, weight_decay):
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=BETAS, weight_decay=weight_decay)


def opt_decay_nothing(model, lr, weight_decay):
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=BETAS, weight_decay=0.0)


def opt_no_decay_group_default(model, lr, weight_decay):
    return adamw(*by_rule(model, lambda p: p.dim() >= 2), lr, weight_decay, other_decay=None)


def opt_only_3d(model, lr, weight_decay):
    return adamw(*by_rule(model, lambda p: p.dim() > 2), lr, weight_decay)


def opt_only_2d(model, lr, weight_decay):
    return adamw(*by_rule(model, lambda p: p.dim() == 2), lr, weight_decay)


def opt_groups_swapped(model, lr, weight_decay):
    return adamw(*by_rule(model, lambda p: p.dim() < 2), lr, weight_decay)


def opt_default_betas(model, lr, weight_decay):
    return adamw(*by_rule(model, lambda p: p.dim() >= 2), lr, weight_decay, betas=(0.9, 0.999))


def opt_default_lr(model, lr, weight_decay):
    return adamw(*by_rule(model, lambda p: p.dim() >= 2), 1e-3, weight_decay)


def opt_twice(model, lr, weight_decay):
    decay, _ = by_rule(model, lambda p: p.dim() >= 2)
    return adamw(decay, list(model.parameters()), lr, weight_decay)


def opt_adam(model, lr, weight_decay):
    decay, other = by_rule(model, lambda p: p.dim() >= 2)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": other, "weight_decay": 0.0},
    ]
    return torch.optim.Adam(groups, lr=lr, betas=BETAS)


# ------------------------------------------------------------------ lr_at_step


def cosine(step, max_lr, min_lr, start, end):
    return min_lr + (max_lr - min_lr) * (1 + math.cos(math.pi * (step - start) / (end - start))) / 2


def lr_no_warmup(step, *, max_lr, min_lr, warmup_steps, total_steps):
    return min_lr if step >= total_steps else cosine(step, max_lr, min_lr, 0, total_steps)


def lr_warmup_at_max(step, *, max_lr, min_lr, warmup_steps, total_steps):
    if step < warmup_steps:
        return max_lr
    return (
        min_lr if step >= total_steps else cosine(step, max_lr, min_lr, warmup_steps, total_steps)
    )


def lr_warmup_off_by_one(step, *, max_lr, min_lr, warmup_steps, total_steps):
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    return (
        min_lr if step >= total_steps else cosine(step, max_lr, min_lr, warmup_steps, total_steps)
    )


def lr_decays_to_zero(step, *, max_lr, min_lr, warmup_steps, total_steps):
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    return 0.0 if step >= total_steps else cosine(step, max_lr, 0.0, warmup_steps, total_steps)


def lr_ends_late(step, *, max_lr, min_lr, warmup_steps, total_steps):
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    end = warmup_steps + total_steps
    return min_lr if step >= end else cosine(step, max_lr, min_lr, warmup_steps, end)


def lr_no_clamp(step, *, max_lr, min_lr, warmup_steps, total_steps):
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    return cosine(step, max_lr, min_lr, warmup_steps, total_steps)


def lr_min_added(step, *, max_lr, min_lr, warmup_steps, total_steps):
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    return min_lr + cosine(step, max_lr, 0.0, warmup_steps, total_steps)


def lr_linear_decay(step, *, max_lr, min_lr, warmup_steps, total_steps):
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    return max_lr - (max_lr - min_lr) * (step - warmup_steps) / (total_steps - warmup_steps)


# fmt: off
MISTAKES = {
    "training.next_token_loss": [
        Mistake("no_shift", "the cross-entropy of each position's logits against its own token (no shift: position t must predict token t+1)", loss_no_shift),
        Mistake("shift_wrong_way", "a shift the wrong way round: logits[:, 1:] against tokens[:, :-1] (it should be logits[:, :-1] against tokens[:, 1:])", loss_shift_wrong_way),
        Mistake("rolled_targets", "targets made with torch.roll, which wraps the first token round as the target of the last position (drop the last position instead)", loss_rolled),
        Mistake("sum_not_mean", "the sum of the losses instead of their mean (reduction='sum')", loss_summed),
        Mistake("mean_over_batch_only", "the loss summed over positions and averaged over the batch only (average over every prediction)", loss_mean_over_batch_only),
        Mistake("softmax_over_positions", "a log-softmax over the positions axis instead of the vocabulary axis", loss_softmax_over_positions),
        Mistake("classes_on_wrong_axis", "cross_entropy called on [batch, pos, d_vocab] logits: it reads axis 1 as the classes, so flatten them to [batch * pos, d_vocab] first", loss_classes_on_wrong_axis),
        Mistake("softmax_first", "cross_entropy of probabilities: it expects raw logits (it applies the log-softmax itself)", loss_of_probabilities),
    ],
    "training.configure_optimizer": [
        Mistake("decay_everything", "weight decay on every parameter, biases and LayerNorm's w and b included (decay only parameters with 2 or more dimensions)", opt_decay_everything),
        Mistake("decay_nothing", "no weight decay on any parameter", opt_decay_nothing),
        Mistake("no_decay_group_default", "a no-decay group without weight_decay=0.0: AdamW then gives it its default weight_decay of 0.01", opt_no_decay_group_default),
        Mistake("only_3d_decay", "decay only on parameters with more than 2 dimensions (p.dim() > 2), which leaves the embeddings and MLP weights undecayed", opt_only_3d),
        Mistake("only_2d_decay", "decay only on parameters with exactly 2 dimensions (p.dim() == 2), which leaves the 3-d attention weights W_Q, W_K, W_V, W_O undecayed", opt_only_2d),
        Mistake("groups_swapped", "the two groups swapped: decay on biases and LayerNorm, none on the matrices", opt_groups_swapped),
        Mistake("default_betas", "AdamW's default betas (0.9, 0.999) instead of BETAS = (0.9, 0.95)", opt_default_betas),
        Mistake("default_lr", "AdamW's default lr of 0.001 instead of the lr argument", opt_default_lr),
        Mistake("parameter_twice", "a parameter in both groups (every parameter must be in exactly one group)", opt_twice),
        Mistake("adam_not_adamw", "torch.optim.Adam, whose weight_decay is an L2 penalty mixed into the gradient; AdamW decays the weights directly", opt_adam),
    ],
    "training.lr_at_step": [
        Mistake("no_warmup", "a cosine from step 0 with no warmup (the lr must rise linearly from 0 during the first warmup_steps steps)", lr_no_warmup),
        Mistake("warmup_at_max_lr", "max_lr throughout the warmup instead of a linear rise from 0", lr_warmup_at_max),
        Mistake("warmup_off_by_one", "a warmup one step early: max_lr * (step + 1) / warmup_steps (step 0 must give 0)", lr_warmup_off_by_one),
        Mistake("decays_to_zero", "a cosine down to 0 instead of min_lr", lr_decays_to_zero),
        Mistake("cosine_ends_late", "a cosine that lasts total_steps steps after the warmup, so it reaches min_lr at warmup_steps + total_steps instead of total_steps", lr_ends_late),
        Mistake("no_clamp_after_end", "a cosine that carries on after total_steps and rises again (stay at min_lr from total_steps on)", lr_no_clamp),
        Mistake("min_lr_added", "min_lr added on top of a cosine from max_lr to 0, so the decay starts at max_lr + min_lr", lr_min_added),
        Mistake("linear_decay", "a linear decay instead of a cosine", lr_linear_decay),
    ],
}
# fmt: on
