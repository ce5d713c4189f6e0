"""The fast path (fused attention), GPT-2's tied embeddings and residual init, and the
FLOP counts behind MFU: same numbers as the teaching path, and clear refusals."""

import copy
import dataclasses
import re

import einops
import pytest
import torch
from torch import nn

from gpt2_course import fast, parts, throughput, trainer
from gpt2_course.checks.mistakes.attention import MISTAKES as MISTAKE_LIBRARY
from gpt2_course.checks.mistakes.embeddings import MISTAKES as EMBEDDINGS_LIBRARY
from gpt2_course.checks.mistakes.layernorm import MISTAKES as LAYER_NORM_LIBRARY
from gpt2_course.checks.mistakes.mlp import MISTAKES as MLP_LIBRARY
from gpt2_course.checks.mistakes.mlp import mlp_with
from gpt2_course.config import TransformerConfig
from gpt2_course.exercises.attention import MultiHeadAttention as StubAttention
from gpt2_course.exercises.layernorm import LayerNorm as StubLayerNorm
from gpt2_course.exercises.mlp import MLP as StubMLP
from gpt2_course.fast import FastPathError
from gpt2_course.reference_parts.attention import MultiHeadAttention as ReferenceAttention
from gpt2_course.reference_parts.transformer import Transformer as ReferenceTransformer
from gpt2_course.throughput import ThroughputError
from solutions.attention import MultiHeadAttention as SolutionAttention
from solutions.layernorm import LayerNorm as SolutionLayerNorm
from solutions.mlp import MLP as SolutionMLP

CFG = TransformerConfig(d_model=32, n_heads=4, d_head=8, d_mlp=64, n_layers=2, n_ctx=16, d_vocab=97)
CHECK_HINT = "gpt2-course check attention.MultiHeadAttention"


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter random and large enough that attention patterns are far from uniform
    (LayerNorm gains around 1), biases included."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
            if name.split(".")[-1] == "w":
                param.add_(1.0)
    return model


def solution_transformer(seed: int = 0) -> nn.Module:
    with parts.using(parts.SOLUTIONS):
        return randomize(trainer.build_model(CFG, seed), seed)


def reference_transformer(seed: int = 0) -> nn.Module:
    return randomize(ReferenceTransformer(CFG), seed)


def reference_transformer_with_solution_attention(seed: int = 0) -> nn.Module:
    model = ReferenceTransformer(CFG)
    for block in model.blocks:
        block.attn = SolutionAttention(CFG)
    return randomize(model, seed)


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Within 1e-5 of the tensor's largest value (float32 sums of many terms round apart)."""
    gap = (actual - expected).abs().max().item()
    assert gap <= 1e-5 * max(1.0, expected.abs().max().item()), f"{name}: off by {gap:.2e}"


def assert_same_gradients(a: nn.Module, b: nn.Module) -> None:
    """Every parameter's gradient within 1e-5 of the largest gradient of its module: b_K's,
    for one, is zero in exact arithmetic (a softmax ignores a shift shared by all keys), so
    only float32 noise is left of it, of the size of the rounding of the other gradients."""
    expected = {name: param.grad for name, param in b.named_parameters()}
    for name, param in a.named_parameters():
        assert param.grad is not None, name
        module = name.rsplit(".", 1)[0]
        scale = max(
            g.abs().max().item() for n, g in expected.items() if n.rsplit(".", 1)[0] == module
        )
        gap = (param.grad - expected[name]).abs().max().item()
        assert gap <= 1e-5 * max(1.0, scale), f"{name}: off by {gap:.2e}"


# ------------------------------------------------------------------ same numbers, faster


@pytest.mark.parametrize("attention", [SolutionAttention, ReferenceAttention])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("pos", [1, 7])
def test_fast_attention_matches_einsum_outputs_and_gradients(attention, batch, pos):
    einsum = randomize(attention(CFG), seed=1)
    quick = fast.use_fast_attention(copy.deepcopy(einsum))
    assert fast.has_fast_attention(quick) and not fast.has_fast_attention(einsum)
    x = torch.randn(batch, pos, CFG.d_model, generator=torch.Generator().manual_seed(2))
    x_einsum, x_fast = x.clone().requires_grad_(), x.clone().requires_grad_()
    weights = torch.randn(batch, pos, CFG.d_model)  # a loss that weighs every output
    out_einsum, out_fast = einsum(x_einsum), quick(x_fast)
    assert_close_to_scale(out_fast, out_einsum, "output")
    (out_einsum * weights).sum().backward()
    (out_fast * weights).sum().backward()
    assert_close_to_scale(x_fast.grad, x_einsum.grad, "input gradient")
    assert_same_gradients(quick, einsum)


@pytest.mark.parametrize(
    "build", [solution_transformer, reference_transformer_with_solution_attention]
)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("pos", [1, 7])
def test_fast_path_whole_model_matches(build, batch, pos):
    einsum = build()
    quick = fast.use_fast_attention(copy.deepcopy(einsum))
    assert fast.has_fast_attention(quick)
    assert len(fast.attention_modules(quick)) == CFG.n_layers
    tokens = torch.randint(0, CFG.d_vocab, (batch, pos), generator=torch.Generator().manual_seed(3))
    logits_einsum, logits_fast = einsum(tokens), quick(tokens)
    assert_close_to_scale(logits_fast, logits_einsum, "logits")
    weights = torch.randn(logits_einsum.shape)
    (logits_einsum * weights).sum().backward()
    (logits_fast * weights).sum().backward()
    assert_same_gradients(quick, einsum)


# ------------------------------------------------------------------ wrong attention is refused


class WrongAttention(SolutionAttention):
    """The solution's parameters with a forward written out, and one mistake in it."""

    mistake = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def project(W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            if self.mistake == "float32 only":  # not a mistake: code that fails in float64
                W, b = W.to(torch.float32), b.to(torch.float32)
            return einops.einsum(x, W, "b p d_model, h d_model e -> b h p e") + b[:, None]

        q, k, v = (
            project(W, b)
            for W, b in ((self.W_Q, self.b_Q), (self.W_K, self.b_K), (self.W_V, self.b_V))
        )
        scale = self.cfg.d_model if self.mistake == "scale by d_model" else self.cfg.d_head
        scores = einops.einsum(q, k, "b h q e, b h k e -> b h q k") / scale**0.5
        n = scores.shape[-1]
        diagonal = {"no causal mask": None, "mask one late": 2, "mask one early": 0}.get(
            self.mistake, 1
        )
        if diagonal is not None:
            future = torch.ones(n, n, dtype=torch.bool).triu(diagonal)
            scores = scores.masked_fill(future, float("-inf"))
        pattern = scores.softmax(dim=-2 if self.mistake == "softmax over queries" else -1)
        z = einops.einsum(pattern, v, "b h q k, b h k e -> b h q e")
        return einops.einsum(z, self.W_O, "b h q e, h e d_model -> b q d_model") + self.b_O


def wrong(mistake: str) -> WrongAttention:
    attention = randomize(WrongAttention(CFG), seed=4)
    attention.mistake = mistake
    return attention


MISTAKES = ["no causal mask", "mask one late", "scale by d_model", "softmax over queries"]


@pytest.mark.parametrize("mistake", ["", "float32 only"])
def test_the_wrong_attention_without_a_mistake_passes(mistake):
    # the control for the refusals below: they are caused by the mistake alone
    attention = wrong(mistake)
    x = torch.randn(2, 7, CFG.d_model)
    expected = fast.fast_attention(attention, x)
    torch.testing.assert_close(attention(x), expected, atol=1e-5, rtol=1e-5)
    assert fast.has_fast_attention(fast.use_fast_attention(attention))


@pytest.mark.parametrize("mistake", MISTAKES)
def test_wrong_attention_is_refused_with_its_difference(mistake):
    attention = wrong(mistake)
    before = copy.deepcopy(attention.state_dict())
    with pytest.raises(FastPathError) as refusal:
        fast.use_fast_attention(attention)
    message = str(refusal.value)
    assert "does not match causal softmax attention" in message
    assert "its output differs by up to" in message
    assert "would hide" in message and CHECK_HINT in message
    assert "WrongAttention" in message
    assert not fast.has_fast_attention(attention) and "forward" not in attention.__dict__
    for name, value in attention.state_dict().items():  # the check worked on a copy
        assert torch.equal(value, before[name]), name


def test_a_mask_that_hides_the_query_itself_is_refused_for_its_nan():
    with pytest.raises(
        FastPathError, match="NaN where causal softmax attention gives numbers"
    ) as refusal:
        fast.use_fast_attention(wrong("mask one early"))
    assert CHECK_HINT in str(refusal.value)


RIGHT_NUMBERS = {"mask_inline", "in_place"}  # mistakes of style, not of arithmetic
LIBRARY = [
    mistake
    for check in ("attention.MultiHeadAttention", "attention.MultiHeadAttention.apply_causal_mask")
    for mistake in MISTAKE_LIBRARY[check]
]


@pytest.mark.parametrize("mistake", LIBRARY, ids=lambda m: m.name)
def test_every_wrong_attention_of_the_mistake_library_is_refused(mistake):
    attention = mistake.implementation(CFG)
    if mistake.name in RIGHT_NUMBERS:
        assert fast.has_fast_attention(fast.use_fast_attention(attention))
        return
    with pytest.raises(FastPathError, match="does not match causal softmax attention|returns"):
        fast.use_fast_attention(attention)


@pytest.mark.parametrize("mistake", MISTAKES)
def test_check_false_swaps_a_wrong_attention_anyway(mistake):
    attention = wrong(mistake)
    x = torch.randn(2, 7, CFG.d_model)
    own = attention(x)
    fast.use_fast_attention(attention, check=False)
    assert fast.has_fast_attention(attention)
    swapped = attention(x)
    assert not torch.allclose(swapped, own, atol=1e-3)  # the mistake is gone (hidden)
    torch.testing.assert_close(swapped, fast.fast_attention(attention, x))


def test_one_wrong_block_stops_the_whole_swap():
    model = solution_transformer()
    model.blocks[1].attn = wrong("no causal mask")
    with pytest.raises(FastPathError, match=r"blocks\.1\.attn"):
        fast.use_fast_attention(model)
    assert not any("forward" in attn.__dict__ for _, attn in fast.attention_modules(model))


def right_only_in_eval(component: type[nn.Module]) -> type[nn.Module]:
    """A component whose forward is right in eval mode and doubled while training."""

    class Sneaky(component):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = super().forward(x)
            return 2 * out if self.training else out

    return Sneaky


@pytest.mark.parametrize("component", [SolutionAttention, SolutionLayerNorm, SolutionMLP])
def test_a_forward_right_only_in_eval_mode_is_refused(component):
    model = nn.ModuleList([right_only_in_eval(component)(CFG)])
    model.cfg = CFG
    with pytest.raises(FastPathError, match=r"in training mode \(model\.train\(\)\)"):
        fast.use_fast_kernels(model)
    assert not fast.has_fast_kernels(model)


def with_gradient(component: type[nn.Module], how: str) -> type[nn.Module]:
    """A component with the right forward values and a wrong gradient."""

    class WrongGradient(component):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = super().forward(x)
            if how == "detached":
                return out.detach()
            if how == "halved":  # the same values, half the gradient
                return out.detach() + 0.5 * (out - out.detach())
            return out.detach() + (out - out.detach()) * (x.detach()[..., :1] > 0)  # some rows

    return WrongGradient


@pytest.mark.parametrize("how", ["detached", "halved", "cut on some rows"])
@pytest.mark.parametrize("component", [SolutionAttention, SolutionLayerNorm, SolutionMLP])
def test_a_right_forward_with_a_wrong_gradient_is_refused(component, how):
    model = nn.ModuleList([with_gradient(component, how)(CFG)])
    model.cfg = CFG
    expected = "carries no gradient" if how == "detached" else "its gradient for the input differs"
    with pytest.raises(FastPathError, match=expected):
        fast.use_fast_kernels(model)
    assert not fast.has_fast_kernels(model)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_the_check_takes_gradients_even_where_the_caller_takes_none(context):
    model = solution_transformer()
    with context():
        fast.use_fast_kernels(model)
    assert fast.has_fast_kernels(model)


class LayerNormWithFrozenScale(SolutionLayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(-1, keepdim=True)
        scale = (centred.pow(2).mean(-1, keepdim=True) + self.cfg.layer_norm_eps).sqrt()
        return centred / scale * self.w.detach() + self.b  # w would never train


def test_a_parameter_cut_off_from_its_gradient_is_refused():
    model = nn.ModuleList([LayerNormWithFrozenScale(CFG)])
    model.cfg = CFG
    with pytest.raises(FastPathError, match="its gradient for w differs"):
        fast.use_fast_kernels(model)


def test_the_stub_is_refused_because_its_forward_fails():
    with pytest.raises(FastPathError, match="forward fails.*NotImplementedError") as refusal:
        fast.use_fast_attention(StubAttention(CFG))
    assert CHECK_HINT in str(refusal.value)
    assert "gpt2_course/exercises/attention.py" in str(refusal.value)


def test_the_check_leaves_the_global_random_state_alone():
    model = solution_transformer()
    state = torch.get_rng_state()
    fast.use_fast_attention(model)
    assert torch.equal(torch.get_rng_state(), state)


def test_no_attention_or_wrong_shapes_are_clear_errors():
    with pytest.raises(FastPathError, match="has no attention module"):
        fast.use_fast_attention(nn.Linear(3, 3))

    class FlatAttention(nn.Module):  # the right names, Hugging Face's 2-D layout
        def __init__(self):
            super().__init__()
            for name in fast.ATTENTION_PARAMETERS:
                self.register_parameter(name, nn.Parameter(torch.zeros(32, 32)))

    with pytest.raises(FastPathError, match=r"W_Q has shape \[32, 32\].*n_heads, d_model, d_head"):
        fast.use_fast_attention(FlatAttention())


# ------------------------------------------------------------------ undoing it


def test_use_einsum_attention_restores_the_own_forward():
    attention = wrong("scale by d_model")
    x = torch.randn(2, 7, CFG.d_model)
    own = attention(x)
    fast.use_fast_attention(attention, check=False)
    assert not torch.allclose(attention(x), own, atol=1e-3)
    fast.use_einsum_attention(attention)
    assert not fast.has_fast_attention(attention) and "forward" not in attention.__dict__
    assert torch.equal(attention(x), own)


def test_fast_path_keeps_parameters_and_state_dict():
    model = solution_transformer()
    params = list(model.parameters())
    before = {name: value.clone() for name, value in model.state_dict().items()}
    fast.use_fast_attention(model)
    fast.use_fast_attention(model)  # a second call changes nothing
    assert all(attn.forward.replaced is None for _, attn in fast.attention_modules(model))
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[name], value) for name, value in before.items())
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    copied = copy.deepcopy(model)  # a copy runs on its own parameters
    assert copied.blocks[0].attn.forward.module is copied.blocks[0].attn
    fast.use_einsum_attention(model)
    assert list(model.state_dict()) == list(before)


# ------------------------------------------------------------------ tied embeddings


def tied_and_untied(seed: int = 5) -> tuple[nn.Module, nn.Module]:
    tied = fast.tie_weights(solution_transformer(seed))
    untied = solution_transformer(seed)
    with torch.no_grad():
        untied.unembed.W_U.copy_(untied.embed.W_E.T)
    return tied, untied


def test_tied_logits_equal_an_untied_model_with_w_u_set_to_w_e_transposed():
    tied, untied = tied_and_untied()
    assert fast.has_tied_weights(tied) and not fast.has_tied_weights(untied)
    tokens = torch.randint(0, CFG.d_vocab, (3, 7))
    torch.testing.assert_close(tied(tokens), untied(tokens))
    names = [name for name, _ in tied.named_parameters()]
    assert "unembed.W_U" not in names and "embed.W_E" in names
    assert sum(p.numel() for p in untied.parameters()) - sum(
        p.numel() for p in tied.parameters()
    ) == (CFG.d_vocab * CFG.d_model)


def test_tied_gradient_is_the_sum_of_both_uses():
    tied, untied = tied_and_untied()
    tokens = torch.randint(0, CFG.d_vocab, (3, 7))
    weights = torch.randn(3, 7, CFG.d_vocab)
    (tied(tokens) * weights).sum().backward()
    (untied(tokens) * weights).sum().backward()
    both = untied.embed.W_E.grad + untied.unembed.W_U.grad.T
    torch.testing.assert_close(tied.embed.W_E.grad, both)
    assert untied.unembed.W_U.grad.abs().sum() > 0 and untied.embed.W_E.grad.abs().sum() > 0


def test_an_optimizer_step_keeps_them_tied():
    tied, _ = tied_and_untied()
    optimizer = torch.optim.AdamW(tied.parameters(), lr=0.1)
    tokens = torch.randint(0, CFG.d_vocab, (2, 5))
    before = tied.embed.W_E.detach().clone()
    tied(tokens).logsumexp(-1).mean().backward()
    optimizer.step()
    assert not torch.equal(tied.embed.W_E, before)
    logits = tied(tokens)
    W_U = tied.unembed.W_U
    assert torch.equal(W_U, tied.embed.W_E.T) and W_U.data_ptr() == tied.embed.W_E.data_ptr()
    residual = tied.embed(tokens) + tied.pos_embed(tokens)
    for block in tied.blocks:
        residual = block(residual)
    explicit = tied.ln_final(residual) @ tied.embed.W_E.T + tied.unembed.b_U
    torch.testing.assert_close(logits, explicit)


def test_tied_state_dict_keeps_its_names_and_round_trips(tmp_path):
    tied, untied = tied_and_untied()
    state = tied.state_dict()
    assert list(state) == list(untied.state_dict())
    assert torch.equal(state["unembed.W_U"], tied.embed.W_E.T)
    tokens = torch.randint(0, CFG.d_vocab, (2, 6))
    with parts.using(parts.SOLUTIONS):
        trainer.save_checkpoint(tmp_path, tied, None, {"step": 1})
        loaded, _, _ = trainer.load_checkpoint(tmp_path)  # an untied model
        torch.testing.assert_close(loaded(tokens), tied(tokens))
        into_tied = fast.tie_weights(trainer.build_model(CFG, seed=9))
    into_tied.load_state_dict(loaded.state_dict())  # a tied checkpoint into a tied model
    torch.testing.assert_close(into_tied(tokens), tied(tokens))
    assert fast.has_tied_weights(copy.deepcopy(into_tied))


def test_an_untied_checkpoint_is_refused_by_a_tied_model_before_anything_loads():
    tied, _ = tied_and_untied()
    other = solution_transformer(seed=6)  # its own W_U, not W_E^T
    W_E = tied.embed.W_E.detach().clone()
    with pytest.raises(FastPathError, match="not embed.W_E transposed.*not tied"):
        tied.load_state_dict(other.state_dict())
    assert torch.equal(tied.embed.W_E, W_E)


def test_a_tied_copy_ties_to_its_own_embedding():
    tied, _ = tied_and_untied()
    twin = copy.deepcopy(tied)
    with torch.no_grad():
        twin.embed.W_E.mul_(2)
    tokens = torch.randint(0, CFG.d_vocab, (1, 4))
    twin(tokens)
    assert torch.equal(twin.unembed.W_U, twin.embed.W_E.T)
    assert not torch.equal(twin.unembed.W_U, tied.unembed.W_U)


def test_tying_the_reference_transformer_and_bad_models():
    reference = randomize(ReferenceTransformer(CFG), seed=7)
    tokens = torch.randint(0, CFG.d_vocab, (2, 5))
    with torch.no_grad():
        reference.unembed.W_U.copy_(reference.embed.W_E.T)
    expected = reference(tokens)
    fast.tie_weights(fast.tie_weights(reference))  # a second call changes nothing
    torch.testing.assert_close(reference(tokens), expected)
    with pytest.raises(FastPathError, match="`embed` with a parameter W_E"):
        fast.tie_weights(nn.Linear(2, 2))


# ------------------------------------------------------------------ GPT-2's residual init


def test_scale_residual_init_shrinks_only_the_residual_writers():
    with parts.using(parts.SOLUTIONS):
        model = trainer.build_model(CFG, seed=8)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    fast.scale_residual_init(model)
    factor = (2 * CFG.n_layers) ** -0.5
    scaled = {f"blocks.{i}.{w}" for i in range(CFG.n_layers) for w in ("attn.W_O", "mlp.W_out")}
    for name, value in model.state_dict().items():
        if name in scaled:
            torch.testing.assert_close(value, before[name] * factor)
            ratio = value.std() / before[name].std()
            assert abs(ratio - factor) < 1e-5, name
        else:
            assert torch.equal(value, before[name]), name
    with pytest.raises(FastPathError, match="already"):
        fast.scale_residual_init(model)
    with pytest.raises(FastPathError, match="no `blocks`"):
        fast.scale_residual_init(nn.Linear(2, 2))


# ------------------------------------------------------------------ FLOPs and MFU


def test_flops_per_token_of_gpt2_small_by_hand():
    # GPT-2 small: 12 layers, d_model 768, 12 heads of 64, d_mlp 3072, 50257 tokens, T = 1024
    per_layer = 4 * 768 * 768 + 2 * 768 * 3072  # W_Q, W_K, W_V, W_O; W_in, W_out
    assert per_layer == 7_077_888
    N = 12 * per_layer + 768 * 50257  # + the unembedding
    assert N == 123_532_032
    attention = 12 * 12 * 1024 * (12 * 64)  # 12 L T (n_heads d_head)
    training = 6 * N + attention
    assert training == 854_438_400
    gpt2 = TransformerConfig()
    assert throughput.flops_per_token(gpt2) == training
    assert throughput.flops_per_token(gpt2, training=False) == training / 3 == 284_812_800
    assert throughput.counted_parameters(gpt2) == N
    # a shorter sequence changes the attention term only
    assert throughput.flops_per_token(gpt2, seq_len=128) == 6 * N + 12 * 12 * 128 * 768


def test_attention_flops_use_the_heads_width():
    # d_model 64 but 2 heads of 16: the attention products are 32 wide
    cfg = TransformerConfig(d_model=64, n_heads=2, d_head=16, d_mlp=100, n_layers=3, n_ctx=10)
    N = 3 * (4 * 64 * 32 + 2 * 64 * 100) + 64 * 50257
    assert throughput.flops_per_token(cfg) == 6 * N + 12 * 3 * 10 * 32
    with pytest.raises(ThroughputError, match="seq_len"):
        throughput.flops_per_token(cfg, seq_len=0)


def test_mfu_arithmetic():
    gpt2 = TransformerConfig()
    assert throughput.mfu(100_000, gpt2, 989.5e12) == pytest.approx(
        100_000 * 854_438_400 / 989.5e12
    )
    assert throughput.mfu(0, gpt2, 1e12) == 0
    with pytest.raises(ThroughputError, match="GPT2_COURSE_PEAK_FLOPS"):
        throughput.mfu(1000, gpt2, None)
    with pytest.raises(ThroughputError, match="tokens_per_second"):
        throughput.mfu(-1, gpt2, 1e12)


def test_peak_flops_none_on_cpu_and_the_env_override(monkeypatch):
    monkeypatch.delenv(throughput.PEAK_FLOPS_ENV, raising=False)
    assert throughput.peak_flops("cpu", torch.bfloat16) is None
    assert throughput.peak_flops(torch.device("cpu"), torch.float32) is None
    monkeypatch.setenv(throughput.PEAK_FLOPS_ENV, "1.5e14")
    assert throughput.peak_flops("cpu", torch.float32) == 1.5e14
    for bad in ("fast", "-3", "0", "inf"):
        monkeypatch.setenv(throughput.PEAK_FLOPS_ENV, bad)
        with pytest.raises(ThroughputError, match="not a positive number"):
            throughput.peak_flops("cpu", torch.float32)


@pytest.mark.parametrize(
    "name, dtype, expected",
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.5e12),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756.5e12),
        ("NVIDIA H100 NVL", torch.float16, 835.5e12),
        ("NVIDIA H200", torch.bfloat16, 989.5e12),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
        ("NVIDIA A10G", torch.bfloat16, 125e12),
        ("NVIDIA L4", torch.bfloat16, 121e12),
        ("NVIDIA L40S", torch.bfloat16, 362e12),
        ("NVIDIA GeForce RTX 4090", torch.bfloat16, 165.2e12),
        ("NVIDIA GeForce RTX 3090", torch.float32, 35.6e12),
        ("Tesla T4", torch.bfloat16, None),  # no bf16 tensor cores
        ("Tesla T4", torch.float16, 65e12),
        ("NVIDIA A100-SXM4-80GB", torch.float32, 19.5e12),  # TF32 off
        ("NVIDIA A100-SXM4-80GB", torch.int8, None),
        ("Some Future GPU", torch.bfloat16, None),
    ],
)
def test_peak_flops_table(monkeypatch, name, dtype, expected):
    monkeypatch.delenv(throughput.PEAK_FLOPS_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(throughput, "_tf32_allowed", lambda: False)
    assert throughput.peak_flops("cuda", dtype) == expected


def test_float32_peak_follows_torchs_tf32_setting(monkeypatch):
    monkeypatch.delenv(throughput.PEAK_FLOPS_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert throughput.peak_flops("cuda", torch.float32) == 378e12
        torch.set_float32_matmul_precision("highest")
        if not torch.backends.cuda.matmul.allow_tf32:
            assert throughput.peak_flops("cuda", torch.float32) == 51e12
    finally:
        torch.set_float32_matmul_precision(precision)


# ------------------------------------------------------------------ every component's kernel

# the modules of a 2-block Transformer, by the check of the component each one is
EVERY_COMPONENT = {
    "attention.MultiHeadAttention": 2,
    "mlp.MLP": 2,
    "embeddings.Unembedding": 1,
    "layernorm.LayerNorm": 5,
}


def swapped_components(model: nn.Module) -> dict[str, int]:
    """How many modules of each component `model` has, each asserted to be on its kernel."""
    counts: dict[str, int] = {}
    for _, module, component in fast.fast_kernel_modules(model):
        assert "forward" in module.__dict__, component.check_id
        counts[component.check_id] = counts.get(component.check_id, 0) + 1
    return counts


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("build", [solution_transformer, reference_transformer])
def test_fast_kernels_give_the_whole_models_logits_and_gradients(build, tied):
    own = build()
    if tied:
        fast.tie_weights(own)
    quick = fast.use_fast_kernels(copy.deepcopy(own))
    assert fast.has_fast_kernels(quick) and not fast.has_fast_kernels(own)
    assert swapped_components(quick) == EVERY_COMPONENT
    assert fast.has_tied_weights(quick) == tied
    tokens = torch.randint(0, CFG.d_vocab, (3, 7), generator=torch.Generator().manual_seed(3))
    logits_own, logits_fast = own(tokens), quick(tokens)
    assert_close_to_scale(logits_fast, logits_own, "logits")
    weights = torch.randn(logits_own.shape)
    (logits_own * weights).sum().backward()
    (logits_fast * weights).sum().backward()
    assert_same_gradients(quick, own)


def test_the_tied_fast_unembedding_reads_w_e_itself():
    tied = fast.use_fast_kernels(fast.tie_weights(solution_transformer(seed=5)))
    x = torch.randn(2, 4, CFG.d_model)
    with torch.no_grad():
        tied.embed.W_E.mul_(2)  # after the swap: the kernel follows the embedding
    expected = x @ tied.embed.W_E.T + tied.unembed.b_U
    torch.testing.assert_close(tied.unembed(x), expected)
    tied.unembed(x).sum().backward()
    assert tied.embed.W_E.grad.stride() == tied.embed.W_E.stride()  # in W_E's own layout


def test_the_fast_layer_norm_uses_the_modules_epsilon():
    cfg = dataclasses.replace(CFG, layer_norm_eps=0.1)
    ln = randomize(SolutionLayerNorm(cfg), seed=6)
    x = torch.randn(2, 5, CFG.d_model) * 0.3  # a variance of the order of eps
    own = ln(x)
    fast.use_fast_kernels(ln)
    assert fast.has_fast_kernels(ln)
    torch.testing.assert_close(ln(x), own)
    assert not torch.allclose(ln(x), fast.fast_layer_norm(ln, x, eps=1e-5), atol=1e-3)


def test_a_layer_norm_without_cfg_takes_the_models_epsilon_or_is_refused():
    class BareLayerNorm(nn.Module):  # w and b, no cfg
        def __init__(self):
            super().__init__()
            self.w, self.b = nn.Parameter(torch.ones(8)), nn.Parameter(torch.zeros(8))

        def forward(self, x):
            return torch.nn.functional.layer_norm(x, (8,), self.w, self.b, 1e-3)

    holder = nn.Module()
    holder.ln = BareLayerNorm()
    with pytest.raises(FastPathError, match="nor the model has a cfg with layer_norm_eps.*epsilon"):
        fast.use_fast_kernels(holder)
    holder.cfg = dataclasses.replace(CFG, layer_norm_eps=1e-3)  # the model's cfg
    assert fast.has_fast_kernels(fast.use_fast_kernels(holder))


# Each mistake library's wrong components: every one that changes the numbers is refused.
SAME_NUMBERS = {"own_eps"}  # its own 1e-5 is CFG.layer_norm_eps: the same numbers here
KERNEL_LIBRARY = [
    pytest.param(check, mistake.implementation, mistake.name, id=f"{check}-{mistake.name}")
    for library in (LAYER_NORM_LIBRARY, MLP_LIBRARY, EMBEDDINGS_LIBRARY)
    for check, mistakes in library.items()
    if check in ("layernorm.LayerNorm", "mlp.MLP", "embeddings.Unembedding")
    for mistake in mistakes
] + [  # the wrong GELUs, each inside the reference MLP
    pytest.param("mlp.MLP", mlp_with(activation=m.implementation), m.name, id=f"gelu-{m.name}")
    for m in MLP_LIBRARY["mlp.gelu_new"]
]


@pytest.mark.parametrize("check, implementation, name", KERNEL_LIBRARY)
def test_every_wrong_component_of_the_mistake_libraries_is_refused(check, implementation, name):
    module = implementation(CFG)
    if name in SAME_NUMBERS:
        assert fast.has_fast_kernels(fast.use_fast_kernels(module))
        return
    with pytest.raises(FastPathError) as refusal:
        fast.use_fast_kernels(module)
    message = str(refusal.value)
    assert "does not match" in message and "would hide this mistake" in message
    assert ("its output differs by up to" in message) or ("gives NaN where" in message)
    assert f"`gpt2-course check {check}`" in message
    assert not fast.has_fast_kernels(module) and "forward" not in module.__dict__


def test_an_epsilon_of_its_own_is_refused_where_cfg_has_another():
    own_eps = next(m for m in LAYER_NORM_LIBRARY["layernorm.LayerNorm"] if m.name == "own_eps")
    module = own_eps.implementation(dataclasses.replace(CFG, layer_norm_eps=1e-3))
    with pytest.raises(FastPathError, match=r"eps = 0\.001 inside the square root.*differs"):
        fast.use_fast_kernels(module)


def test_the_exp_gelu_is_refused_for_its_nan():
    overflow = next(m for m in MLP_LIBRARY["mlp.gelu_new"] if m.name == "exp_tanh_overflow")
    with pytest.raises(FastPathError, match="gives NaN where GPT-2's MLP.*exp overflows"):
        fast.use_fast_kernels(mlp_with(activation=overflow.implementation)(CFG))


@pytest.mark.parametrize(
    "where, wrong, check",
    [
        ("blocks.1.ln2", LAYER_NORM_LIBRARY["layernorm.LayerNorm"][0], "layernorm.LayerNorm"),
        ("blocks.0.mlp", MLP_LIBRARY["mlp.MLP"][0], "mlp.MLP"),
        ("unembed", EMBEDDINGS_LIBRARY["embeddings.Unembedding"][0], "embeddings.Unembedding"),
    ],
)
def test_one_wrong_component_stops_the_whole_swap(where, wrong, check):
    model = solution_transformer()
    parent, _, attribute = where.rpartition(".")
    setattr(model.get_submodule(parent), attribute, wrong.implementation(CFG))
    with pytest.raises(FastPathError, match=rf"\({re.escape(where)}, from") as refusal:
        fast.use_fast_kernels(model)
    assert f"gpt2-course check {check}" in str(refusal.value)
    assert not any("forward" in module.__dict__ for module in model.modules())


def test_check_false_swaps_a_wrong_component_anyway():
    no_bias = EMBEDDINGS_LIBRARY["embeddings.Unembedding"][0].implementation(CFG)
    randomize(no_bias, seed=7)
    x = torch.randn(2, 3, CFG.d_model)
    own = no_bias(x)
    fast.use_fast_kernels(no_bias, check=False)
    torch.testing.assert_close(no_bias(x), own + no_bias.b_U)  # the mistake is gone (hidden)


def test_the_stubs_are_refused_because_their_forward_fails():
    for stub, check in [(StubLayerNorm, "layernorm.LayerNorm"), (StubMLP, "mlp.MLP")]:
        with pytest.raises(FastPathError, match="forward fails.*NotImplementedError") as refusal:
            fast.use_fast_kernels(stub(CFG))
        assert f"gpt2-course check {check}" in str(refusal.value)


def test_wrong_shapes_and_no_component_are_clear_errors():
    mlp = SolutionMLP(CFG)
    mlp.W_in = nn.Parameter(torch.zeros(CFG.d_mlp, CFG.d_model))  # transposed
    with pytest.raises(
        FastPathError,
        match=r"b_in has shape \[64\], the contract's is \[32\] \(d_model=64 from W_in",
    ):
        fast.use_fast_kernels(mlp)
    ln = SolutionLayerNorm(CFG)
    ln.b = nn.Parameter(torch.zeros(CFG.d_model + 1))
    with pytest.raises(FastPathError, match=r"b has shape \[33\].*d_model=32"):
        fast.use_fast_kernels(ln)
    with pytest.raises(FastPathError, match="nothing to put on the fast path"):
        fast.use_fast_kernels(nn.Linear(3, 3))


def test_use_own_forwards_undoes_every_kernel_and_use_einsum_attention_only_attention():
    model = solution_transformer()
    tokens = torch.randint(0, CFG.d_vocab, (2, 6))
    own = model(tokens)
    fast.use_fast_kernels(model)
    fast.use_fast_kernels(model)  # a second call changes nothing
    fast.use_einsum_attention(model)
    assert not fast.has_fast_attention(model) and not fast.has_fast_kernels(model)
    counts = swapped_components(fast.use_fast_kernels(fast.use_einsum_attention(model)))
    assert counts == EVERY_COMPONENT
    fast.use_own_forwards(model)
    assert not any("forward" in module.__dict__ for module in model.modules())
    assert torch.equal(model(tokens), own)


def test_fast_kernels_on_a_tied_model_keep_state_dict_and_checkpoints(tmp_path):
    tied, untied = tied_and_untied()
    params = list(tied.parameters())
    before = {name: value.clone() for name, value in tied.state_dict().items()}
    fast.use_fast_kernels(tied)
    assert all(a is b for a, b in zip(tied.parameters(), params, strict=True))
    state = tied.state_dict()
    assert list(state) == list(untied.state_dict())
    assert all(torch.equal(state[name], value) for name, value in before.items())
    tokens = torch.randint(0, CFG.d_vocab, (2, 6))
    expected = tied(tokens)
    with parts.using(parts.SOLUTIONS):
        trainer.save_checkpoint(
            tmp_path, tied, None, {"step": 1, "train_config": {"tie_weights": True}}
        )
        loaded, _, _ = trainer.load_checkpoint(tmp_path)  # tied, on its own forwards
    assert fast.has_tied_weights(loaded) and not fast.has_fast_kernels(loaded)
    torch.testing.assert_close(loaded(tokens), expected)
    fast.use_fast_kernels(loaded)
    torch.testing.assert_close(loaded(tokens), expected)
    twin = copy.deepcopy(tied)  # a copy's kernels run on the copy's own W_E
    assert twin.unembed.forward.module is twin.unembed
    with torch.no_grad():
        twin.embed.W_E.mul_(2)
    assert not torch.allclose(twin(tokens), expected)
    torch.testing.assert_close(tied(tokens), expected)


def test_use_fast_kernels_leaves_the_global_random_state_alone():
    model = fast.tie_weights(solution_transformer())
    state = torch.get_rng_state()
    fast.use_fast_kernels(model)
    assert torch.equal(torch.get_rng_state(), state)
