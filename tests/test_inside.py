"""Notebook 09's pieces: `lens.bridge_for` and the torch stand-in `lens.HookedGPT` against
TransformerLens, the five exercises (solution and reference part) against TransformerLens's
own tools, and what the inside.* checks say about code that goes wrong."""

import importlib

import pytest
import torch

from gpt2_course import lens, parts
from gpt2_course.checks import get_check, judge_implementation
from gpt2_course.checks import inside as checks
from gpt2_course.config import TransformerConfig
from gpt2_course.pretrained import CheckpointError, check_gpt2_state_dict
from gpt2_course.reference_parts import inside as reference
from gpt2_course.reference_parts.transformer import Transformer
from solutions import inside as solution
from solutions.transformer import load_gpt2_weights


@pytest.fixture(scope="module", params=["solutions.inside", "gpt2_course.reference_parts.inside"])
def impl(request):
    return importlib.import_module(request.param)


@pytest.fixture(scope="module")
def lensed():
    """The checks' seeded model, its bridge, tokens (BOS + 6 tokens twice) and the cache."""
    _, model, bridge = checks.lens_model()
    tokens, activations = checks.lens_run(1601, 6)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens)
    return model, bridge, tokens, cache, activations


def seeded_model(cfg: TransformerConfig, seed: int) -> Transformer:
    return checks.model_of(cfg, checks.seeded_weights(cfg, seed))


def feedback(check_id: str, implementation) -> str:
    verdict = judge_implementation(get_check(check_id), implementation)
    assert not verdict.passed
    return verdict.feedback


# ------------------------------------------------------------------ to_hf_state_dict


@pytest.mark.parametrize("cfg", [checks.ODD_HEADS, checks.FEW_HEADS, checks.LENS])
def test_to_hf_state_dict_round_trips_every_parameter(impl, cfg):
    model = seeded_model(cfg, 5)
    state_dict = impl.to_hf_state_dict(model)
    back = Transformer(cfg)
    load_gpt2_weights(back, state_dict)  # the solution's, which now reads lm_head.bias
    for name, param in back.named_parameters():
        assert torch.equal(param, dict(model.named_parameters())[name]), name
    assert not torch.equal(state_dict["lm_head.bias"], torch.zeros(cfg.d_vocab))


def test_to_hf_state_dict_shares_no_memory_with_the_model(impl):
    model = seeded_model(checks.ODD_HEADS, 6)
    before = {n: p.clone() for n, p in model.named_parameters()}
    for tensor in impl.to_hf_state_dict(model).values():
        tensor.add_(1.0)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_optional_lm_head_bias_is_checked_and_loaded():
    model = seeded_model(checks.FEW_HEADS, 7)
    state_dict = solution.to_hf_state_dict(model)
    assert "lm_head.bias" in check_gpt2_state_dict(state_dict, checks.FEW_HEADS)
    with pytest.raises(CheckpointError, match="lm_head.bias"):
        check_gpt2_state_dict(state_dict | {"lm_head.bias": torch.zeros(3)}, checks.FEW_HEADS)
    without = {n: t for n, t in state_dict.items() if n != "lm_head.bias"}
    back = Transformer(checks.FEW_HEADS)
    load_gpt2_weights(back, without)
    assert torch.equal(back.unembed.b_U, torch.zeros(checks.FEW_HEADS.d_vocab))


def test_to_hf_feedback_names_keys_shapes_and_aliasing():
    def renamed(model):
        sd = solution.to_hf_state_dict(model)
        sd["lm_head.b"] = sd.pop("lm_head.bias")
        return sd

    def squeezed(model):
        sd = solution.to_hf_state_dict(model)
        sd["transformer.ln_f.bias"] = sd["transformer.ln_f.bias"][None]
        return sd

    def aliased(model):
        return solution.to_hf_state_dict(model) | {"transformer.wte.weight": model.embed.W_E}

    text = feedback("inside.to_hf_state_dict", renamed)
    assert "missing lm_head.bias" in text and "unexpected lm_head.b" in text
    text = feedback("inside.to_hf_state_dict", squeezed)
    assert "transformer.ln_f.bias has shape [1, 24], expected [24]" in text
    text = feedback("inside.to_hf_state_dict", aliased)
    assert "transformer.wte.weight share memory with the model's parameters" in text


# ------------------------------------------------------------------ the bridge and the stand-in


def test_bridge_for_gives_the_models_logits_and_uses_b_U(lensed):
    model, bridge, tokens, _, _ = lensed
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens), model(tokens), atol=1e-5, rtol=1e-5)
    assert torch.equal(bridge.b_U, model.unembed.b_U.detach()) and model.unembed.b_U.abs().sum() > 0


def test_bridge_for_uses_the_learners_function_through_parts():
    model = seeded_model(checks.LENS, 8)
    with parts.using(parts.SOLUTIONS):
        bridge = lens.bridge_for(model)
    tokens = torch.randint(
        0, checks.LENS.d_vocab, (2, 7), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens), model(tokens), atol=1e-5, rtol=1e-5)


def test_bridge_for_names_to_hf_state_dict_when_the_mapping_is_wrong():
    from gpt2_course.checks.mistakes.inside import MISTAKES

    model = seeded_model(checks.LENS, 9)
    by_name = {m.name: m.implementation for m in MISTAKES["inside.to_hf_state_dict"]}
    with pytest.raises(ValueError, match=r"to_hf_state_dict maps some weight"):
        lens.bridge_for(model, by_name["qkv_interleaved"])
    with pytest.raises(ValueError, match=r"does not load into Hugging Face's GPT2LMHeadModel"):
        lens.bridge_for(model, by_name["no_transformer_prefix"])


def test_bridge_for_refuses_a_shape_hugging_face_cannot_hold():
    cfg = TransformerConfig(
        d_model=32, d_vocab=128, n_ctx=16, d_head=4, n_heads=4, d_mlp=64, n_layers=1
    )
    with pytest.raises(ValueError, match="n_heads \\* d_head == d_model"):
        lens.bridge_for(Transformer(cfg), reference.to_hf_state_dict)


def test_hooked_gpt_runs_like_the_bridge(lensed):
    model, bridge, tokens, _, _ = lensed
    hooked = lens.HookedGPT(model)

    def zero_pattern(pattern, hook):
        pattern[:, 2] = 0.0  # in place, returning None: TransformerLens keeps the change

    hook = [("blocks.1.attn.hook_pattern", zero_pattern)]
    with torch.no_grad():
        torch.testing.assert_close(hooked(tokens), bridge(tokens), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            hooked.run_with_hooks(tokens, fwd_hooks=hook),
            bridge.run_with_hooks(tokens, fwd_hooks=hook),
            atol=1e-5,
            rtol=1e-5,
        )
    assert not any(point.fns for point in hooked.hook_dict.values())
    with pytest.raises(ValueError, match="no hook named"):
        hooked.run_with_hooks(tokens, fwd_hooks=[("blocks.7.attn.hook_z", zero_pattern)])
    assert not any(point.fns for point in hooked.hook_dict.values())


@pytest.mark.slow
def test_bridge_for_gpt2_small():
    from gpt2_course.checks.reference_data import GPT2_SMALL, text_tokens
    from gpt2_course.reference import get_reference

    model = checks.model_of(
        GPT2_SMALL, checks.gpt2_weights(get_reference().hf_state_dict, GPT2_SMALL)
    )
    bridge = lens.bridge_for(model, reference.to_hf_state_dict)
    with torch.no_grad():
        torch.testing.assert_close(
            bridge(text_tokens()), model(text_tokens()), atol=1e-4, rtol=1e-4
        )


# ------------------------------------------------------------------ scores, lens, ablation


def test_scores_on_a_pattern_built_by_hand(impl):
    # a head that attends to the previous token, and one that does induction on BOS + [a b c]*2
    pos, half = 7, 3
    previous = torch.zeros(pos, pos)
    previous[0, 0] = 1.0
    previous[torch.arange(1, pos), torch.arange(pos - 1)] = 1.0
    induction = torch.eye(pos)
    for q in range(pos - half, pos):
        induction[q] = 0.0
        induction[q, q - half + 1] = 1.0
    pattern = torch.stack([previous, induction])[None]
    torch.testing.assert_close(impl.previous_token_score(pattern), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(impl.induction_score(pattern, half), torch.tensor([0.0, 1.0]))
    for bad in (0, 4):
        with pytest.raises(ValueError):
            impl.induction_score(pattern, bad)
    with pytest.raises(ValueError):
        impl.previous_token_score(pattern[0])


def test_logit_lens_equals_transformer_lens(impl, lensed):
    model, bridge, _, cache, activations = lensed
    with torch.no_grad():
        stack = cache.accumulated_resid(apply_ln=False)
        expected = cache.apply_ln_to_stack(stack, recompute_ln=True) @ bridge.W_U + bridge.b_U
        one_call = cache.logit_lens(positions=None).values
        got = impl.logit_lens(activations, model)  # a plain dict
        assert impl.logit_lens(cache, model).shape == got.shape  # an ActivationCache
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, one_call, atol=1e-5, rtol=1e-5)
    # the trap: the cached ln_final.hook_scale is the final stream's, right for the last row only
    ln = model.ln_final
    centred = stack - stack.mean(dim=-1, keepdim=True)
    cached = (centred / cache["ln_final.hook_scale"] * ln.w + ln.b) @ bridge.W_U + bridge.b_U
    torch.testing.assert_close(cached[-1], expected[-1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cached[0], expected[0], atol=1e-2)


def test_ablate_head_equals_run_with_hooks_on_the_pattern(impl, lensed):
    model, bridge, tokens, _, _ = lensed

    def zero_pattern(pattern, hook):
        pattern = pattern.clone()
        pattern[:, 3] = 0.0
        return pattern

    with torch.no_grad():
        expected = bridge.run_with_hooks(
            tokens, fwd_hooks=[("blocks.1.attn.hook_pattern", zero_pattern)]
        )
        for model_ in (bridge, lens.HookedGPT(model)):
            torch.testing.assert_close(
                impl.ablate_head(model_, tokens, 1, 3), expected, atol=1e-5, rtol=1e-5
            )
        assert not torch.allclose(expected, bridge(tokens), atol=1e-2)


def test_ablation_feedback_on_hooks_left_and_weights_changed():
    def leaves_hook(model, tokens, layer, head):
        def zero(z, hook):
            z = z.clone()
            z[:, :, head] = 0.0
            return z

        model.blocks[layer].attn.hook_z.add_hook(zero)
        return model(tokens)

    def edits_w_o(model, tokens, layer, head):
        with torch.no_grad():
            model.model.blocks[layer].attn.W_O[head] = 0.0
        return model(tokens)

    text = feedback("inside.ablate_head", leaves_hook)
    assert "hooks stay on the model afterwards (blocks.0.attn.hook_z)" in text
    text = feedback("inside.ablate_head", edits_w_o)
    assert "the model's weights changed (blocks.0.attn.W_O)" in text


def test_score_and_lens_feedback():
    def never_raises(pattern, half):
        return reference.induction_score(pattern, max(1, min(half, pattern.shape[-1] // 2)))

    text = feedback("inside.induction_score", never_raises)
    assert "half=0: a ValueError" in text and "must raise a ValueError" in text

    def wrong_last_row(cache, model):
        out = reference.logit_lens(cache, model).clone()
        out[-1] += 1.0
        return out

    assert "rows that differ: 2 (of 0..2)" in feedback("inside.logit_lens", wrong_last_row)
    text = feedback(
        "inside.logit_lens", lambda cache, model: reference.logit_lens(cache, model)[1:]
    )
    # without row 0, the rest is each block's hook_resid_post: a mistake of the library
    assert "3 rows" in text and "a logit lens that starts after block 0" in text


RUN_SIDE_WITHOUT_TL = """
import sys
sys.modules["transformer_lens"] = None  # as in the grader's sandbox: not importable
import torch
from gpt2_course import parts
from gpt2_course.checks import all_checks, load_implementation
from gpt2_course.checks.core import run_cases
from gpt2_course.grading import protocol

checks = all_checks()
store = torch.load(sys.argv[1], weights_only=True)
for check_id, path in zip(sys.argv[2::2], sys.argv[3::2]):
    check = checks[check_id]
    cases = protocol.unpack_inputs(open(path, "rb").read(), store)
    outcomes = run_cases(check.call, load_implementation(check, parts.SOLUTIONS), cases)
    assert all(o.error is None for o in outcomes), [o.error for o in outcomes]
    assert "transformer_lens.model_bridge" not in sys.modules
    print(check_id, len(outcomes))
"""


@pytest.mark.parametrize("check_id", ["inside.logit_lens", "inside.ablate_head"])
def test_the_run_side_needs_no_transformer_lens(check_id, tmp_path):
    import subprocess
    import sys

    from gpt2_course.grading import protocol

    store: dict = {}
    inputs = tmp_path / "inputs.pkl"
    inputs.write_bytes(protocol.pack_inputs(get_check(check_id).cases, store))
    torch.save(store, tmp_path / "store.pt")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            RUN_SIDE_WITHOUT_TL,
            str(tmp_path / "store.pt"),
            check_id,
            str(inputs),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{check_id} " in result.stdout


def test_logit_lens_must_not_feed_a_stack_of_layers_to_ln_final():
    """The course's LayerNorm and Unembedding take [batch, pos, d_model]: a lens that hands
    them the 4-d stack in one call fails on the learner's own parts in notebook 09, so the
    check's model refuses it too, with a message that says what to do."""

    def one_call(cache, model):
        n = model.cfg.n_layers
        rows = [cache[f"blocks.{layer}.hook_resid_pre"] for layer in range(n)]
        stack = torch.stack([*rows, cache[f"blocks.{n - 1}.hook_resid_post"]])
        return model.unembed(model.ln_final(stack))

    text = feedback("inside.logit_lens", one_call)
    assert "model.ln_final was called on a 4-d tensor" in text
    assert "one layer's residual stream at a time" in text


def test_scores_and_lens_refuse_wrong_types_and_shortcuts():
    """Attempts to pass with wrong code: a list for a tensor, float64 for float32, and a lens
    that copies the model's final logits into every row."""

    def as_list(pattern, half):
        return reference.induction_score(pattern, half).tolist()

    assert "returned list, expected a tensor" in feedback("inside.induction_score", as_list)

    def as_double(pattern):
        return reference.previous_token_score(pattern).double()

    text = feedback("inside.previous_token_score", as_double)
    assert "dtype torch.float64, expected torch.float32" in text

    def final_everywhere(cache, model):
        lens_rows = reference.logit_lens(cache, model)
        return lens_rows[-1:].expand_as(lens_rows).clone()

    assert "rows that differ: 0, 1 (of 0..2)" in feedback("inside.logit_lens", final_everywhere)
