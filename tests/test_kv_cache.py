"""The KV cache (solutions/kv_cache.py and its reference part) and `gpt2-course generate`."""

import copy
import importlib
import io

import pytest
import torch

from gpt2_course import generation, parts
from gpt2_course.checks import kv_cache as data
from gpt2_course.config import TransformerConfig
from solutions.sampling import generate

random_prompts = data.prompts


@pytest.fixture(scope="module")
def small():
    return data.seeded_model()


@pytest.fixture(
    scope="module", params=["solutions.kv_cache", "gpt2_course.reference_parts.kv_cache"]
)
def impl(request):
    return importlib.import_module(request.param)


@pytest.fixture(autouse=True)
def reference_parts():
    # generate_with_cache picks tokens with parts.sample_next_token: use the reference one
    with parts.using(parts.SOLUTIONS):
        yield


def test_cached_logits_equal_uncached_at_every_step(small, impl):
    tokens = random_prompts(2, 64, seed=5)
    expected = small(tokens)
    for chunks in ([64], [1] * 64, [10, 1, 1, 7, 20, 25], [33, 31]):
        cache = impl.KVCache(small.cfg, 2)
        got, start = [], 0
        for new in chunks:
            got.append(impl.forward_with_cache(small, tokens[:, start : start + new], cache))
            start += new
        assert cache.length == 64
        torch.testing.assert_close(torch.cat(got, dim=1), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("prompt_len", "new"), [(1, 20), (5, 59), (30, 34), (63, 1)])
def test_cached_greedy_tokens_equal_uncached(small, impl, prompt_len, new):
    tokens = random_prompts(3, prompt_len, seed=prompt_len)
    uncached = generate(small, tokens, new, temperature=0)
    cached = impl.generate_with_cache(data.NoUncachedForward(small), tokens, new, temperature=0)
    assert torch.equal(cached, uncached)
    assert cached.shape[1] == prompt_len + new


def test_cached_sampling_equals_uncached_with_the_same_seed(small, impl):
    tokens = random_prompts(2, 4, seed=9)
    settings = {"temperature": 0.8, "top_p": 0.9, "frequency_penalty": 0.3, "seed": 3}
    assert torch.equal(
        impl.generate_with_cache(small, tokens, 20, **settings),
        generate(small, tokens, 20, **settings),
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cached_generation_on_cuda_equals_uncached(small, impl):
    model = copy.deepcopy(small).cuda()
    tokens = random_prompts(3, 5, seed=4).cuda()
    cached = impl.generate_with_cache(model, tokens, 40, temperature=0)
    assert cached.device.type == "cuda"
    assert torch.equal(cached, generate(model, tokens, 40, temperature=0))
    settings = {"temperature": 0.8, "top_k": 50, "seed": 3}
    assert torch.equal(
        impl.generate_with_cache(model, tokens, 20, **settings),
        generate(model, tokens, 20, **settings),
    )


def test_cached_greedy_on_gpt2_small_equals_uncached(impl):
    model = data.gpt2_course_model()
    tokens = torch.tensor([[464, 1049, 2068, 7586]])
    assert torch.equal(
        impl.generate_with_cache(model, tokens, 6, temperature=0),
        generate(model, tokens, 6, temperature=0),
    )


def test_every_way_past_n_ctx_is_a_clear_error(small, impl):
    with pytest.raises(ValueError, match="n_ctx=64"):
        impl.generate_with_cache(small, random_prompts(1, 60, seed=1), 5)
    cache = impl.KVCache(small.cfg, 1)
    impl.forward_with_cache(small, random_prompts(1, 64, seed=1), cache)
    with pytest.raises(ValueError, match="n_ctx=64"):
        impl.forward_with_cache(small, random_prompts(1, 1, seed=2), cache)
    tiny = impl.KVCache(TransformerConfig(n_layers=1, n_heads=1, d_head=2, n_ctx=4), 1)
    tiny.update(0, torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2))
    with pytest.raises(ValueError, match="n_ctx=4"):
        tiny.update(0, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))


def test_on_token_sees_each_new_token_as_it_comes(small, impl):
    seen = []
    out = impl.generate_with_cache(
        small, random_prompts(2, 3, seed=4), 7, temperature=0, on_token=seen.append
    )
    assert len(seen) == 7 and all(t.shape == (2,) for t in seen)
    assert torch.equal(torch.stack(seen, dim=1), out[:, 3:])


def test_eos_and_early_stop_match_uncached(small, impl):
    tokens = random_prompts(2, 5, seed=6)
    free = generate(small, tokens, 12, temperature=0)
    eos = free[0, 8].item()
    assert torch.equal(
        impl.generate_with_cache(small, tokens, 12, temperature=0, eos_token_id=eos),
        generate(small, tokens, 12, temperature=0, eos_token_id=eos),
    )
    one = tokens[:1]
    assert torch.equal(
        impl.generate_with_cache(small, one, 12, temperature=0, eos_token_id=eos),
        generate(small, one, 12, temperature=0, eos_token_id=eos),
    )


def test_greedy_margins_in_the_checks_are_far_above_float_noise():
    """The generate_with_cache check compares exact tokens: no near-tie may decide them."""
    model = data.seeded_model()
    for case in data.generate_cached_cases():
        _, prompt, _, settings, _ = case.args
        if not case.seeded or not isinstance(case.expected, torch.Tensor) or len(settings) > 1:
            continue  # sampled, penalised or an error
        if case.expected.shape[1] == prompt.shape[1]:
            continue  # nothing generated
        with torch.no_grad():
            logits = model(case.expected[:, :-1])[:, prompt.shape[1] - 1 :]
        top2 = logits.topk(2, dim=-1).values
        assert (top2[..., 0] - top2[..., 1]).min() > 1e-3, case.name


def test_the_planted_cache_decides_the_answer():
    """The forward check's made-up cache must change the logits: code that ignores it fails."""
    case = next(c for c in data.forward_cases() if c.args[3] is not None)
    model, tokens, chunks, _ = case.args
    fresh = data.hf_cached_run(tokens, chunks, None)["logits"]
    assert (fresh - case.expected["logits"]).abs().max() > 1.0


def test_cached_generation_follows_every_rule_of_generate(small, impl):
    both = random_prompts(2, 5, seed=881)  # greedy rows reach token 64 at steps 3 and 7
    seen = []
    cached = impl.generate_with_cache(
        small, both, 12, temperature=0, eos_token_id=64, on_token=seen.append
    )
    uncached = generate(small, both, 12, temperature=0, eos_token_id=64)
    assert torch.equal(cached, uncached) and cached.shape[1] == 5 + 8  # every row finished
    assert torch.equal(torch.stack(seen, dim=1), cached[:, 5:])  # eos streamed for row 0
    assert cached.dtype == torch.long
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        cached = impl.generate_with_cache(small, both, 10)  # no seed: the global generator
        torch.manual_seed(7)
        assert torch.equal(cached, generate(small, both, 10))
    assert torch.equal(impl.generate_with_cache(small, both, 0), both)
    full = random_prompts(1, 64, seed=3)
    assert torch.equal(impl.generate_with_cache(small, full, 0), full)
    with pytest.raises(ValueError, match="max_new_tokens"):
        impl.generate_with_cache(small, both, -1)


def test_cached_generation_runs_each_position_once(small, impl):
    """The prompt once, then one new position per step, and none after the last token."""
    records = [[] for _ in small.blocks]
    model = data.recorded_model(data.NoUncachedForward(small), records)
    impl.generate_with_cache(model, random_prompts(2, 7, seed=1), 5, temperature=0)
    assert records == [[7, 1, 1, 1, 1]] * len(small.blocks)


# ------------------------------------------------------------------ gpt2-course generate


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from gpt2_course.trainer import save_checkpoint
    from solutions.transformer import Transformer

    cfg = TransformerConfig(d_model=32, n_heads=2, d_head=16, d_mlp=64, n_layers=1, n_ctx=32)
    with parts.using(parts.SOLUTIONS), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Transformer(cfg)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", model, None, {"step": 7})


class Recorder(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return super().write(text)


def run_cli(*argv):
    from gpt2_course.cli import build_parser

    args = build_parser().parse_args(["generate", *argv])
    out, err = Recorder(), io.StringIO()
    text = generation.generate_text(args, out, err)
    return text, out, err.getvalue()


def test_cli_streams_tokens_from_a_checkpoint(tiny_checkpoint):
    text, out, err = run_cli(
        "Hello there",
        "--checkpoint",
        str(tiny_checkpoint),
        "-n",
        "6",
        "--seed",
        "1",
        "--ignore-eos",
    )
    assert out.getvalue().startswith("Hello there") and out.getvalue().endswith("\n")
    assert out.getvalue() == "Hello there" + text + "\n"
    assert len(out.writes) >= 3  # the prompt, then pieces as tokens came, then the newline
    assert "step 7" in err
    again, _, _ = run_cli(
        "Hello there",
        "--checkpoint",
        str(tiny_checkpoint),
        "-n",
        "6",
        "--seed",
        "1",
        "--ignore-eos",
    )
    assert again == text


def test_cli_beam_search_and_errors(tiny_checkpoint, capsys):
    text, out, _ = run_cli("Hi", "--checkpoint", str(tiny_checkpoint), "-n", "3", "--beams", "2")
    assert out.getvalue() == "Hi" + text + "\n"
    assert generation.main(["Hi", "--checkpoint", str(tiny_checkpoint), "-n", "40"]) == 2
    assert "n_ctx=32" in capsys.readouterr().err
    assert generation.main(["Hi", "--checkpoint", str(tiny_checkpoint) + "-missing"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generation.main(["Hi", "--top-p", "1.5"])


def test_cli_pretrained_offline_falls_back_to_random_weights_and_says_so():
    text, out, err = run_cli("The", "--pretrained", "-n", "2", "--temperature", "0")
    assert "not available" in err and "random weights" in err
    assert out.getvalue().startswith("The")
