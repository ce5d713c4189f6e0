"""Common Transformer and load_gpt2_weights mistakes (notebook 05), on the reference parts."""

import einops
import torch
from torch import nn

from gpt2_course.checks.core import Mistake
from gpt2_course.reference_parts.transformer import Transformer, gpt2_weights

# ------------------------------------------------------------------ Transformer: the wiring


def wiring(forward):
    """The reference Transformer with `forward(self, tokens)` in place of its own."""
    return type(forward.__name__, (Transformer,), {"forward": forward})


def embedded(model, tokens):
    return model.embed(tokens) + model.pos_embed(tokens)


def blocks_read_embeddings(self, tokens):
    for block in self.blocks:
        residual = block(embedded(self, tokens))
    return self.unembed(self.ln_final(residual))


# ------------------------------------------------------------------ load_gpt2_weights


def loader(change):
    """A load_gpt2_weights that starts from the right mapping (the reference part's
    gpt2_weights), lets `change(weights, cfg)` break one thing in it, and copies the
    result in plainly, as a learner's function would."""

    def load(model, hf_state_dict):
        weights = change(gpt2_weights(hf_state_dict, model.cfg), model.cfg)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)

    return load


def without(weights, *names):
    return {name: value for name, value in weights.items() if name not in names}


def changed(weights, suffixes, change):
    """`weights` with `change` applied to those whose names end with one of `suffixes`."""
    return weights | {name: change(v) for name, v in weights.items() if name.endswith(suffixes)}


def kqv_order(weights, cfg):
    swap = {"_Q": "_K", "_K": "_Q"}
    return weights | {
        name[:-2] + swap[name[-2:]]: v for name, v in weights.items() if name[-2:] in swap
    }


def c_proj_transposed(weights, cfg):
    def transposed(w_o):  # c_proj.weight, [(h d_head), d_model], is square
        c_proj = einops.rearrange(w_o, "h d_head d_model -> (h d_head) d_model")
        return einops.rearrange(c_proj.T, "(h d_head) d_model -> h d_head d_model", h=cfg.n_heads)

    return changed(weights, "attn.W_O", transposed)


def qkv_slices_transposed(weights, cfg):
    def transposed(w):  # each third of c_attn.weight, [d_model, (h d_head)], is square too
        c_attn_slice = einops.rearrange(w, "h d_model d_head -> d_model (h d_head)")
        return einops.rearrange(
            c_attn_slice.T, "d_model (h d_head) -> h d_model d_head", h=cfg.n_heads
        )

    return changed(weights, ("attn.W_Q", "attn.W_K", "attn.W_V"), transposed)


def heads_split_wrong_way(weights, cfg):
    def split(w):
        merged = einops.rearrange(w, "h d_model d_head -> d_model (h d_head)")
        return einops.rearrange(merged, "d_model (d_head h) -> h d_model d_head", h=cfg.n_heads)

    return changed(weights, ("attn.W_Q", "attn.W_K", "attn.W_V"), split)


def load_W_U_is_W_E(model, hf_state_dict):
    loader(lambda weights, cfg: without(weights, "unembed.W_U"))(model, hf_state_dict)
    model.unembed.W_U = model.embed.W_E  # one Parameter for both, as a tie


# fmt: off
MISTAKES = {
    "transformer.Transformer": [
        Mistake("no_ln_final", "a model without the final LayerNorm (ln_final)", wiring(lambda self, tokens: self.unembed(nn.Sequential(*self.blocks)(embedded(self, tokens))))),
        Mistake("no_positional_embedding", "a model that leaves out the positional embedding", wiring(lambda self, tokens: self.unembed(self.ln_final(nn.Sequential(*self.blocks)(self.embed(tokens)))))),
        Mistake("blocks_reversed", "a model that runs the blocks in reverse order", wiring(lambda self, tokens: self.unembed(self.ln_final(nn.Sequential(*reversed(self.blocks))(embedded(self, tokens)))))),
        Mistake("only_first_block", "a model that runs only the first block", wiring(lambda self, tokens: self.unembed(self.ln_final(self.blocks[0](embedded(self, tokens)))))),
        Mistake("blocks_read_embeddings", "a model whose every block reads the embeddings instead of the previous block's output", wiring(blocks_read_embeddings)),
        Mistake("unembed_before_ln_final", "a model that applies the unembedding before ln_final", wiring(lambda self, tokens: self.ln_final(self.unembed(nn.Sequential(*self.blocks)(embedded(self, tokens)))))),
    ],
    "transformer.load_gpt2_weights": [
        Mistake("kqv_order", "load_gpt2_weights splitting c_attn as K, Q, V (it is Q, then K, then V)", loader(kqv_order)),
        Mistake("c_proj_transposed", "load_gpt2_weights that transposes attn.c_proj as if it were an nn.Linear (Conv1D weights are already [d_in, d_out])", loader(c_proj_transposed)),
        Mistake("qkv_slices_transposed", "load_gpt2_weights that transposes each of the Q, K and V thirds of attn.c_attn as if it were an nn.Linear weight: each is square, [768, 768] in GPT-2 small, so no shape check objects", loader(qkv_slices_transposed)),
        Mistake("mlp_transposed", "load_gpt2_weights that transposes the MLP's c_fc and c_proj as if they were nn.Linear weights (Conv1D weights are already [d_in, d_out])", loader(lambda weights, cfg: changed(weights, ("mlp.W_in", "mlp.W_out"), lambda w: w.T))),
        Mistake("no_ln_final", "load_gpt2_weights that never loads ln_f into ln_final", loader(lambda weights, cfg: without(weights, "ln_final.w", "ln_final.b"))),
        Mistake("W_U_not_transposed", "load_gpt2_weights that sets W_U to wte.weight without transposing it (W_U is [d_model, d_vocab], wte.weight is [d_vocab, d_model])", loader(lambda weights, cfg: weights | {"unembed.W_U": weights["embed.W_E"]})),
        Mistake("W_U_from_W_pos", "load_gpt2_weights that ties W_U to the positional embedding wpe instead of the token embedding wte", loader(lambda weights, cfg: weights | {"unembed.W_U": weights["pos_embed.W_pos"].T})),
        Mistake("W_U_is_W_E", "load_gpt2_weights that ties the weights by making unembed.W_U the same Parameter as embed.W_E ([d_vocab, d_model]: the unembedding needs its transpose, [d_model, d_vocab])", load_W_U_is_W_E),
        Mistake("b_U_unset", "load_gpt2_weights that leaves unembed.b_U unset (GPT-2 has no unembedding bias: fill b_U with zeros)", loader(lambda weights, cfg: without(weights, "unembed.b_U"))),
        Mistake("heads_split_wrong_way", "load_gpt2_weights that splits heads as \"(d_head heads)\" instead of \"(heads d_head)\"", loader(heads_split_wrong_way)),
    ],
}
# fmt: on
