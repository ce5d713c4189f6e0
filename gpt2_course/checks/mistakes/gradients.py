"""Mistakes that cut the autograd graph: every forward value right, some gradient lost.

Each is a reference part with one tensor taken through `.detach()` (what `.data`, a
`torch.no_grad()` block, a `.item()` or NumPy round trip, or `torch.tensor(values)` also
do), the way a learner writes it. The checks catch them on their backward case.
"""

import einops
import torch
import torch.nn.functional as F

from gpt2_course.checks.core import Mistake
from gpt2_course.reference_parts import training
from gpt2_course.reference_parts.attention import MultiHeadAttention, single_head_attention
from gpt2_course.reference_parts.block import TransformerBlock
from gpt2_course.reference_parts.embeddings import Embedding, PositionalEmbedding, Unembedding
from gpt2_course.reference_parts.layernorm import LayerNorm
from gpt2_course.reference_parts.mlp import MLP, gelu_new
from gpt2_course.reference_parts.transformer import Transformer


def detached_output(part):
    """`part` (a module class or a function) whose result is `.detach()`ed."""
    if isinstance(part, type):
        forward = lambda self, *args: part.forward(self, *args).detach()  # noqa: E731
        return type(f"Detached{part.__name__}", (part,), {"forward": forward})
    return lambda *args: part(*args).detach()


def with_forward(part: type, forward) -> type:
    return type(f"Cut{part.__name__}", (part,), {"forward": forward})


def layernorm_stats_detached(self, x):
    """Mean and standard deviation treated as constants: the values are right, the
    gradient of the normalisation is not."""
    mean = x.mean(-1, keepdim=True).detach()
    std = (x.var(-1, keepdim=True, unbiased=False) + self.cfg.layer_norm_eps).sqrt().detach()
    return (x - mean) / std * self.w + self.b


def attention(cut_scores: bool = False, cut_output: bool = False):
    """Attention that calls apply_causal_mask as the notebook asks, cut in one place."""

    def forward(self, x):
        q, k, v = (
            einops.einsum(x, W, "b p m, h m d -> b h p d") + bias[:, None]
            for W, bias in ((self.W_Q, self.b_Q), (self.W_K, self.b_K), (self.W_V, self.b_V))
        )
        scores = q @ k.transpose(-1, -2) / self.cfg.d_head**0.5
        pattern = self.apply_causal_mask(scores.detach() if cut_scores else scores).softmax(-1)
        out = einops.einsum(pattern @ v, self.W_O, "b h p d, h d m -> b p m") + self.b_O
        return out.detach() if cut_output else out

    return with_forward(MultiHeadAttention, forward)


def mlp_hidden_detached(self, x):
    hidden = gelu_new(F.linear(x, self.W_in.T, self.b_in)).detach()
    return F.linear(hidden, self.W_out.T, self.b_out)


def block_residual_detached(self, x):
    x = x.detach() + self.attn(self.ln1(x))  # the residual path cut: only the sublayers learn
    return x + self.mlp(self.ln2(x))


def transformer_blocks_detached(self, tokens):
    x = (self.embed(tokens) + self.pos_embed(tokens)).detach()  # nothing reaches the embeddings
    for block in self.blocks:
        x = block(x)
    return self.unembed(self.ln_final(x))


def loss_rebuilt_from_value(logits, tokens):
    """`torch.tensor(loss.item())`: the right number in a tensor with no history."""
    return torch.tensor(training.next_token_loss(logits, tokens).item())


CUT = "cuts the autograd graph"

# fmt: off
MISTAKES = {
    "embeddings.Embedding": [
        Mistake("detached_output", f"an embedding that {CUT} (W_E.data, or .detach()): no gradient reaches W_E", detached_output(Embedding)),
    ],
    "embeddings.PositionalEmbedding": [
        Mistake("detached_output", f"a positional embedding that {CUT} (W_pos.data, or .detach()): no gradient reaches W_pos", detached_output(PositionalEmbedding)),
    ],
    "embeddings.Unembedding": [
        Mistake("detached_output", f"an unembedding that {CUT} (.detach() on the logits): no gradient at all", detached_output(Unembedding)),
        Mistake("W_U_detached", "an unembedding that uses W_U.detach() (or W_U.data): no gradient reaches W_U", with_forward(Unembedding, lambda self, x: F.linear(x, self.W_U.detach().T, self.b_U))),
    ],
    "layernorm.LayerNorm": [
        Mistake("detached_output", f"a LayerNorm that {CUT} (.detach() on its output): no gradient at all", detached_output(LayerNorm)),
        Mistake("stats_detached", "a LayerNorm whose mean and standard deviation are .detach()ed (treated as constants): right values, wrong gradient with respect to x", with_forward(LayerNorm, layernorm_stats_detached)),
    ],
    "attention.single_head_attention": [
        Mistake("detached_output", f"an attention head that {CUT} (.detach() on its output): no gradient at all", detached_output(single_head_attention)),
    ],
    "attention.MultiHeadAttention": [
        Mistake("detached_output", f"an attention that {CUT} (.detach() on its output): no gradient at all", attention(cut_output=True)),
        Mistake("scores_detached", "an attention whose scores are .detach()ed before the softmax: no gradient reaches W_Q, W_K, b_Q, b_K", attention(cut_scores=True)),
    ],
    "mlp.gelu_new": [
        Mistake("detached_output", f"a GELU that {CUT} (.detach(), or a NumPy or math round trip): no gradient at all", detached_output(gelu_new)),
    ],
    "mlp.MLP": [
        Mistake("detached_output", f"an MLP that {CUT} (.detach() on its output): no gradient at all", detached_output(MLP)),
        Mistake("hidden_detached", "an MLP whose hidden activations are .detach()ed: no gradient reaches W_in, b_in or the input", with_forward(MLP, mlp_hidden_detached)),
    ],
    "block.TransformerBlock": [
        Mistake("detached_output", f"a block that {CUT} (.detach() on its output): no gradient at all", detached_output(TransformerBlock)),
        Mistake("residual_detached", "a block that adds the sublayer's output to x.detach(): the residual path carries no gradient", with_forward(TransformerBlock, block_residual_detached)),
    ],
    "transformer.Transformer": [
        Mistake("detached_output", f"a model that {CUT} (.detach() on the logits): no gradient at all", detached_output(Transformer)),
        Mistake("embeddings_detached", "a model that .detach()es the embeddings before the blocks: no gradient reaches W_E or W_pos", with_forward(Transformer, transformer_blocks_detached)),
    ],
    "training.next_token_loss": [
        Mistake("detached_loss", f"a loss that {CUT} (.detach()): loss.backward() would fail, and nothing would train", detached_output(training.next_token_loss)),
        Mistake("loss_from_item", "a loss rebuilt from its value, torch.tensor(loss.item()): a tensor with no history, so nothing would train", loss_rebuilt_from_value),
    ],
}
# fmt: on
