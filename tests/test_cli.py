"""`gpt2-course check` and `gpt2-course progress` from a terminal."""

from gpt2_course import cli


def test_check_one_id_on_solutions(capsys):
    assert cli.main(["check", "--solutions", "layernorm.LayerNorm"]) == 0
    out = capsys.readouterr().out
    assert "[PASS] layernorm.LayerNorm" in out
    assert "1 passed, 0 failed" in out


def test_check_stubs_fails_with_todo(capsys):
    assert cli.main(["check", "embeddings.Embedding"]) == 1
    out = capsys.readouterr().out
    assert "[TODO] embeddings.Embedding" in out and "gpt2_course/exercises/embeddings.py" in out


def test_unknown_check_id(capsys):
    assert cli.main(["check", "layernorm.LayerNrom"]) == 2
    assert "No check 'layernorm.LayerNrom'" in capsys.readouterr().err


def test_progress_table(capsys):
    assert cli.main(["progress"]) == 0
    out = capsys.readouterr().out
    assert "layernorm.LayerNorm" in out and "not implemented" in out and "total" in out


def test_grade_needs_a_submission(capsys):
    assert cli.main(["grade"]) == 2  # bad usage
    assert "name at least one submission" in capsys.readouterr().err
