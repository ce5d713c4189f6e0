"""What a learner sees when their code goes wrong in ways no mistake library lists.

The wrong implementations here are written independently of the checks' own
libraries: crashes, NaNs, wrong dtypes and shapes, in-place edits, renamed
parameters, broken files.
"""

import textwrap

import pytest
import torch
from torch import nn

from gpt2_course.checks import get_check, judge_implementation, run_check
from gpt2_course.checks.core import compare, describe_exception
from gpt2_course.grading import load_submission_package
from solutions.layernorm import LayerNorm

LN = get_check("layernorm.LayerNorm")


def feedback_of(implementation) -> str:
    verdict = judge_implementation(LN, implementation)
    assert not verdict.passed
    return verdict.feedback


class Crashes(LayerNorm):
    def forward(self, x):
        return x / x.std(dim=-1, keepdims=True, correction=0, nonsense=1)


class ProducesNaN(LayerNorm):
    def forward(self, x):
        out = super().forward(x)
        out[..., 3] = float("nan")
        return out


class Float64(LayerNorm):
    def forward(self, x):
        return super().forward(x.double())


class KeepsOnlyFirstRow(LayerNorm):
    def forward(self, x):
        return super().forward(x)[:, :1]


class InPlace(LayerNorm):
    def forward(self, x):
        x -= x.mean(-1, keepdim=True)
        x /= (x.pow(2).mean(-1, keepdim=True) + self.cfg.layer_norm_eps).sqrt()
        return x * self.w + self.b


class RenamedParameters(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(cfg.d_model))
        self.bias = nn.Parameter(torch.zeros(cfg.d_model))

    def forward(self, x):
        return x


class ReturnsNothing(LayerNorm):
    def forward(self, x):
        super().forward(x)


class Identity(LayerNorm):
    def forward(self, x):
        return x.clone()


def test_exception_names_the_error_and_the_line():
    text = feedback_of(Crashes)
    assert "your code raised an error" in text
    assert "TypeError" in text
    assert "test_check_feedback.py, line" in text
    assert "nonsense=1" in text


def test_nan_is_reported_with_its_place():
    text = feedback_of(ProducesNaN)
    assert "NaN" in text and "[0, 0, 3]" in text


def test_wrong_dtype():
    assert "dtype torch.float64, expected torch.float32" in feedback_of(Float64)


def test_wrong_shape():
    assert "shape [1, 1, 768], expected [1, 40, 768]" in feedback_of(KeepsOnlyFirstRow)


def test_in_place_change_of_the_input():
    assert "changed its input in place" in feedback_of(InPlace)


def test_renamed_parameters():
    text = feedback_of(RenamedParameters)
    assert "has no parameter named `w`" in text and "weight, bias" in text


def test_returning_none():
    assert "returned NoneType, expected a tensor" in feedback_of(ReturnsNothing)


def test_values_report_largest_error_where_and_how_many():
    text = feedback_of(Identity)
    assert "largest error" in text and "yours" in text and "expected" in text
    assert "% of values are outside atol=0.0001, rtol=0.001" in text


def test_compare_allows_matching_infinities():
    masked = torch.tensor([0.5, float("-inf")])
    assert compare(masked.clone(), masked) is None
    assert "finite at [1]" in compare(torch.tensor([0.5, -1e9]), masked)


def test_broken_files_in_a_submission(tmp_path):
    (tmp_path / "layernorm.py").write_text("def broken(:\n")
    (tmp_path / "embeddings.py").write_text(
        textwrap.dedent(
            """
            import torch
            raise RuntimeError("half-finished edit")
            """
        )
    )
    package = load_submission_package(tmp_path)
    syntax = run_check("layernorm.LayerNorm", package)
    assert not syntax.passed and "syntax error on line 1" in syntax.feedback
    crash = run_check("embeddings.Embedding", package)
    assert not crash.passed and "half-finished edit" in crash.feedback


def test_missing_name_in_a_submission(tmp_path):
    (tmp_path / "layernorm.py").write_text("class LayerNormalisation:\n    pass\n")
    result = run_check("layernorm.LayerNorm", load_submission_package(tmp_path))
    assert "defines no `LayerNorm`" in result.feedback


def test_missing_file_in_a_submission(tmp_path):
    (tmp_path / "embeddings.py").write_text("")
    result = run_check("layernorm.LayerNorm", load_submission_package(tmp_path))
    assert "layernorm.py is missing" in result.feedback


def test_top_p_at_p_one_is_named_in_the_feedback():
    """Dropping the tail once a float32 total reaches 1.0 is caught on the peaked p=1 case,
    on every CPU (the total reaches exactly 1.0 there by construction), and the case says so."""

    def drops_tail_at_one(logits, p):
        probs = logits.softmax(dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= p
        drop[..., 0] = False
        return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))

    verdict = judge_implementation(get_check("sampling.apply_top_p"), drops_tail_at_one)
    assert not verdict.passed
    assert "case 'p=1 on peaked rows at GPT-2's vocabulary size" in verdict.feedback
    assert "p_one_rounding" in verdict.mistakes


def test_an_error_inside_a_lent_solution_part_points_at_the_learners_line(tmp_path):
    learner = tmp_path / "my_block.py"
    learner.write_text(
        textwrap.dedent(
            """\
            import torch
            from solutions.layernorm import LayerNorm

            def forward(cfg):
                return LayerNorm(cfg)(torch.zeros(2, 3, 5))  # wrong width
            """
        )
    )
    namespace: dict = {}
    exec(compile(learner.read_text(), str(learner), "exec"), namespace)
    from gpt2_course.config import TransformerConfig

    with pytest.raises(Exception) as caught:
        namespace["forward"](TransformerConfig(d_model=8, n_heads=2, d_head=4, d_mlp=16))
    where = describe_exception(caught.value)
    assert "my_block.py, line 5" in where
    assert "solutions/" not in where and "inside the reference solution" in where
