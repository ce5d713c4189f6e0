"""Common Transformer and load_gpt2_weights mistakes (notebook 05), on the reference parts."""

import einops
import torch

from gpt2_course.checks.core import Mistake
from gpt2_course.reference_parts.transformer import Transformer, gpt2_weights

# ------------------------------------------------------------------ Transformer: the wiring


class NoFinalLayerNorm(Transformer):
    def forward(self, tokens):
        residual = self.embed(tokens) + self.pos_embed(tokens)
        for block in self.blocks:
            residual = block(residual)
        return self.unembed(residual)


class NoPositionalEmbedding(Transformer):
    def forward(self, tokens):
        residual = self.embed(tokens)
        for block in self.blocks:
            residual = block(residual)
        return self.unembed(self.ln_final(residual))


class BlocksReversed(Transformer):
    def forward(self, tokens):
        residual = self.embed(tokens) + self.pos_embed(tokens)
        for block in reversed(self.blocks):
            residual = block(residual)
        return self.unembed(self.ln_final(residual))


class OnlyFirstBlock(Transformer):
    def forward(self, tokens):
        residual = self.blocks[0](self.embed(tokens) + self.pos_embed(tokens))
        return self.unembed(self.ln_final(residual))


class BlocksReadEmbeddings(Transformer):
    def forward(self, tokens):
        embedded = self.embed(tokens) + self.pos_embed(tokens)
        for block in self.blocks:
            residual = block(embedded)
        return self.unembed(self.ln_final(residual))


class UnembedBeforeLayerNorm(Transformer):
    def forward(self, tokens):
        residual = self.embed(tokens) + self.pos_embed(tokens)
        for block in self.blocks:
            residual = block(residual)
        return self.ln_final(self.unembed(residual))


# ------------------------------------------------------------------ load_gpt2_weights
# Each starts from the right mapping (the reference part's gpt2_weights), breaks one
# thing, and copies the result in plainly, as a learner's function would.


def copy_into(model, weights):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


def load_kqv_order(model, hf_state_dict):
    weights = gpt2_weights(hf_state_dict, model.cfg)
    for layer in range(model.cfg.n_layers):
        for kind in "Wb":
            q, k = f"blocks.{layer}.attn.{kind}_Q", f"blocks.{layer}.attn.{kind}_K"
            weights[q], weights[k] = weights[k], weights[q]
    copy_into(model, weights)


def load_c_proj_transposed(model, hf_state_dict):
    weights = gpt2_weights(hf_state_dict, model.cfg)
    sd = {name.removeprefix("transformer."): value for name, value in hf_state_dict.items()}
    for layer in range(model.cfg.n_layers):
        weights[f"blocks.{layer}.attn.W_O"] = einops.rearrange(
            sd[f"h.{layer}.attn.c_proj.weight"].T,
            "(heads d_head) d_model -> heads d_head d_model",
            heads=model.cfg.n_heads,
        )
    copy_into(model, weights)


def load_mlp_transposed(model, hf_state_dict):
    weights = gpt2_weights(hf_state_dict, model.cfg)
    for layer in range(model.cfg.n_layers):
        for name in ("W_in", "W_out"):
            weights[f"blocks.{layer}.mlp.{name}"] = weights[f"blocks.{layer}.mlp.{name}"].T
    copy_into(model, weights)


def load_no_ln_final(model, hf_state_dict):
    weights = gpt2_weights(hf_state_dict, model.cfg)
    del weights["ln_final.w"], weights["ln_final.b"]
    copy_into(model, weights)


def load_W_U_not_transposed(model, hf_state_dict):
    weights = gpt2_weights(hf_state_dict, model.cfg)
    weights["unembed.W_U"] = weights["embed.W_E"]
    copy_into(model, weights)


def load_W_U_from_W_pos(model, hf_state_dict):
    weights = gpt2_weights(hf_state_dict, model.cfg)
    weights["unembed.W_U"] = weights["pos_embed.W_pos"].T
    copy_into(model, weights)


def load_W_U_is_W_E(model, hf_state_dict):
    weights = gpt2_weights(hf_state_dict, model.cfg)
    del weights["unembed.W_U"]
    copy_into(model, weights)
    model.unembed.W_U = model.embed.W_E  # one Parameter for both, as a tie


def load_b_U_unset(model, hf_state_dict):
    weights = gpt2_weights(hf_state_dict, model.cfg)
    del weights["unembed.b_U"]
    copy_into(model, weights)


def load_heads_split_wrong_way(model, hf_state_dict):
    weights = gpt2_weights(hf_state_dict, model.cfg)
    for layer in range(model.cfg.n_layers):
        for x in "QKV":
            name = f"blocks.{layer}.attn.W_{x}"
            merged = einops.rearrange(weights[name], "h d_model d_head -> d_model (h d_head)")
            weights[name] = einops.rearrange(
                merged, "d_model (d_head h) -> h d_model d_head", h=model.cfg.n_heads
            )
    copy_into(model, weights)


# fmt: off
MISTAKES = {
    "transformer.Transformer": [
        Mistake("no_ln_final", "a model without the final LayerNorm (ln_final)", NoFinalLayerNorm),
        Mistake("no_positional_embedding", "a model that leaves out the positional embedding", NoPositionalEmbedding),
        Mistake("blocks_reversed", "a model that runs the blocks in reverse order", BlocksReversed),
        Mistake("only_first_block", "a model that runs only the first block", OnlyFirstBlock),
        Mistake("blocks_read_embeddings", "a model whose every block reads the embeddings instead of the previous block's output", BlocksReadEmbeddings),
        Mistake("unembed_before_ln_final", "a model that applies the unembedding before ln_final", UnembedBeforeLayerNorm),
    ],
    "transformer.load_gpt2_weights": [
        Mistake("kqv_order", "load_gpt2_weights splitting c_attn as K, Q, V (it is Q, then K, then V)", load_kqv_order),
        Mistake("c_proj_transposed", "load_gpt2_weights that transposes attn.c_proj as if it were an nn.Linear (Conv1D weights are already [d_in, d_out])", load_c_proj_transposed),
        Mistake("mlp_transposed", "load_gpt2_weights that transposes the MLP's c_fc and c_proj as if they were nn.Linear weights (Conv1D weights are already [d_in, d_out])", load_mlp_transposed),
        Mistake("no_ln_final", "load_gpt2_weights that never loads ln_f into ln_final", load_no_ln_final),
        Mistake("W_U_not_transposed", "load_gpt2_weights that sets W_U to wte.weight without transposing it (W_U is [d_model, d_vocab], wte.weight is [d_vocab, d_model])", load_W_U_not_transposed),
        Mistake("W_U_from_W_pos", "load_gpt2_weights that ties W_U to the positional embedding wpe instead of the token embedding wte", load_W_U_from_W_pos),
        Mistake("W_U_is_W_E", "load_gpt2_weights that ties the weights by making unembed.W_U the same Parameter as embed.W_E ([d_vocab, d_model]: the unembedding needs its transpose, [d_model, d_vocab])", load_W_U_is_W_E),
        Mistake("b_U_unset", "load_gpt2_weights that leaves unembed.b_U unset (GPT-2 has no unembedding bias: fill b_U with zeros)", load_b_U_unset),
        Mistake("heads_split_wrong_way", "load_gpt2_weights that splits heads as \"(d_head heads)\" instead of \"(heads d_head)\"", load_heads_split_wrong_way),
    ],
}
# fmt: on
