"""HellaSwag: reading rows (both label types, every malformed kind), rendering, and scoring
checked twice: against counts worked out by hand for a model whose probabilities are known,
and against a slow one-ending-at-a-time computation with the course's Transformer."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpt2_course import hellaswag
from gpt2_course.config import TransformerConfig
from gpt2_course.hellaswag import (
    Example,
    HellaSwagError,
    accuracy,
    load_hellaswag,
    load_jsonl,
    log_likelihoods,
    parse,
    render,
    score_examples,
)
from gpt2_course.tokenizer import get_tokenizer

SAMPLE = Path(__file__).parent / "data" / "hellaswag_sample.jsonl"
FIELDS = {
    "ind",
    "activity_label",
    "ctx_a",
    "ctx_b",
    "ctx",
    "endings",
    "label",
    "source_id",
    "split",
    "split_type",
}


def encode(text: str) -> list[int]:
    return get_tokenizer().encode(text, add_special_tokens=False)


def sample_rows() -> list[dict]:
    return [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]


def good_row(**changes) -> dict:
    row = dict(sample_rows()[0])
    row.update(changes)
    return row


# ------------------------------------------------------------------ reading


def test_the_sample_is_in_the_original_format():
    rows = sample_rows()
    assert len(rows) == 10
    for row in rows:
        assert set(row) == FIELDS
        assert type(row["label"]) is int and len(row["endings"]) == 4
        # the data set's README: ctx is ctx_a, then a space and ctx_b when ctx_b is not empty
        assert row["ctx"] == (f"{row['ctx_a']} {row['ctx_b']}" if row["ctx_b"] else row["ctx_a"])
    assert {row["source_id"].split("~")[0] for row in rows} == {"activitynet", "wikihow"}


def test_load_jsonl_reads_every_row():
    examples = load_jsonl(SAMPLE)
    rows = sample_rows()
    assert len(examples) == len(rows)
    for example, row in zip(examples, rows, strict=True):
        assert example == Example(ctx=row["ctx"], endings=row["endings"], label=row["label"])
    assert [ex.label for ex in examples] == [2, 0, 3, 1, 0, 2, 1, 3, 0, 2]


def test_labels_from_the_jsonl_and_from_the_hub_are_the_same():
    for label in range(4):
        assert parse(good_row(label=label)).label == label  # the original jsonl: an int
        assert parse(good_row(label=str(label))).label == label  # the Hub: a string


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"ctx": None}, "ctx must be non-empty text"),
        ({"ctx": "  "}, "ctx must be non-empty text"),
        ({"endings": ["a", "b", "c"]}, "exactly 4 strings, got 3 endings"),
        ({"endings": ["a", "b", "c", "d", "e"]}, "exactly 4 strings, got 5 endings"),
        ({"endings": "abcd"}, "exactly 4 strings, got 'abcd'"),
        ({"endings": ["a", "b", 3, "d"]}, "ending 2 must be non-empty text"),
        ({"endings": ["a", "", "c", "d"]}, "ending 1 must be non-empty text"),
        ({"label": 4}, "label 4 is out of range"),
        ({"label": -1}, "label -1 is out of range"),
        ({"label": "7"}, "label '7' is out of range"),
        ({"label": "two"}, "label must be an int or a digit string 0..3, got 'two'"),
        ({"label": 1.0}, "label must be an int or a digit string 0..3, got 1.0"),
        ({"label": True}, "label must be an int or a digit string 0..3, got True"),
        ({"label": ""}, "the row has no label (HellaSwag's test split is unlabeled)"),
    ],
)
def test_a_malformed_row_says_what_is_wrong(changes, message):
    with pytest.raises(HellaSwagError) as caught:
        parse(good_row(**changes))
    assert message in str(caught.value)


@pytest.mark.parametrize("field", ["ctx", "endings", "label"])
def test_a_missing_field_is_named(field):
    row = good_row()
    del row[field]
    with pytest.raises(HellaSwagError, match=f"the row has no {field} field"):
        parse(row)


def test_a_row_that_is_not_an_object_is_refused():
    with pytest.raises(HellaSwagError, match="a HellaSwag row is a JSON object, got list"):
        parse([1, 2, 3])


def test_a_bad_line_in_a_file_is_reported_with_its_number(tmp_path):
    lines = SAMPLE.read_text().splitlines()
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join([lines[0], "", lines[1], json.dumps(good_row(label=9))]) + "\n")
    with pytest.raises(HellaSwagError, match=r"broken.jsonl, line 4: label 9 is out of range"):
        load_jsonl(broken)
    broken.write_text(lines[0] + "\n{not json\n")
    with pytest.raises(HellaSwagError, match=r"broken.jsonl, line 2: not JSON"):
        load_jsonl(broken)
    with pytest.raises(HellaSwagError, match="no HellaSwag file at"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_load_hellaswag_is_none_offline(monkeypatch):
    import datasets

    calls = []  # load_hellaswag swallows download errors, so record the calls instead
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or [])
    assert load_hellaswag() is None
    assert load_hellaswag("train", limit=5) is None
    assert calls == [], "load_hellaswag went to the Hub although offline mode is on"
    with pytest.raises(HellaSwagError, match="the test split has no labels"):
        load_hellaswag("test")


def test_load_hellaswag_reads_the_hub_rows(monkeypatch):
    import datasets

    from gpt2_course import reference

    hub_rows = [{**row, "label": str(row["label"])} for row in sample_rows()]  # the Hub's labels
    asked = {}

    def fake_load_dataset(name, split, **kwargs):
        asked.update(name=name, split=split)
        return hub_rows

    monkeypatch.setattr(reference, "hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples = load_hellaswag(limit=3)
    assert asked == {"name": "Rowan/hellaswag", "split": "validation"}
    assert examples == load_jsonl(SAMPLE)[:3]
    assert len(load_hellaswag()) == 10

    def down(*args, **kwargs):
        raise ConnectionError("the Hub went away")

    monkeypatch.setattr(datasets, "load_dataset", down)
    assert load_hellaswag() is None


# ------------------------------------------------------------------ rendering


def test_render_marks_exactly_the_ending_tokens():
    tokenizer = get_tokenizer()
    for example in load_jsonl(SAMPLE):
        tokens, mask = render(example)
        context = encode(example.ctx)
        lengths = [len(context) + len(encode(" " + e)) for e in example.endings]
        assert tokens.shape == mask.shape == (4, max(lengths))
        assert tokens.dtype == torch.long and mask.dtype == torch.bool
        for i, ending in enumerate(example.endings):
            ending_ids = encode(" " + ending)
            assert tokens[i, : len(context)].tolist() == context
            assert tokens[i, len(context) : lengths[i]].tolist() == ending_ids
            assert mask[i].nonzero().flatten().tolist() == list(range(len(context), lengths[i]))
            decoded = tokenizer.decode(tokens[i][mask[i]], clean_up_tokenization_spaces=False)
            assert decoded == " " + ending


# ------------------------------------------------------------------ scoring, by hand


class KnownProbabilities(nn.Module):
    """A stand-in model whose every prediction is the same known distribution: the tokens in
    `favoured` share the probability equally (ln p = -ln k for k of them), every other token
    gets a logit 1000 lower (ln p = -1000 - ln k: such an ending never wins)."""

    def __init__(self, favoured: list[int], n_ctx: int = 64):
        super().__init__()
        self.cfg = TransformerConfig(n_ctx=n_ctx)
        self.logits = torch.full((self.cfg.d_vocab,), -1000.0)
        self.logits[favoured] = 0.0
        self.seen = []  # (training, grad enabled) at each call

    def forward(self, tokens):
        self.seen.append((self.training, torch.is_grad_enabled()))
        return self.logits.expand(*tokens.shape, -1)


WORDS = [" ran", " away", " from", " the", " dog", " sat", " down", " on", " mat"]

# Each ending made of favoured words costs ln k per token. "ran" (1 token, 3 characters)
# beats "ran away from the dog" (5 tokens, 21 characters) on the sum (-ln k > -5 ln k),
# but loses per character (-ln k / 3 < -5 ln k / 21). The endings with other words lose
# both ways.
HAND_MADE = [
    # acc picks 0, acc_norm picks 1; the right answer is 1: acc wrong, acc_norm right
    Example("The cat saw the dog and it", ["ran", "ran away from the dog", "sang", "ate"], 1),
    # acc picks 0, acc_norm picks 1; the right answer is 0: acc right, acc_norm wrong
    Example("The dog was tired so it", ["sat", "sat down on the mat", "ate soup", "sang"], 0),
    # acc picks 2, acc_norm picks 3; the right answer is 3: acc wrong, acc_norm right
    Example("The old dog", ["ate soup", "sang opera", "sat", "sat down on the mat"], 3),
    # only one ending is made of favoured words: both pick it, both right
    Example("Then the dog", ["ate soup", "sang opera", "danced", "ran away"], 3),
]


def test_the_hand_made_examples_cost_what_the_comments_say():
    favoured = {encode(word)[0] for word in WORDS}
    assert all(len(encode(word)) == 1 for word in WORDS)
    assert len(encode(" ran away from the dog")) == 5 and len(encode(" sat down on the mat")) == 5
    for word in [" sang", " ate", " soup", " opera", " danced"]:
        assert not set(encode(word)) & favoured


def test_acc_and_acc_norm_counted_by_hand():
    model = KnownProbabilities([encode(word)[0] for word in WORDS])
    per_example = [score_examples(model, [example]) for example in HAND_MADE]
    assert [(c["correct"], c["correct_norm"]) for c in per_example] == [
        (0, 1),
        (1, 0),
        (0, 1),
        (1, 1),
    ]
    assert score_examples(model, HAND_MADE) == {"n": 4, "correct": 2, "correct_norm": 3}
    assert accuracy({"n": 4, "correct": 2, "correct_norm": 3}) == {
        "hellaswag_acc": 0.5,
        "hellaswag_acc_norm": 0.75,
    }


def test_log_likelihoods_are_the_known_ones():
    k = len(WORDS)
    model = KnownProbabilities([encode(word)[0] for word in WORDS])
    scores = log_likelihoods(model, HAND_MADE[:1], batch_examples=1)
    # "ran": 1 token; "ran away from the dog": 5; "sang", "ate": 1 unfavoured token each
    ln_k = math.log(k)
    expected = torch.tensor([[-ln_k, -5 * ln_k, -1000 - ln_k, -1000 - ln_k]])
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-3)


def test_scoring_runs_in_eval_mode_without_gradients_and_restores_the_mode():
    model = KnownProbabilities([encode(word)[0] for word in WORDS])
    model.train()
    score_examples(model, HAND_MADE, batch_examples=3)
    assert model.seen == [(False, False), (False, False)]  # two batches: 3 examples, then 1
    assert model.training
    model.eval()
    score_examples(model, HAND_MADE)
    assert not model.training


def test_counts_over_ranks_sum_to_the_single_process_counts():
    examples = load_jsonl(SAMPLE) + HAND_MADE
    model = KnownProbabilities([encode(word)[0] for word in WORDS + [" the", " a", " and"]])
    whole = score_examples(model, examples, batch_examples=4)
    parts = [score_examples(model, examples, rank=r, world=2, batch_examples=4) for r in (0, 1)]
    assert [p["n"] for p in parts] == [7, 7]
    assert {key: parts[0][key] + parts[1][key] for key in whole} == whole
    # rank r takes every world-th example from the r-th: by hand, examples 0 and 2 (acc
    # wrong, acc_norm right) go to rank 0, examples 1 and 3 to rank 1
    model = KnownProbabilities([encode(word)[0] for word in WORDS])
    assert score_examples(model, HAND_MADE, rank=0, world=2) == {
        "n": 2,
        "correct": 0,
        "correct_norm": 2,
    }
    assert score_examples(model, HAND_MADE, rank=1, world=2) == {
        "n": 2,
        "correct": 2,
        "correct_norm": 1,
    }
    for rank, world in [(2, 2), (-1, 2), (0, 0)]:
        with pytest.raises(HellaSwagError, match="rank must be in 0..world-1"):
            score_examples(model, examples, rank=rank, world=world)


def test_bad_models_and_requests_are_refused_clearly():
    favoured = [encode(word)[0] for word in WORDS]
    with pytest.raises(HellaSwagError, match=r"does not fit the model's context \(n_ctx=5\)"):
        score_examples(KnownProbabilities(favoured, n_ctx=5), HAND_MADE)

    small_vocab = KnownProbabilities(favoured)
    small_vocab.cfg = TransformerConfig(d_vocab=1000)
    with pytest.raises(HellaSwagError, match=r"d_vocab=1000\) is smaller than GPT-2's tokenizer"):
        score_examples(small_vocab, HAND_MADE)

    class WrongShape(KnownProbabilities):
        def forward(self, tokens):
            return super().forward(tokens)[:, -1]  # only the last position's logits

    with pytest.raises(HellaSwagError, match=r"expected logits \[16, \d+, 50257\]"):
        score_examples(WrongShape(favoured), HAND_MADE)
    with pytest.raises(HellaSwagError, match="needs a cfg with n_ctx and d_vocab"):
        score_examples(nn.Identity(), HAND_MADE)
    with pytest.raises(HellaSwagError, match="batch_examples must be at least 1"):
        score_examples(KnownProbabilities(favoured), HAND_MADE, batch_examples=0)
    with pytest.raises(HellaSwagError, match="no HellaSwag example was scored"):
        accuracy(score_examples(KnownProbabilities(favoured), []))


# ------------------------------------------------------------------ scoring, the real model


def slow_log_likelihood(model, context: str, ending: str) -> float:
    """ln p(ending | context), one ending at a time, token after token."""
    ids = encode(context) + encode(" " + ending)
    n_ending = len(encode(" " + ending))
    ids = ids[-model.cfg.n_ctx :]
    with torch.no_grad():
        log_probs = F.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)
    first = len(ids) - n_ending
    return sum(log_probs[t - 1, ids[t]].item() for t in range(first, len(ids)))


def test_the_course_transformer_scores_as_a_slow_direct_computation():
    from gpt2_course.reference_parts.transformer import Transformer

    cfg = TransformerConfig(
        d_model=32, n_layers=2, n_heads=2, d_head=16, d_mlp=64, n_ctx=64, init_range=0.5
    )
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    examples = load_jsonl(SAMPLE)
    # the WikiHow rows are longer than n_ctx: their contexts are cut from the left
    assert any(len(encode(f"{ex.ctx} {e}")) > cfg.n_ctx for ex in examples for e in ex.endings)

    slow = torch.tensor(
        [[slow_log_likelihood(model, ex.ctx, e) for e in ex.endings] for ex in examples]
    )
    for batch_examples in (1, 3, 10):
        fast = log_likelihoods(model, examples, batch_examples=batch_examples)
        torch.testing.assert_close(fast, slow.float(), rtol=1e-5, atol=1e-3)

    labels = torch.tensor([ex.label for ex in examples])
    characters = torch.tensor([[len(e) for e in ex.endings] for ex in examples])
    expected = {
        "n": len(examples),
        "correct": int((slow.argmax(-1) == labels).sum()),
        "correct_norm": int(((slow / characters).argmax(-1) == labels).sum()),
    }
    assert score_examples(model, examples, batch_examples=4) == expected
    assert hellaswag.accuracy(expected)["hellaswag_acc"] == expected["correct"] / 10
