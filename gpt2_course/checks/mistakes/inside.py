"""Common mistakes of notebook 09 (looking inside), on the reference parts."""

import einops
import torch

from gpt2_course.checks.core import Mistake
from gpt2_course.reference_parts import inside as reference

# ------------------------------------------------------------------ to_hf_state_dict


def state_dict(change):
    """A to_hf_state_dict that starts from the right one and lets `change(sd, model)` break
    one thing in it."""

    def to_hf(model):
        return change(reference.to_hf_state_dict(model), model)

    return to_hf


def per_block(sd, model, suffix, value):
    """`sd` with transformer.h.{i}.<suffix> set to value(blocks[i]) for every block."""
    return sd | {
        f"transformer.h.{i}.{suffix}": value(block) for i, block in enumerate(model.blocks)
    }


def qkv_interleaved(sd, model):
    sd = per_block(
        sd,
        model,
        "attn.c_attn.weight",
        lambda b: einops.rearrange(
            [b.attn.W_Q, b.attn.W_K, b.attn.W_V],
            "qkv heads d_model d_head -> d_model (heads qkv d_head)",
        ),
    )
    return per_block(
        sd,
        model,
        "attn.c_attn.bias",
        lambda b: einops.rearrange(
            [b.attn.b_Q, b.attn.b_K, b.attn.b_V], "qkv heads d_head -> (heads qkv d_head)"
        ),
    )


def qkv_heads_split_wrong_way(sd, model):
    return per_block(
        sd,
        model,
        "attn.c_attn.weight",
        lambda b: einops.rearrange(
            [b.attn.W_Q, b.attn.W_K, b.attn.W_V],
            "qkv heads d_model d_head -> d_model (qkv d_head heads)",
        ),
    )


def w_o_wrong_order(sd, model):
    return per_block(
        sd,
        model,
        "attn.c_proj.weight",
        lambda b: einops.rearrange(b.attn.W_O, "heads d_head d_model -> (d_head heads) d_model"),
    )


def linear_layout(sd, model):
    conv1d = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
    return {name: v.T.contiguous() if name.endswith(conv1d) else v for name, v in sd.items()}


def no_prefix(sd, model):
    return {name.removeprefix("transformer."): value for name, value in sd.items()}


def without_b_U(sd, model):
    return {name: value for name, value in sd.items() if name != "lm_head.bias"}


def views(model):
    """The right mapping, with every tensor that needs no reshaping handed over as it is."""
    right = reference.to_hf_state_dict(model)
    params = dict(model.named_parameters())
    direct = {
        "transformer.wte.weight": "embed.W_E",
        "transformer.wpe.weight": "pos_embed.W_pos",
        "transformer.ln_f.weight": "ln_final.w",
        "transformer.ln_f.bias": "ln_final.b",
        "lm_head.weight": None,
        "lm_head.bias": "unembed.b_U",
    }
    for i in range(model.cfg.n_layers):
        for hf, ours in [("ln_1", "ln1"), ("ln_2", "ln2")]:
            direct[f"transformer.h.{i}.{hf}.weight"] = f"blocks.{i}.{ours}.w"
            direct[f"transformer.h.{i}.{hf}.bias"] = f"blocks.{i}.{ours}.b"
        direct[f"transformer.h.{i}.mlp.c_fc.weight"] = f"blocks.{i}.mlp.W_in"
        direct[f"transformer.h.{i}.mlp.c_proj.weight"] = f"blocks.{i}.mlp.W_out"
    out = {}
    for name, value in right.items():
        if name == "lm_head.weight":
            out[name] = model.unembed.W_U.detach().T  # a transposed view
        elif name in direct:
            out[name] = params[direct[name]].detach()
        else:
            out[name] = value
    return out


# ------------------------------------------------------------------ attention scores


def previous_including_query_0(pattern):
    # query 0 has no previous token: counting it as 0 shrinks every score
    batch, _, pos, _ = pattern.shape
    return pattern.diagonal(offset=-1, dim1=-2, dim2=-1).sum(dim=(0, 2)) / (batch * pos)


def previous_diagonal(pattern):
    return pattern.diagonal(offset=0, dim1=-2, dim2=-1).mean(dim=(0, 2))


def previous_swapped(pattern):
    return pattern.diagonal(offset=1, dim1=-2, dim2=-1).mean(dim=(0, 2))


def previous_sum(pattern):
    return pattern.diagonal(offset=-1, dim1=-2, dim2=-1).sum(dim=(0, 2))


def previous_mean_over_heads(pattern):
    return pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean()


def induction(queries_of, key_offset, swapped=False, over_heads=False):
    """An induction score over the queries `queries_of(pos, half)`, attending to key
    query - half + key_offset."""

    def score(pattern, half):
        if half < 1 or 2 * half > pattern.shape[-1]:
            raise ValueError(f"half={half} does not fit")
        if swapped:
            pattern = pattern.transpose(-1, -2)
        q = queries_of(pattern.shape[-1], half)
        picked = pattern[:, :, q, q - half + key_offset]
        return picked.mean() if over_heads else picked.mean(dim=(0, 2))

    return score


def second_copy(pos, half):
    return torch.arange(pos - half, pos)


def from_first_copy(pos, half):
    # every query whose key q - half + 1 exists, the first copy's (and the prefix's) included
    return torch.arange(half - 1, pos)


def counted_from_0(pos, half):
    return torch.arange(half, 2 * half)


# ------------------------------------------------------------------ the logit lens


def resid_rows(cache, n_layers, pre=True, post=False):
    rows = [cache[f"blocks.{i}.hook_resid_pre"] for i in range(n_layers)] if pre else []
    if post:
        rows += [cache[f"blocks.{i}.hook_resid_post"] for i in range(n_layers)]
    elif pre:
        rows.append(cache[f"blocks.{n_layers - 1}.hook_resid_post"])
    return torch.stack(rows)


def each_row(part, stack):
    """`part` (ln_final or unembed, which take [batch, pos, d_model]) on every layer's row."""
    return torch.stack([part(row) for row in stack])


def lens_without_ln_final(cache, model):
    return each_row(model.unembed, resid_rows(cache, model.cfg.n_layers))


def lens_cached_scale(cache, model):
    stack = resid_rows(cache, model.cfg.n_layers)
    centred = stack - stack.mean(dim=-1, keepdim=True)
    ln = model.ln_final
    return each_row(model.unembed, centred / cache["ln_final.hook_scale"] * ln.w + ln.b)


def lens_without_w_b(cache, model):
    stack = resid_rows(cache, model.cfg.n_layers)
    centred = stack - stack.mean(dim=-1, keepdim=True)
    variance = centred.pow(2).mean(dim=-1, keepdim=True)
    return each_row(model.unembed, centred / torch.sqrt(variance + model.cfg.layer_norm_eps))


def lens_after_each_block(cache, model):
    stack = resid_rows(cache, model.cfg.n_layers, pre=False, post=True)
    return each_row(model.unembed, each_row(model.ln_final, stack))


def lens_without_final_row(cache, model):
    n = model.cfg.n_layers
    stack = torch.stack([cache[f"blocks.{i}.hook_resid_pre"] for i in range(n)])
    return each_row(model.unembed, each_row(model.ln_final, stack))


def lens_without_b_U(cache, model):
    return each_row(model.ln_final, resid_rows(cache, model.cfg.n_layers)) @ model.unembed.W_U


# ------------------------------------------------------------------ ablating a head


def z_hook(layer_of, change):
    """An ablate_head that hooks blocks.{layer_of(layer)}.attn.hook_z with `change(z, head)`."""

    def ablate(model, tokens, layer, head):
        def hook(z, hook):
            return change(z.clone(), head)

        name = f"blocks.{layer_of(layer)}.attn.hook_z"
        return model.run_with_hooks(tokens, fwd_hooks=[(name, hook)])

    return ablate


def zero_at(index):
    def change(z, head):
        z[index(head)] = 0.0
        return z

    return change


def mean_of_head(z, head):
    z[:, :, head] = z[:, :, head].mean(dim=(0, 1))
    return z


def uniform_pattern(model, tokens, layer, head):
    def hook(pattern, hook):
        pattern = pattern.clone()
        pos = pattern.shape[-1]
        causal = torch.ones(pos, pos).tril()
        pattern[:, head] = causal / causal.sum(dim=-1, keepdim=True)
        return pattern

    return model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", hook)])


def clean_logits(model, tokens, layer, head):
    return model(tokens)


_same_layer = lambda layer: layer  # noqa: E731
_next_layer = lambda layer: layer + 1  # noqa: E731


# fmt: off
MISTAKES = {
    "inside.to_hf_state_dict": [
        Mistake("qkv_interleaved", "to_hf_state_dict that builds c_attn head by head, [Q | K | V] for head 0, then for head 1, ... (it is all of Q, then all of K, then all of V, each head after head)", state_dict(qkv_interleaved)),
        Mistake("qkv_heads_split_wrong_way", "to_hf_state_dict that merges the heads of c_attn as \"(d_head heads)\" instead of \"(heads d_head)\"", state_dict(qkv_heads_split_wrong_way)),
        Mistake("w_o_wrong_order", "to_hf_state_dict that flattens W_O into c_proj as \"(d_head heads)\" instead of \"(heads d_head)\"", state_dict(w_o_wrong_order)),
        Mistake("linear_layout", "to_hf_state_dict that transposes the Conv1D weights (c_attn, c_proj, c_fc) into nn.Linear's [d_out, d_in] layout: Conv1D stores [d_in, d_out]", state_dict(linear_layout)),
        Mistake("lm_head_tied_to_wte", "to_hf_state_dict that sets lm_head.weight to wte's weight (W_E), as if the unembedding were tied: it is your model's own W_U, transposed", state_dict(lambda sd, model: sd | {"lm_head.weight": sd["transformer.wte.weight"]})),
        Mistake("no_b_U", "to_hf_state_dict that leaves out lm_head.bias (your model's b_U)", state_dict(without_b_U)),
        Mistake("no_transformer_prefix", "to_hf_state_dict that leaves out the \"transformer.\" prefix (GPT2LMHeadModel names its body transformer: transformer.wte.weight, transformer.h.0...)", state_dict(no_prefix)),
        Mistake("views", "to_hf_state_dict that hands over the model's own parameters (and a transposed view of W_U) instead of copies", views),
    ],
    "inside.previous_token_score": [
        Mistake("includes_query_0", "a score that counts query 0 (which has no previous token) in the mean", previous_including_query_0),
        Mistake("diagonal", "a score of the attention of each token to itself, pattern[b, h, q, q]", previous_diagonal),
        Mistake("swapped_axes", "a score with query and key swapped, pattern[b, h, q - 1, q] (which a causal pattern makes 0)", previous_swapped),
        Mistake("sum_not_mean", "a score that sums over batch and queries instead of taking the mean", previous_sum),
        Mistake("mean_over_heads", "a score averaged over the heads too (one number; keep one per head)", previous_mean_over_heads),
    ],
    "inside.induction_score": [
        Mistake("offset_by_one", "the attention to the earlier copy of the same token, key q - half, instead of the token after it, key q - half + 1", induction(second_copy, 0)),
        Mistake("first_copy_included", "a score over every query from half - 1 on, the prefix and the first copy included (only the second copy, the last half positions, can do induction)", induction(from_first_copy, 1)),
        Mistake("assumes_no_prefix", "a score that assumes the repeated block starts at position 0 (queries half .. 2 * half - 1): the block is the last 2 * half positions, after any prefix such as BOS", induction(counted_from_0, 1)),
        Mistake("swapped_axes", "a score with query and key swapped, pattern[b, h, q - half + 1, q]", induction(second_copy, 1, swapped=True)),
        Mistake("mean_over_heads", "a score averaged over the heads too (one number; keep one per head)", induction(second_copy, 1, over_heads=True)),
    ],
    "inside.logit_lens": [
        Mistake("no_ln_final", "a logit lens without the final LayerNorm (unembedding the raw residual stream)", lens_without_ln_final),
        Mistake("cached_final_scale", "a logit lens that normalises every row with the cached ln_final.hook_scale (the final residual stream's) instead of recomputing each row's own", lens_cached_scale),
        Mistake("no_w_b", "a logit lens that normalises without ln_final's w and b", lens_without_w_b),
        Mistake("no_embedding_row", "a logit lens that starts after block 0 (each block's hook_resid_post): row 0 is the embeddings, blocks.0.hook_resid_pre", lens_after_each_block),
        Mistake("no_final_row", "a logit lens without the last row, the final residual stream (the last block's hook_resid_post)", lens_without_final_row),
        Mistake("no_b_U", "a logit lens without the unembedding's bias b_U", lens_without_b_U),
    ],
    "inside.ablate_head": [
        Mistake("every_head", "ablating every head of the layer (all of hook_z) instead of one", z_hook(_same_layer, zero_at(lambda head: (slice(None),)))),
        Mistake("d_head_axis", "zeroing index `head` of hook_z's last axis, d_head (hook_z is [batch, pos, n_heads, d_head])", z_hook(_same_layer, zero_at(lambda head: (..., head)))),
        Mistake("pos_axis", "zeroing index `head` of hook_z's second axis, the position (hook_z is [batch, pos, n_heads, d_head])", z_hook(_same_layer, zero_at(lambda head: (slice(None), head)))),
        Mistake("next_layer", "ablating the head in the next layer, blocks.{layer + 1}", z_hook(_next_layer, zero_at(lambda head: (slice(None), slice(None), head)))),
        Mistake("uniform_pattern", "setting the head's pattern to uniform attention over the earlier tokens instead of removing its output", uniform_pattern),
        Mistake("mean_ablation", "mean-ablating the head (its z averaged over batch and positions) instead of zeroing it", z_hook(_same_layer, mean_of_head)),
        Mistake("clean_logits", "the logits of the model with nothing ablated", clean_logits),
    ],
}
# fmt: on
