"""The benchmarks run (tiny sizes), refuse to compare models that disagree, and refuse bad
options with a clear message."""

import math
import re

import pytest
import torch

from benchmarks import scale_training, training_step
from gpt2_course import trainer

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


# ------------------------------------------------------------------ scale_training.py

QUICK_SCALE = ["--quick", "--clock", "cpu", "--repeats", "1", "--warmup", "0"]


def test_scale_training_benchmark_runs_and_reports_the_ratio(monkeypatch, capsys):
    monkeypatch.delenv("GPT2_COURSE_PEAK_FLOPS", raising=False)
    result = scale_training.main(QUICK_SCALE)
    assert set(result) == {"scale_training_vs_hf"}  # no MFU, no loss curve on the CPU
    assert math.isfinite(result["scale_training_vs_hf"]) and result["scale_training_vs_hf"] > 0
    out = capsys.readouterr().out
    assert "first-batch loss in fp32" in out and "course / Hugging Face" in out


def test_scale_training_reports_mfu_where_the_peak_is_known(monkeypatch, capsys):
    from gpt2_course.throughput import flops_per_token

    monkeypatch.setenv("GPT2_COURSE_PEAK_FLOPS", "1e9")  # a made-up peak, on the CPU
    result = scale_training.main(QUICK_SCALE)
    assert result["mfu_course"] / result["mfu_hf"] == pytest.approx(result["scale_training_vs_hf"])
    out = capsys.readouterr().out
    course_rate = float(re.search(r"course +([\d,]+) tokens/s", out)[1].replace(",", ""))
    flops = course_rate * flops_per_token(trainer.model_config("tiny"), seq_len=32)
    assert result["mfu_course"] == pytest.approx(flops / 1e9, rel=1e-2)  # the rate is rounded
    assert "MFU (peak 0.001 TFLOP/s)" in out


def test_scale_training_hf_twin_holds_the_course_weights_and_optimizer_groups():
    from solutions.training import configure_optimizer

    cfg = trainer.model_config("tiny")
    args = scale_training.parse_arguments(["--quick"])
    course = scale_training.course_model(cfg, 0, scale_training.train_config(args, cfg))
    hf = scale_training.hf_twin(course)
    tokens = torch.randint(0, cfg.d_vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    ours, theirs = scale_training.first_losses(course, hf, tokens)
    assert abs(ours - theirs) < 1e-5
    assert hf.lm_head.weight is hf.transformer.wte.weight  # tied, as GPT-2's

    def sizes(optimizer):
        return [sum(p.numel() for p in group["params"]) for group in optimizer.param_groups]

    course_groups = sizes(configure_optimizer(course, 1e-3, 0.1))
    hf_groups = sizes(scale_training.hf_optimizer(hf, 1e-3, 0.1))
    assert hf_groups[0] == course_groups[0]  # the same weights decay
    # the course's b_U stays zero and untrained (GPT-2 has none): the same trainable weights
    assert hf_groups == course_groups
    assert not course.unembed.b_U.requires_grad and not course.unembed.b_U.any()


def test_scale_training_benchmark_refuses_models_that_disagree(monkeypatch):
    real = scale_training.hf_twin

    def broken(course):
        hf = real(course)
        with torch.no_grad():
            hf.transformer.h[0].mlp.c_fc.weight.mul_(3.0)  # no longer the course's weights
        return hf

    monkeypatch.setattr(scale_training, "hf_twin", broken)
    with pytest.raises(SystemExit, match="disagree"):
        scale_training.main(QUICK_SCALE)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--device", "cuda"], "sees no CUDA GPU"),
        (["--device", "mps"], "use cpu or cuda"),
        (["--batch", "4", "--micro-batch", "3"], "must divide"),
        (["--model", "tiny", "--seq", "65"], "longer than the tiny model's n_ctx=64"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--warmup", "-1"], "cannot be negative"),
    ],
)
def test_scale_training_refuses_bad_options_clearly(monkeypatch, capsys, flags, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU machine too
    with pytest.raises(SystemExit) as stop:
        scale_training.main(flags)
    assert stop.value.code == 2  # argparse's usage error, not a stack trace
    assert message in capsys.readouterr().err


def test_scale_training_loss_curve_falls(capsys):
    result = scale_training.main(QUICK_SCALE + ["--batch", "4", "--loss-curve", "30"])
    assert result["loss_first"] > 10  # about ln(50257) at the start
    assert result["loss_last"] < 8  # the windows use 512 token ids: ln(512) = 6.2
    assert "loss curve" in capsys.readouterr().out
