"""The backward pass is checked: a forward that is right but lets no gradient through fails.

The wrong implementations here are written independently of the mistake library
(`gpt2_course/checks/mistakes/gradients.py`, proven by tests/test_check_libraries.py).
"""

import numpy as np
import torch

from gpt2_course.checks import all_checks, get_check, judge_implementation
from solutions.layernorm import LayerNorm
from solutions.mlp import MLP
from solutions.training import next_token_loss

# every part a model trains through, and the single head that teaches attention
TRAINED_THROUGH = {
    "embeddings.Embedding",
    "embeddings.PositionalEmbedding",
    "embeddings.Unembedding",
    "layernorm.LayerNorm",
    "attention.single_head_attention",
    "attention.MultiHeadAttention",
    "mlp.gelu_new",
    "mlp.MLP",
    "block.TransformerBlock",
    "transformer.Transformer",
    "training.next_token_loss",
}


def verdict_of(check_id, implementation):
    verdict = judge_implementation(get_check(check_id), implementation)
    assert not verdict.passed
    return verdict


def test_every_part_a_model_trains_through_has_a_backward_case():
    checks = all_checks()
    for check_id in TRAINED_THROUGH:
        gradient_cases = [c for c in checks[check_id].cases if c.backward]
        assert len(gradient_cases) == 1, check_id
        assert gradient_cases[0].seeded and gradient_cases[0].expected_grads, check_id


class NormUnderNoGrad(LayerNorm):
    def forward(self, x):
        with torch.no_grad():
            return super().forward(x)


class NormThroughNumpy(LayerNorm):
    def forward(self, x):
        centred = x - x.mean(-1, keepdim=True)
        scale = np.sqrt(centred.pow(2).mean(-1, keepdim=True).numpy() + self.cfg.layer_norm_eps)
        return centred / torch.from_numpy(scale) * self.w + self.b


class NormWithFrozenScale(LayerNorm):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.w.requires_grad_(False)


class MLPFromValues(MLP):
    def forward(self, x):
        return torch.tensor(super().forward(x).tolist())


def loss_as_float_tensor(logits, tokens):
    return torch.tensor(float(next_token_loss(logits, tokens)))


def test_a_forward_under_no_grad_fails_with_a_clear_message():
    verdict = verdict_of("layernorm.LayerNorm", NormUnderNoGrad)
    assert "no gradient flows back through your code at all" in verdict.feedback
    assert "torch.no_grad()" in verdict.feedback
    assert "detached_output" in verdict.mistakes  # same behaviour as the library's


def test_a_numpy_round_trip_is_caught():
    verdict = verdict_of("layernorm.LayerNorm", NormThroughNumpy)
    assert "numpy()" in verdict.feedback and "test_gradients.py, line" in verdict.feedback
    assert "with gradients on, as training does" in verdict.feedback


def test_a_frozen_parameter_is_named():
    verdict = verdict_of("layernorm.LayerNorm", NormWithFrozenScale)
    assert "no gradient reaches `w`, so training would never change it" in verdict.feedback


def test_values_rebuilt_into_a_new_tensor_are_caught():
    assert "no gradient flows back" in verdict_of("mlp.MLP", MLPFromValues).feedback
    verdict = verdict_of("training.next_token_loss", loss_as_float_tensor)
    assert "no gradient flows back" in verdict.feedback


class NormWithOwnFormula(LayerNorm):
    """Right, written differently from the reference (unbiased variance corrected back)."""

    def forward(self, x):
        n = x.shape[-1]
        var = x.var(-1, keepdim=True, unbiased=True) * (n - 1) / n
        return (x - x.mean(-1, keepdim=True)) / (var + self.cfg.layer_norm_eps).sqrt() * self.w + (
            self.b
        )


def test_a_right_implementation_written_differently_passes():
    verdict = judge_implementation(get_check("layernorm.LayerNorm"), NormWithOwnFormula)
    assert verdict.passed, verdict.feedback


class BadBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("my backward is broken")


class NormWithBrokenBackward(LayerNorm):
    def forward(self, x):
        return super().forward(BadBackward.apply(x))


def test_an_error_in_the_backward_pass_is_reported_not_raised():
    verdict = verdict_of("layernorm.LayerNorm", NormWithBrokenBackward)
    assert "gradients" in verdict.feedback and "my backward is broken" in verdict.feedback


class NormAddsInPlace(LayerNorm):
    def forward(self, x):
        x -= x.mean(-1, keepdim=True)
        return x / (x.pow(2).mean(-1, keepdim=True) + self.cfg.layer_norm_eps).sqrt() * self.w + (
            self.b
        )


def test_an_in_place_edit_is_named_and_no_mistake_is_listed():
    verdict = verdict_of("layernorm.LayerNorm", NormAddsInPlace)
    assert "changed its input in place" in verdict.feedback
    assert verdict.mistakes == [] and "looks like" not in verdict.feedback


def test_a_detached_attention_is_diagnosed_as_itself():
    from solutions.attention import MultiHeadAttention

    class DetachedAttention(MultiHeadAttention):
        def forward(self, x):
            return super().forward(x).detach()

    verdict = verdict_of("attention.MultiHeadAttention", DetachedAttention)
    assert verdict.mistakes == ["detached_output"], verdict.feedback
