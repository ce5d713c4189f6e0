"""Common next_token_loss, configure_optimizer, lr_at_step, make_windows and train_step
mistakes (notebook 06)."""

import math

import torch
import torch.nn.functional as F

from gpt2_course.checks.core import Mistake
from gpt2_course.reference_parts.training import BETAS, lr_at_step, make_windows, next_token_loss


def flat(logits, tokens):
    return logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1)


def loss_mean_over_batch_only(logits, tokens):
    per_token = F.cross_entropy(*flat(logits[:, :-1], tokens[:, 1:]), reduction="none")
    return per_token.view(tokens.shape[0], -1).sum(dim=1).mean()


def is_weight(name, param):
    return name.split(".")[-1].startswith("W_")


def adamw(model, lr, wd, decayed=is_weight, rest=None, rest_decay=0.0, cls=torch.optim.AdamW, **kw):
    """An optimizer of `cls` with two groups, the way a learner writes them: the `decayed`
    parameters, and the rest (or those `rest` picks) with `rest_decay` (None: unset);
    `decayed` and `rest` take (name, parameter)."""
    params = list(model.named_parameters())
    rest = rest or (lambda name, p: not decayed(name, p))
    second = {"params": [p for name, p in params if rest(name, p)]}
    if rest_decay is not None:
        second["weight_decay"] = rest_decay
    first = {"params": [p for name, p in params if decayed(name, p)], "weight_decay": wd}
    return cls([first, second], **{"lr": lr, "betas": BETAS, **kw})


def after_warmup(decay):
    """The right linear warmup, then `decay(step, max_lr, min_lr, warmup_steps, total_steps)`."""

    def lr(step, *, max_lr, min_lr, warmup_steps, total_steps):
        if step < warmup_steps:
            return max_lr * (step + 1) / (warmup_steps + 1)
        return decay(step, max_lr, min_lr, warmup_steps, total_steps)

    return lr


def cosine(step, max_lr, min_lr, start, end):
    """From max_lr at `start` to min_lr at `end`, and up again after `end`."""
    return min_lr + (max_lr - min_lr) * (1 + math.cos(math.pi * (step - start) / (end - start))) / 2


def min_lr_added(step, max_lr, min_lr, start, end):
    return min_lr if step >= end else min_lr + cosine(step, max_lr, 0.0, start, end)


def linear_decay(step, max_lr, min_lr, start, end):
    return min_lr if step >= end else max_lr - (max_lr - min_lr) * (step - start) / (end - start)


def validated(cut):
    """`cut(tokens, seq_len)` behind the right ValueErrors: a slip in the cutting only."""

    def windows(tokens, seq_len):
        make_windows(tokens, 1)  # raises for a tensor that is not 1-D
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        return cut(tokens, seq_len)

    return windows


def windows_padded(tokens, seq_len):
    return F.pad(tokens, (0, -len(tokens) % seq_len)).view(-1, seq_len)


def windows_unchecked_seq_len(tokens, seq_len):
    if tokens.dim() != 1:
        raise ValueError("tokens must be 1-D")
    n = len(tokens) // seq_len
    return tokens[: n * seq_len].reshape(n, seq_len).clone()


def step(
    order=("lr", "forward", "backward", "clip", "step", "zero"),
    loss_of=next_token_loss,
    clip="global",
    groups="all",
    result="float",
):
    """A train_step that does the actions of `order` in that order, the way a learner might."""

    def train_step(model, batch, optimizer, *, lr, grad_clip):
        loss = None
        for action in order:
            if action == "lr":
                chosen = optimizer.param_groups[:1] if groups == "first" else optimizer.param_groups
                for group in chosen:
                    group["lr"] = lr
            elif action == "forward":
                loss = loss_of(model(batch), batch)
            elif action == "backward":
                loss.backward()
            elif action == "clip" and grad_clip is not None and (grad_clip or clip == "zero too"):
                if clip == "each":
                    for param in model.parameters():
                        torch.nn.utils.clip_grad_norm_([param], grad_clip)
                elif clip == "value":
                    torch.nn.utils.clip_grad_value_(model.parameters(), grad_clip)
                else:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            elif action == "step":
                optimizer.step()
            elif action == "zero":
                optimizer.zero_grad()
        return loss.detach() if result == "tensor" else loss.item()

    return train_step


NO_LR = ("forward", "backward", "clip", "step", "zero")


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
        Mistake("decay_everything", "weight decay on every parameter, biases and LayerNorm's w and b included (decay only the W_ parameters)", lambda model, lr, wd: torch.optim.AdamW(model.parameters(), lr=lr, betas=BETAS, weight_decay=wd)),
        Mistake("decay_by_dimensions", "decay on every parameter with 2 or more dimensions, which decays b_Q, b_K, b_V: they are 2-D ([n_heads, d_head]) but biases (decay by name: the W_ parameters)", lambda model, lr, wd: adamw(model, lr, wd, decayed=lambda name, p: p.dim() >= 2)),
        Mistake("decay_nothing", "no weight decay on any parameter", lambda model, lr, wd: torch.optim.AdamW(model.parameters(), lr=lr, betas=BETAS, weight_decay=0.0)),
        Mistake("no_decay_group_default", "a no-decay group without weight_decay=0.0: AdamW then gives it its default weight_decay of 0.01", lambda model, lr, wd: adamw(model, lr, wd, rest_decay=None)),
        Mistake("only_3d_decay", "decay only on parameters with more than 2 dimensions (p.dim() > 2), which leaves the embeddings and MLP weights undecayed", lambda model, lr, wd: adamw(model, lr, wd, decayed=lambda name, p: p.dim() > 2)),
        Mistake("only_2d_decay", "decay only on parameters with exactly 2 dimensions (p.dim() == 2), which leaves the 3-d attention weights W_Q, W_K, W_V, W_O undecayed and decays the 2-D biases b_Q, b_K, b_V", lambda model, lr, wd: adamw(model, lr, wd, decayed=lambda name, p: p.dim() == 2)),
        Mistake("groups_swapped", "the two groups swapped: decay on biases and LayerNorm, none on the matrices", lambda model, lr, wd: adamw(model, lr, wd, decayed=lambda name, p: not is_weight(name, p))),
        Mistake("default_betas", "AdamW's default betas (0.9, 0.999) instead of BETAS = (0.9, 0.95)", lambda model, lr, wd: adamw(model, lr, wd, betas=(0.9, 0.999))),
        Mistake("default_lr", "AdamW's default lr of 0.001 instead of the lr argument", lambda model, lr, wd: adamw(model, 1e-3, wd)),
        Mistake("parameter_twice", "a parameter in both groups (every parameter must be in exactly one group)", lambda model, lr, wd: adamw(model, lr, wd, rest=lambda name, p: True)),
        Mistake("adam_not_adamw", "torch.optim.Adam, whose weight_decay is an L2 penalty mixed into the gradient; AdamW decays the weights directly", lambda model, lr, wd: adamw(model, lr, wd, cls=torch.optim.Adam)),
    ],
    "training.lr_at_step": [
        Mistake("no_warmup", "a cosine from step 0 with no warmup (the lr must rise linearly during the first warmup_steps steps)", lambda step, **s: lr_at_step(step, **s | {"warmup_steps": 0})),
        Mistake("warmup_at_max_lr", "max_lr throughout the warmup instead of a linear rise", lambda step, **s: s["max_lr"] if step < s["warmup_steps"] else lr_at_step(step, **s)),
        Mistake("warmup_starts_at_zero", "a warmup that starts at 0, max_lr * step / warmup_steps: an lr of 0 makes the first optimizer step a no-op (use max_lr * (step + 1) / (warmup_steps + 1))", lambda step, **s: s["max_lr"] * step / s["warmup_steps"] if step < s["warmup_steps"] else lr_at_step(step, **s)),
        Mistake("warmup_off_by_one", "a warmup that reaches max_lr one step early: max_lr * (step + 1) / warmup_steps (divide by warmup_steps + 1, so the line meets the cosine at step warmup_steps)", lambda step, **s: s["max_lr"] * (step + 1) / s["warmup_steps"] if step < s["warmup_steps"] else lr_at_step(step, **s)),
        Mistake("returns_tensor", "a learning rate returned as a torch tensor: the trainer needs a Python float (compute with math, or return .item())", lambda step, **s: torch.tensor(lr_at_step(step, **s), dtype=torch.float64)),
        Mistake("decays_to_zero", "a cosine down to 0 instead of min_lr", lambda step, **s: lr_at_step(step, **s | {"min_lr": 0.0})),
        Mistake("cosine_ends_late", "a cosine that lasts total_steps steps after the warmup, so it reaches min_lr at warmup_steps + total_steps instead of total_steps", lambda step, **s: lr_at_step(step, **s | {"total_steps": s["warmup_steps"] + s["total_steps"]})),
        Mistake("no_clamp_after_end", "a cosine that carries on after total_steps and rises again (stay at min_lr from total_steps on)", after_warmup(cosine)),
        Mistake("min_lr_added", "min_lr added on top of a cosine from max_lr to 0, so the decay starts at max_lr + min_lr", after_warmup(min_lr_added)),
        Mistake("linear_decay", "a linear decay instead of a cosine", after_warmup(linear_decay)),
    ],
    "training.make_windows": [
        Mistake("overlapping_windows", "overlapping windows, one starting at every token (stride 1, as tokens.unfold(0, seq_len, 1) makes): the windows must follow one another, window i starting at token i * seq_len", validated(lambda tokens, seq_len: tokens.unfold(0, seq_len, 1).clone())),
        Mistake("remainder_padded", "a last window padded with zeros instead of the remainder dropped", validated(windows_padded)),
        Mistake("remainder_kept_by_view", "tokens.view(-1, seq_len) on the whole stream, which fails unless seq_len divides it: drop the remainder first", validated(lambda tokens, seq_len: tokens.view(-1, seq_len).clone())),
        Mistake("windows_one_too_long", "windows of seq_len + 1 tokens (an input and its shifted target), which the loss does not need: it shifts inside the window", validated(lambda tokens, seq_len: tokens.unfold(0, seq_len + 1, seq_len).clone())),
        Mistake("positions_across_windows", "the stream read column by column, view(seq_len, -1).T: each window takes every n_windows-th token (rearrange \"(window pos) -> window pos\", not \"(pos window)\")", validated(lambda tokens, seq_len: tokens[: len(tokens) // seq_len * seq_len].view(seq_len, -1).T.clone())),
        Mistake("view_not_copy", "windows that are a view of tokens (a slice and view or unfold without .clone()): writing into a window changes the caller's stream", validated(lambda tokens, seq_len: tokens[: len(tokens) // seq_len * seq_len].view(-1, seq_len))),
        Mistake("no_seq_len_check", "no ValueError for seq_len < 1: seq_len=0 divides by zero", windows_unchecked_seq_len),
        Mistake("two_d_flattened", "a 2-D input flattened into one stream instead of a ValueError", lambda tokens, seq_len: make_windows(tokens.flatten(), seq_len)),
    ],
    "training.train_step": [
        Mistake("no_zero_grad", "no optimizer.zero_grad(): the gradients of one batch are added to the next one's", step(order=("lr", "forward", "backward", "clip", "step"))),
        Mistake("zero_grad_before_step", "optimizer.zero_grad() between backward() and step(): the step finds no gradient and changes nothing", step(order=("lr", "forward", "backward", "zero", "clip", "step"))),
        Mistake("step_before_backward", "optimizer.step() before loss.backward(): the step finds no gradient (the step comes after the backward pass)", step(order=("zero", "lr", "forward", "step", "backward", "clip"))),
        Mistake("zero_grad_at_start", "optimizer.zero_grad() at the start of the step instead of the end: the parameters are right, but the gradients are left in .grad after the step", step(order=("zero", "lr", "forward", "backward", "clip", "step"))),
        Mistake("clip_after_step", "the gradients clipped after optimizer.step(), when the step has already used them unclipped", step(order=("lr", "forward", "backward", "step", "clip", "zero"))),
        Mistake("no_clipping", "no gradient clipping (clip the global norm to grad_clip, e.g. with torch.nn.utils.clip_grad_norm_)", step(order=("lr", "forward", "backward", "step", "zero"))),
        Mistake("clip_each_parameter", "each parameter's gradient clipped on its own: clip the norm of all the gradients together, which keeps the step's direction", step(clip="each")),
        Mistake("clip_by_value", "each gradient value clipped to [-grad_clip, grad_clip] (clip_grad_value_): clip the global norm instead, which scales all gradients by one factor", step(clip="value")),
        Mistake("clip_to_zero", "grad_clip=0 passed to clip_grad_norm_, which scales every gradient to 0 (0 means no clipping)", step(clip="zero too")),
        Mistake("lr_not_set", "the lr argument never used: the optimizer keeps its own learning rate (set group[\"lr\"] = lr for every group in optimizer.param_groups)", step(order=NO_LR)),
        Mistake("lr_first_group_only", "the lr set in optimizer.param_groups[0] only: every group (decayed and not) needs it", step(groups="first")),
        Mistake("returns_tensor", "the loss returned as a tensor: return a Python float (loss.item())", step(result="tensor")),
        Mistake("loss_detached", "a loss .detach()ed before backward(), which then has no gradient to follow", step(loss_of=lambda logits, tokens: next_token_loss(logits, tokens).detach())),
    ],
}
# fmt: on
