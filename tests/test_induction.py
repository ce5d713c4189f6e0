"""The induction experiment (notebook 09): its data, its scores, a short run, its plots."""

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest
import torch

from gpt2_course import induction, parts
from gpt2_course.config import TransformerConfig
from gpt2_course.induction import (
    biggest_drop_step,
    head_scores,
    induction_config,
    induction_data,
    induction_formed,
    induction_windows,
    plot_half_losses,
    plot_head_scores,
    repeated_tokens,
    train_induction,
)
from gpt2_course.trainer import TrainResult

SMALL = TransformerConfig(
    d_model=16, n_heads=2, d_head=8, d_mlp=32, n_layers=2, n_ctx=16, d_vocab=32
)


@pytest.fixture
def solutions():
    with parts.using(parts.SOLUTIONS):
        yield


def _block(row: torch.Tensor) -> tuple[int, int] | None:
    """The (length, start) of a block written twice in a row, longest first."""
    n = len(row)
    for length in range(n // 2, 1, -1):
        for start in range(n - 2 * length + 1):
            if torch.equal(row[start : start + length], row[start + length : start + 2 * length]):
                return length, start
    return None


def test_induction_windows_hold_a_block_written_twice():
    tokens = induction_windows(300, 32, 64, seed=0, lengths=(8, 16))
    assert tokens.shape == (300, 32) and tokens.dtype == torch.long
    assert 0 <= tokens.min() and tokens.max() < 64
    found = [_block(row) for row in tokens]
    assert all(f is not None for f in found), "every window repeats a block"
    lengths, starts = {f[0] for f in found}, {f[1] for f in found}
    # lengths and places vary, so no fixed positional offset predicts the repeats
    assert lengths == set(range(8, 17))
    assert len(starts) > 10


def test_induction_windows_filler_follows_the_local_rule():
    """Outside the block, token t is shuffle[token t-1] LOCAL_RULE of the time; inside the
    block's first copy only by chance (1 / d_vocab)."""
    d_vocab = 64
    tokens = induction_windows(2000, 40, d_vocab, seed=1, lengths=(6, 12))
    shuffle = torch.randperm(d_vocab, generator=torch.Generator().manual_seed(induction.RULE_SEED))
    in_block = torch.zeros_like(tokens, dtype=torch.bool)
    for i, row in enumerate(tokens):
        length, start = _block(row)
        in_block[i, start : start + 2 * length] = True
    follows = tokens[:, 1:] == shuffle[tokens[:, :-1]]
    filler = ~in_block[:, 1:] & ~in_block[:, :-1]
    block = in_block[:, 1:] & in_block[:, :-1]
    rate_filler = follows[filler].float().mean().item()
    rate_block = follows[block].float().mean().item()
    assert induction.LOCAL_RULE < rate_filler < induction.LOCAL_RULE + 0.03  # plus chance
    assert rate_block < 0.05
    # two places back, the rule says nothing (the shuffle of a shuffle is another map)
    two_back = tokens[:, 2:] == shuffle[tokens[:, :-2]]
    assert two_back[~in_block[:, 2:] & ~in_block[:, :-2]].float().mean() < 0.05


def test_induction_windows_are_seeded():
    a = induction_windows(8, 32, 50, seed=3)
    assert torch.equal(a, induction_windows(8, 32, 50, seed=3))
    assert not torch.equal(a, induction_windows(8, 32, 50, seed=4))
    with pytest.raises(ValueError, match="do not fit n_ctx=6"):
        induction_windows(2, 6, 50, seed=0, lengths=(2, 4))


def test_repeated_tokens_is_a_block_written_twice():
    tokens = repeated_tokens(5, 7, 100, seed=1)
    assert tokens.shape == (5, 14)
    assert torch.equal(tokens[:, :7], tokens[:, 7:])
    assert torch.equal(tokens, repeated_tokens(5, 7, 100, seed=1))
    with_bos = repeated_tokens(5, 7, 100, seed=1, bos=100)
    assert with_bos.shape == (5, 15)
    assert (with_bos[:, 0] == 100).all() and torch.equal(with_bos[:, 1:], tokens)


def test_induction_data_is_a_pool_of_training_windows(monkeypatch):
    config = induction_config(steps=10, batch_size=4, model=SMALL)
    data = induction_data(config)
    assert data.train.shape == (40, 16) and data.seq_len == 16
    assert all(_block(row) for row in data.train)
    assert not torch.equal(data.train[: len(data.val)], data.val[: len(data.train)])
    assert "written twice" in data.summary()
    monkeypatch.setattr(induction, "MAX_POOL", 25)  # a long run holds a capped pool
    assert len(induction_data(config).train) == 25


def test_configs_full_and_quick(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("GPT2_COURSE_QUICK", raising=False)
    full = induction_config()
    assert full.model == induction.INDUCTION_MODEL
    assert (full.steps, full.batch_size, full.max_lr) == (5000, 16, 3e-3)
    assert full.model.init_range == 0.125  # see INDUCTION_MODEL
    assert not full.save and full.sample_interval == 0
    monkeypatch.setenv("GPT2_COURSE_QUICK", "1")
    quick = induction_config(eval_interval=5)
    assert quick.steps < 100 and quick.eval_interval == 5


class _FixedPattern(torch.nn.Module):
    """An attention module whose pattern is given (the way capture_pattern reads it)."""

    def __init__(self, pattern: torch.Tensor):
        super().__init__()
        self.pattern = pattern

    def apply_causal_mask(self, scores: torch.Tensor) -> torch.Tensor:
        return scores

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.apply_causal_mask(self.pattern.log())
        return x


class _HandBuilt(torch.nn.Module):
    """Two layers: layer 0's heads look at the previous token and at itself; layer 1's
    heads attend to the token after the previous occurrence, and uniformly."""

    def __init__(self, pos: int, half: int, d_vocab: int = 8):
        super().__init__()
        prev = torch.zeros(pos, pos)
        prev[0, 0] = 1.0
        prev[torch.arange(1, pos), torch.arange(pos - 1)] = 1.0
        self_ = torch.eye(pos)
        ind = prev.clone()
        q = torch.arange(pos - half, pos)
        ind[q] = 0.0
        ind[q, q - half + 1] = 1.0
        uniform = torch.ones(pos, pos).tril()
        uniform = uniform / uniform.sum(-1, keepdim=True)
        layers = [torch.stack([prev, self_]), torch.stack([ind, uniform])]
        self.blocks = torch.nn.ModuleList()
        for pattern in layers:
            b = torch.nn.Module()
            b.ln1 = torch.nn.Identity()
            b.attn = _FixedPattern(pattern[None].clamp_min(1e-12))
            b.forward = lambda x: x  # the residual stream passes unchanged
            self.blocks.append(b)
        self.d_vocab = d_vocab
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = torch.zeros(*tokens.shape, 4)
        for b in self.blocks:
            x = b(x)
        return torch.zeros(*tokens.shape, self.d_vocab) * self.scale


def test_head_scores_on_hand_built_patterns():
    half, d_vocab = 5, 8
    tokens = repeated_tokens(1, half, d_vocab, seed=0, bos=0)  # 11 positions, BOS first
    scores = head_scores(_HandBuilt(tokens.shape[1], half, d_vocab), tokens, half)
    assert scores["previous 0.0"] == pytest.approx(1.0)
    assert scores["previous 0.1"] == pytest.approx(0.0, abs=1e-6)
    assert scores["induction 1.0"] == pytest.approx(1.0)
    assert scores["induction 0.0"] == pytest.approx(0.0, abs=1e-6)  # one before: not induction
    queries = torch.arange(tokens.shape[1] - half, tokens.shape[1])
    uniform = (1.0 / (queries + 1)).mean().item()
    assert scores["induction 1.1"] == pytest.approx(uniform, rel=1e-5)
    # all-zero logits: the uniform guess on both copies
    assert scores["first_half_loss"] == pytest.approx(math.log(d_vocab))
    assert scores["repeated_half_loss"] == pytest.approx(math.log(d_vocab))


@pytest.fixture(scope="module")
def short_run() -> TrainResult:
    with parts.using(parts.SOLUTIONS):
        config = induction_config(
            model=SMALL, steps=6, batch_size=8, eval_interval=3, eval_windows=8, warmup_steps=1
        )
        return train_induction(config, progress=False, verbose=False)


def test_a_short_run_records_the_scores(short_run):
    history = short_run.history
    assert [row["step"] for row in history] == [0, 3, 6]
    for row in history:
        assert {"first_half_loss", "repeated_half_loss", "train_loss", "val_loss"} <= set(row)
        for layer in range(2):
            for head in range(2):
                assert 0.0 <= row[f"induction {layer}.{head}"] <= 1.0
                assert 0.0 <= row[f"previous {layer}.{head}"] <= 1.0
    # a model that has barely trained is close to the uniform guess on the probe
    assert history[0]["first_half_loss"] == pytest.approx(math.log(32), abs=0.5)
    assert biggest_drop_step(short_run) in (1, 2, 4, 5)  # the middle of an interval


def test_biggest_drop_step_finds_the_steepest_fall(short_run):
    rows = [
        {"step": s, "repeated_half_loss": v}
        for s, v in [(0, 4.8), (100, 4.7), (200, 3.0), (300, 2.9)]
    ]
    fake = TrainResult(**{**short_run.__dict__, "history": rows})
    assert biggest_drop_step(fake) == 150


def test_induction_formed_needs_an_induction_head(short_run):
    assert not induction_formed(short_run)  # 6 steps: every head near uniform
    final = {**short_run.final, "induction 1.2": 0.8}
    fake = TrainResult(**{**short_run.__dict__, "history": [*short_run.history[:-1], final]})
    assert induction_formed(fake) and induction.best_head(fake) == ("1.2", 0.8)


def test_plots_return_axes(short_run):
    ax = plot_half_losses(short_run)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("steepest drop, step" in label for label in labels)
    assert "any token seen before, ln 5" in labels  # the probe's block: n_ctx=16 // 3
    axes = plot_head_scores(short_run)
    assert len(axes) == 2 and len(axes[0].lines) == 4
    assert axes[0].get_title() == "induction score"
    plt.close("all")


def test_course_cache_is_the_residual_stream():
    from gpt2_course.lens import course_cache
    from gpt2_course.reference_parts.inside import logit_lens
    from gpt2_course.reference_parts.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(SMALL).eval()
    tokens = torch.randint(0, SMALL.d_vocab, (2, 7))
    cache = course_cache(model, tokens)
    assert sorted(cache) == [
        "blocks.0.hook_resid_pre",
        "blocks.1.hook_resid_post",
        "blocks.1.hook_resid_pre",
    ]
    with torch.no_grad():
        embedded = model.embed(tokens) + model.pos_embed(tokens)
        after_0 = model.blocks[0](embedded)
        logits = model(tokens)
    assert torch.equal(cache["blocks.0.hook_resid_pre"], embedded)
    assert torch.equal(cache["blocks.1.hook_resid_pre"], after_0)
    assert torch.allclose(logit_lens(cache, model)[-1], logits, atol=1e-5)
    assert not any(block._forward_hooks or block._forward_pre_hooks for block in model.blocks)
