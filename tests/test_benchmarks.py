"""The benchmarks run (tiny sizes) and refuse to compare models that disagree."""

import math

import pytest

from benchmarks import training_step

TINY = ["--steps", "1", "--train-steps", "2", "--repeats", "1", "--warmup", "0"]


def test_training_step_benchmark_runs_and_reports_ratios(capsys):
    ratios = training_step.main(TINY)
    assert set(ratios) == {"training_allocator", "training_vs_hf"}
    assert all(math.isfinite(r) and r > 0 for r in ratios.values())
    assert "ours / Hugging Face" in capsys.readouterr().out


def test_training_step_benchmark_refuses_models_that_disagree(monkeypatch):
    real = training_step.build_models

    def broken():
        ours, hf = real(0)
        ours.unembed.b_U.data += 1.0  # ours now predicts differently
        return ours, hf

    monkeypatch.setattr(training_step, "build_models", lambda seed: broken())
    with pytest.raises(SystemExit, match="disagree"):
        training_step.main(TINY)
