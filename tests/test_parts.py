"""Which implementation each part comes from, and the one-line switch to the reference."""

import pytest

from gpt2_course import parts


@pytest.fixture(autouse=True)
def _clean_overrides():
    saved = dict(parts._overrides)
    yield
    parts._overrides.clear()
    parts._overrides.update(saved)


def test_learner_code_by_default():
    assert parts.source_of("layernorm.LayerNorm") == parts.EXERCISES
    assert parts.LayerNorm.__module__ == "gpt2_course.exercises.layernorm"


def test_use_solution_swaps_one_component_only(capsys):
    parts.use_solution("LayerNorm")
    assert "reference solution for layernorm.LayerNorm" in capsys.readouterr().out
    assert parts.LayerNorm.__module__ == "solutions.layernorm"
    assert parts.Embedding.__module__ == "gpt2_course.exercises.embeddings"
    assert parts.whose("layernorm.LayerNorm") == "reference solution"
    assert parts.whose("embeddings.Embedding") == "yours"
    assert "reference solution" in parts.table(["layernorm.LayerNorm"])
    parts.use_mine("layernorm.LayerNorm")
    assert parts.LayerNorm.__module__ == "gpt2_course.exercises.layernorm"


def test_environment_switch_uses_solutions_everywhere(monkeypatch):
    monkeypatch.setenv("GPT2_COURSE_SOLUTIONS", "1")
    assert parts.Embedding.__module__ == "solutions.embeddings"


def test_using_changes_the_default_within_a_block():
    with parts.using(parts.SOLUTIONS):
        assert parts.LayerNorm.__module__ == "solutions.layernorm"
    assert parts.LayerNorm.__module__ == "gpt2_course.exercises.layernorm"


def test_unknown_component_is_a_clear_error():
    with pytest.raises(KeyError, match="Unknown component 'LayerNrom'"):
        parts.use_solution("LayerNrom")
    with pytest.raises(AttributeError):
        parts.NoSuchThing  # noqa: B018


def test_solution_model_builds_from_parts():
    from gpt2_course.config import TransformerConfig

    cfg = TransformerConfig(
        d_model=16, d_head=4, n_heads=4, d_mlp=64, n_layers=2, d_vocab=50, n_ctx=8
    )
    with parts.using(parts.SOLUTIONS):
        model = parts.Transformer(cfg)
    assert type(model.blocks[1].ln2).__module__ == "solutions.layernorm"
