"""Attention, MLP and block: what the checks assume about the reference, what they catch
beyond their mistake libraries, and the offline attention pictures."""

import math
import re
import socket
import urllib.request

import pytest
import torch
import torch.nn.functional as F

from gpt2_course import parts, visuals
from gpt2_course.checks import get_check, judge_implementation
from gpt2_course.checks.attention import compare_mask
from gpt2_course.checks.reference_data import GPT2_SMALL, randn, text_run
from gpt2_course.reference import get_reference
from gpt2_course.reference_parts.layernorm import LayerNorm
from solutions.attention import MultiHeadAttention, single_head_attention
from solutions.block import TransformerBlock
from solutions.mlp import MLP, gelu_new

MY_CHECKS = [
    "attention.single_head_attention",
    "attention.MultiHeadAttention.apply_causal_mask",
    "attention.MultiHeadAttention",
    "mlp.gelu_new",
    "mlp.MLP",
    "block.TransformerBlock",
]


# ------------------------------------------------------------------ the reference's hooks


def test_reference_hooks_hold_what_the_checks_assume():
    """TransformerLens 4.3's bridge: scaled scores masked with finfo.min, pattern, z, outputs."""
    _, acts = text_run()
    bridge = get_reference().bridge
    layer = 3
    a = {
        k[len(f"blocks.{layer}.") :]: v for k, v in acts.items() if k.startswith(f"blocks.{layer}.")
    }
    attn, mlp = bridge.blocks[layer].attn, bridge.blocks[layer].mlp
    q, k, v = a["attn.hook_q"], a["attn.hook_k"], a["attn.hook_v"]
    scores = a["attn.hook_attn_scores"]
    pos = q.shape[1]
    visible = torch.ones(pos, pos, dtype=torch.bool).tril()
    raw = torch.einsum("bqhd,bkhd->bhqk", q, k)
    torch.testing.assert_close(
        scores[..., visible], raw[..., visible] / math.sqrt(GPT2_SMALL.d_head)
    )
    assert (scores[..., ~visible] == torch.finfo(torch.float32).min).all()  # finite, not -inf
    torch.testing.assert_close(a["attn.hook_pattern"], scores.softmax(-1))
    torch.testing.assert_close(
        a["attn.hook_z"], torch.einsum("bhqk,bkhd->bqhd", a["attn.hook_pattern"], v)
    )
    out = torch.einsum("bqhd,hdm->bqm", a["attn.hook_z"], attn.W_O) + attn.b_O
    torch.testing.assert_close(a["hook_attn_out"], out)
    torch.testing.assert_close(a["attn.hook_out"], a["hook_attn_out"])
    torch.testing.assert_close(a["hook_resid_mid"], a["hook_resid_pre"] + a["hook_attn_out"])
    torch.testing.assert_close(a["mlp.hook_pre"], a["ln2.hook_out"] @ mlp.W_in + mlp.b_in)
    torch.testing.assert_close(a["mlp.hook_post"], F.gelu(a["mlp.hook_pre"], approximate="tanh"))
    torch.testing.assert_close(a["hook_mlp_out"], a["mlp.hook_post"] @ mlp.W_out + mlp.b_out)
    torch.testing.assert_close(a["hook_resid_post"], a["hook_resid_mid"] + a["hook_mlp_out"])


# ------------------------------------------------------------------ solutions


def test_causal_mask_with_a_key_cache_offset():
    """With k cached keys, query i sits at absolute position i + k and sees keys 0..i+k."""
    attn = MultiHeadAttention(GPT2_SMALL)
    scores = randn(1, 2, 3, 7, seed=1)
    masked = attn.apply_causal_mask(scores)
    for i in range(3):
        assert torch.equal(masked[..., i, : i + 5], scores[..., i, : i + 5])
        assert torch.isneginf(masked[..., i, i + 5 :]).all()
    assert not torch.equal(masked, scores)  # a copy was masked, not the input


def test_solutions_match_torch_on_a_small_model():
    cfg = get_check("attention.MultiHeadAttention").cases[-1].cfg
    torch.manual_seed(0)
    attn, mlp = MultiHeadAttention(cfg), MLP(cfg)
    x = torch.randn(2, 5, cfg.d_model)
    q = torch.einsum("bpm,hmd->bhpd", x, attn.W_Q) + attn.b_Q[:, None]
    k = torch.einsum("bpm,hmd->bhpd", x, attn.W_K) + attn.b_K[:, None]
    v = torch.einsum("bpm,hmd->bhpd", x, attn.W_V) + attn.b_V[:, None]
    z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = torch.einsum("bhpd,hdm->bpm", z, attn.W_O) + attn.b_O
    torch.testing.assert_close(attn(x), expected)
    torch.testing.assert_close(gelu_new(x), F.gelu(x, approximate="tanh"))
    torch.testing.assert_close(
        mlp(x), F.gelu(x @ mlp.W_in + mlp.b_in, approximate="tanh") @ mlp.W_out + mlp.b_out
    )


def test_one_head_at_a_time_adds_up_to_the_layer():
    """single_head_attention is MultiHeadAttention's per-head term: summed, plus b_O, the same."""
    cfg = get_check("attention.MultiHeadAttention").cases[-1].cfg
    torch.manual_seed(1)
    attn = MultiHeadAttention(cfg)
    with torch.no_grad():
        for b in (attn.b_Q, attn.b_K, attn.b_V, attn.b_O):
            b.normal_()
        x = torch.randn(1, 6, cfg.d_model)
        heads = [
            single_head_attention(
                x[0],
                *(getattr(attn, n)[h] for n in ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V", "W_O")),
            )
            for h in range(cfg.n_heads)
        ]
        torch.testing.assert_close(sum(heads) + attn.b_O, attn(x)[0])


def test_single_head_cases_reach_the_edges():
    cases = get_check("attention.single_head_attention").cases
    shapes = [(c.args[0].shape[0], c.args[1].shape) for c in cases if c.seeded]
    assert any(pos == 1 for pos, _ in shapes)  # a single key: only projections and biases
    assert any(w[1] % 2 == 1 for _, w in shapes)  # an odd d_head
    assert shapes[0][1][0] == shapes[0][1][1]  # square first: a transposed W_O runs there


# ------------------------------------------------------------------ what the checks catch


@pytest.mark.parametrize("check_id", MY_CHECKS)
def test_every_mistake_is_told_apart_from_the_others(check_id):
    """Each mistake is diagnosed as itself alone: the cases separate all of them."""
    check = get_check(check_id)
    for mistake in check.mistakes:
        verdict = judge_implementation(check, mistake.implementation)
        assert verdict.mistakes == [mistake.name], (mistake.name, verdict.feedback)


class AttentionZeroesItsInput(MultiHeadAttention):
    def forward(self, x):
        out = super().forward(x.clone())
        x.zero_()
        return out


class AttentionNaN(MultiHeadAttention):
    def forward(self, x):
        out = super().forward(x)
        return out.masked_fill(
            torch.zeros_like(out, dtype=torch.bool).index_fill(1, torch.tensor([2]), True),
            float("nan"),
        )


class BlockAddsInPlace(TransformerBlock):
    def forward(self, resid_pre):
        resid_pre += self.attn(self.ln1(resid_pre))
        return resid_pre + self.mlp(self.ln2(resid_pre))


def test_attention_check_catches_an_input_changed_in_place():
    verdict = judge_implementation(
        get_check("attention.MultiHeadAttention"), AttentionZeroesItsInput
    )
    assert not verdict.passed
    assert "changed its input in place" in verdict.feedback


def test_block_check_catches_a_residual_added_in_place():
    verdict = judge_implementation(get_check("block.TransformerBlock"), BlockAddsInPlace)
    assert not verdict.passed
    assert "in place" in verdict.feedback


def test_nan_in_attention_output_is_reported_clearly():
    verdict = judge_implementation(get_check("attention.MultiHeadAttention"), AttentionNaN)
    assert not verdict.passed
    assert "NaN" in verdict.feedback and "softmax" in verdict.feedback
    assert verdict.mistakes == []  # not mistaken for a known NaN mistake


class AttentionMaskingInline(MultiHeadAttention):
    """Right numbers, but the mask is written into forward instead of calling the method."""

    def apply_causal_mask(self, scores):
        raise AssertionError("never called")

    def forward(self, x):
        q, k, v = (
            torch.einsum("bpm,hmd->bhpd", x, W) + b[:, None]
            for W, b in ((self.W_Q, self.b_Q), (self.W_K, self.b_K), (self.W_V, self.b_V))
        )
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.cfg.d_head)
        future = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
        z = scores.masked_fill(future, float("-inf")).softmax(-1) @ v
        return torch.einsum("bhpd,hdm->bpm", z, self.W_O) + self.b_O


def test_attention_forward_must_call_apply_causal_mask():
    verdict = judge_implementation(
        get_check("attention.MultiHeadAttention"), AttentionMaskingInline
    )
    assert not verdict.passed
    assert "does not call self.apply_causal_mask" in verdict.feedback
    assert verdict.mistakes == ["mask_inline"]


def layernorm_with_eps(eps: float) -> type:
    """A learner's LayerNorm with `eps` written in instead of cfg.layer_norm_eps."""

    def forward(self, x):
        centred = x - x.mean(-1, keepdim=True)
        return centred / (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt() * self.w + self.b

    return type("LayerNormOwnEps", (LayerNorm,), {"forward": forward})


@pytest.mark.parametrize("eps", [1e-5, 1e-6, 1e-8, 1e-12])
def test_layernorm_epsilon_written_in_is_named_so(eps):
    """Not "epsilon outside the square root": an epsilon of its own (or next to none)."""
    verdict = judge_implementation(get_check("layernorm.LayerNorm"), layernorm_with_eps(eps))
    assert not verdict.passed
    assert verdict.mistakes and set(verdict.mistakes) <= {"own_eps", "no_eps"}, verdict.feedback
    if eps == 1e-5:  # GPT-2's own value: right everywhere but on the config with another eps
        assert verdict.mistakes == ["own_eps"]
        assert "layer_norm_eps=0.1" in verdict.feedback


def test_layernorm_epsilon_and_axis_slips_are_named_as_themselves():
    check = get_check("layernorm.LayerNorm")
    mine = {"eps_outside_sqrt", "no_eps", "own_eps", "wrong_axis", "over_pos_and_d_model"}
    mine |= {"over_batch", "over_whole_tensor", "over_batch_and_d_model", "over_batch_and_pos"}
    for mistake in check.mistakes:
        if mistake.name in mine:
            verdict = judge_implementation(check, mistake.implementation)
            assert verdict.mistakes == [mistake.name], (mistake.name, verdict.feedback)


def test_attention_feedback_says_where_the_error_starts():
    check = get_check("attention.MultiHeadAttention")
    names = {m.name: m for m in check.mistakes}
    early = judge_implementation(check, names["no_scaling"].implementation).feedback
    late = judge_implementation(check, names["b_O_per_head"].implementation).feedback
    assert "already differ" in early
    assert "match the reference's (hook_attn_scores)" in late
    after = judge_implementation(check, names["mask_after_softmax"].implementation).feedback
    assert "already a softmax" in after


def test_mask_check_accepts_any_mask_value_that_softmax_zeroes():
    scores = randn(2, 3, 6, 6, seed=5, scale=10.0)
    future = torch.ones(6, 6, dtype=torch.bool).triu(1)
    reference = scores.masked_fill(future, torch.finfo(torch.float32).min)
    for value in (float("-inf"), -1e9, -1e5, torch.finfo(torch.float32).min):
        assert compare_mask(scores.masked_fill(future, value), reference) is None, value
    for value in (0.0, -5.0, float("nan"), float("inf")):
        problem = compare_mask(scores.masked_fill(future, value), reference)
        assert problem is not None and ("future key" in problem or "NaN" in problem), value


def test_block_check_uses_the_reference_parts_whatever_the_learner_has():
    """The learner's attention, MLP and LayerNorm stubs are unimplemented here, yet a
    correctly wired block passes: the check builds it from the reference's parts."""
    assert parts.default_package() == parts.EXERCISES
    verdict = judge_implementation(get_check("block.TransformerBlock"), TransformerBlock)
    assert verdict.passed, verdict.feedback


def test_block_check_points_at_an_unused_ln2():
    check = get_check("block.TransformerBlock")
    shared = next(m for m in check.mistakes if m.name == "shared_ln")
    feedback = judge_implementation(check, shared.implementation).feedback
    assert "never calls self.ln2" in feedback
    assert "reference LayerNorm, attention and MLP" in feedback


# ------------------------------------------------------------------ pictures


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_circuitsvis_pictures_render_offline_with_inline_javascript(monkeypatch):
    import circuitsvis as cv

    _no_network(monkeypatch)
    tokens = ["Hello", " world", "</script>", " again"]
    pattern = torch.ones(2, 4, 4).tril() / torch.arange(1, 5)[:, None]
    html = visuals.offline(
        cv.attention.attention_patterns(tokens=tokens, attention=pattern)
    )._repr_html_()
    assert "CircuitsVis.render(" in html and "AttentionPatterns" in html
    assert len(html) > 100_000  # the bundled JavaScript is inline
    assert "unpkg" not in html and "jsdelivr" not in html
    assert not re.search(r"""(src|href)\s*=\s*["']?https?://""", html)
    assert not re.search(r"""(import|from)\s*\(?\s*["']https?://""", html)
    assert html.count("</script>") == 1  # the token cannot close the script early
    with pytest.raises(TypeError, match="circuitsvis"):
        visuals.offline("<div>not a rendering</div>")


def test_capture_pattern_reads_the_modules_own_pattern():
    _, acts = text_run()
    bridge = get_reference().bridge
    attn = MultiHeadAttention(GPT2_SMALL)
    with torch.no_grad():
        for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
            getattr(attn, name).copy_(getattr(bridge.blocks[2].attn, name))
    pattern = visuals.capture_pattern(attn, acts["blocks.2.ln1.hook_out"])
    torch.testing.assert_close(pattern, acts["blocks.2.attn.hook_pattern"], atol=1e-6, rtol=1e-5)


def test_capture_pattern_explains_a_forward_without_the_mask_method():
    class InlineMask(MultiHeadAttention):
        def forward(self, x):
            return x

    with pytest.raises(RuntimeError, match="never calls self.apply_causal_mask"):
        visuals.capture_pattern(InlineMask(GPT2_SMALL), torch.zeros(1, 3, GPT2_SMALL.d_model))


def test_matplotlib_pictures_draw(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = ["a", "b", "c"]
    ax = visuals.plot_attention_pattern(
        torch.ones(3, 3).tril() / torch.arange(1, 4)[:, None], tokens
    )
    with pytest.raises(ValueError, match="expected one head's pattern"):
        visuals.plot_attention_pattern(torch.ones(2, 3, 3), tokens)
    for fig in (ax.figure, visuals.draw_attention_idea(), visuals.draw_residual_stream()):
        fig.savefig(tmp_path / "picture.png")
        plt.close(fig)
