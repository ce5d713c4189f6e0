"""Scaling up: several processes (DDP on gloo), gradient accumulation, bf16, the fused
attention path, torch's kernels for every component and GPT-2's initialisation options give
the run one process makes.

The runs are `gpt2-course train` itself: in this process for one process, and through
torchrun (`--processes 2`, or `python -m torch.distributed.run ... -m gpt2_course.train`)
for several.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2_course import distributed, fast, parts, trainer
from gpt2_course.cli import main
from gpt2_course.trainer import TrainConfig, TrainingError, load_checkpoint

STORY = (
    "The ferry left the harbour at seven, and the gulls followed it past the breakwater. "
    "A boy on the upper deck counted the buoys aloud while his grandmother read the paper. "
    "By noon the island was a grey line, and the captain rang the bell twice. "
) * 4
SIZE = ["--model", "tiny", "--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--n-ctx", "16"]
STEPS = 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ferry")
    (folder / "ferry.txt").write_text(STORY, encoding="utf-8")
    return folder


def flags(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        *SIZE,
        *("--steps", str(STEPS), "--batch-size", "8", "--eval-interval", "3", "--seed", "3"),
        *("--data", str(corpus), "--out", str(out), "--device", "cpu", "--lr", "3e-3"),
        *("--solutions", "--no-progress", "--precision", "fp32", *extra),
    ]


def one_process(corpus: Path, out: Path, *extra: str) -> dict:
    assert main(["train", *flags(corpus, out, *extra)]) == 0
    return json.loads((out / "config.json").read_text())


def torchrun(nproc: int, corpus: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc_per_node={nproc}", "-m", "gpt2_course.train", *flags(corpus, out, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def saved(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())


def assert_same_run(a: dict, b: dict, tol: float = 1e-4) -> None:
    assert a["step"] == b["step"] == STEPS
    assert len(a["losses"]) == len(b["losses"]) == STEPS
    for i, (x, y) in enumerate(zip(a["losses"], b["losses"], strict=True)):
        assert abs(x - y) < tol, f"step {i + 1}: loss {x} vs {y}"
    for row_a, row_b in zip(a["history"], b["history"], strict=True):
        assert abs(row_a["val_loss"] - row_b["val_loss"]) < tol


def load(out: Path) -> torch.nn.Module:
    with parts.using(parts.SOLUTIONS):
        return load_checkpoint(out)[0]


def assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    wa, wb = load(a).state_dict(), load(b).state_dict()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=atol), name


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory) -> Path:
    """The reference run: one process, the whole batch of 8 at once, your train_step."""
    out = tmp_path_factory.mktemp("single") / "run"
    one_process(corpus, out)
    return out


def test_two_processes_make_the_run_of_one(corpus, single, tmp_path, capfd):
    # `gpt2-course train --processes 2` starts torchrun: 2 gloo processes, 4 windows each per step
    out = tmp_path / "ddp"
    assert main(["train", *flags(corpus, out), "--processes", "2"]) == 0
    printed = capfd.readouterr().out
    assert printed.count("Training with") == 1  # rank 0 alone speaks
    assert "2 process(es) x 1 micro-batch(es) of 4" in printed
    assert_same_run(saved(single), saved(out))
    assert_same_weights(single, out)
    # rank 0 alone wrote: one checkpoint, nothing else in the folder's parent
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "loss.png",
        "model.safetensors",
        "optimizer.pt",
    ]
    assert [p.name for p in out.parent.iterdir()] == ["ddp"]


def test_a_checkpoint_resumes_on_another_number_of_processes(corpus, single, tmp_path):
    two_then_one = tmp_path / "two-then-one"
    torchrun(2, corpus, two_then_one, "--stop-at", "3")
    assert saved(two_then_one)["step"] == 3
    one_process(corpus, two_then_one, "--resume")
    assert_same_run(saved(single), saved(two_then_one))

    one_then_two = tmp_path / "one-then-two"
    one_process(corpus, one_then_two, "--stop-at", "3")
    done = torchrun(2, corpus, one_then_two, "--resume")
    assert "Resuming from step 3" in done.stdout + done.stderr
    assert_same_run(saved(single), saved(one_then_two))
    assert_same_weights(single, one_then_two)


def test_gradient_accumulation_makes_the_same_step(corpus, single, tmp_path):
    accumulated = one_process(corpus, tmp_path / "accumulated", "--micro-batch", "2")
    assert_same_run(saved(single), accumulated)
    assert_same_weights(single, tmp_path / "accumulated")


def test_the_fused_attention_path_trains_the_same_model(corpus, single, tmp_path):
    fused = one_process(corpus, tmp_path / "fused", "--fast-attention")
    assert_same_run(saved(single), fused)
    # the checkpoint is an ordinary one: the learner's attention reads it back
    assert_same_weights(single, tmp_path / "fused")


def test_torchs_kernels_for_every_component_train_the_same_model(
    corpus, single, tmp_path, monkeypatch
):
    swapped = []  # the models the trainer put on the fast kernels
    real = fast.use_fast_kernels
    monkeypatch.setattr(fast, "use_fast_kernels", lambda model: swapped.append(real(model)))
    kernels = one_process(corpus, tmp_path / "kernels", "--fast-kernels")
    assert len(swapped) == 1 and fast.has_fast_kernels(swapped[0])
    assert kernels["train_config"]["fast_kernels"]
    assert kernels["train_config"]["fast_attention"]  # implied
    assert_same_run(saved(single), kernels)
    # the checkpoint is an ordinary one: the learner's components read it back
    assert_same_weights(single, tmp_path / "kernels")


def test_bf16_autocast_trains_close_to_fp32(corpus, single, tmp_path):
    bf16 = one_process(corpus, tmp_path / "bf16", "--precision", "bf16")
    fp32 = saved(single)
    assert bf16["losses"] != fp32["losses"]  # it really ran in bf16
    for x, y in zip(bf16["losses"], fp32["losses"], strict=True):
        assert abs(x - y) < 0.05 * y
    # the parameters themselves stay fp32
    model = load(tmp_path / "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_tied_weights_and_scaled_init_are_saved_and_loaded(corpus, tmp_path):
    out = tmp_path / "gpt2-style"
    meta = one_process(corpus, out, "--tie-weights", "--scale-init")
    model = load(out)
    assert meta["train_config"]["tie_weights"] and meta["train_config"]["scale_init"]
    assert torch.equal(model.unembed.W_U, model.embed.W_E.T)
    assert "unembed.W_U" not in dict(model.named_parameters())  # one parameter, W_E


def test_a_batch_that_does_not_split_is_refused():
    with pytest.raises(TrainingError, match="does not split over 3 processes"):
        trainer._split_batch(TrainConfig(batch_size=8), world=3)
    with pytest.raises(TrainingError, match="micro-batches of 3 do not divide"):
        trainer._split_batch(TrainConfig(batch_size=8, micro_batch=3), world=2)
    assert trainer._split_batch(TrainConfig(batch_size=8, micro_batch=2), world=2) == (4, 2)
    assert trainer._split_batch(TrainConfig(batch_size=8, micro_batch=16), world=1) == (8, 8)


def test_each_rank_reads_its_own_part_of_the_global_batch():
    indices = torch.arange(10, 18)
    parts_read = [distributed.my_part(indices, distributed.Rank(r, 4)) for r in range(4)]
    assert torch.equal(torch.cat(parts_read), indices)
    assert all(len(p) == 2 for p in parts_read)
    with pytest.raises(ValueError, match="does not split over 3"):
        distributed.my_part(indices, distributed.Rank(0, 3))


def test_bad_scaling_options_are_refused(corpus, tmp_path, capsys):
    assert main(["train", *flags(corpus, tmp_path / "x"), "--batch-tokens", "20"]) == 1
    assert "not a multiple of the window length n_ctx=16" in capsys.readouterr().err
    with pytest.raises(TrainingError, match="precision is one of auto, bf16, fp32"):
        TrainConfig(precision="fp8")
    with pytest.raises(TrainingError, match="micro_batch must be positive"):
        TrainConfig(micro_batch=0)


def test_two_processes_train_on_memory_mapped_shards(corpus, tmp_path, monkeypatch):
    from gpt2_course.shards import ShardData, prepare_shards

    folder = prepare_shards(
        str(corpus), tmp_path / "shards", val_tokens=64, shard_tokens=200, verbose=False
    )
    reads: list[int] = []
    real_read = ShardData.read
    monkeypatch.setattr(
        ShardData,
        "read",
        lambda self, split, idx: reads.append(len(idx)) or real_read(self, split, idx),
    )
    alone = one_process(folder, tmp_path / "alone")
    assert reads.count(8) == STEPS  # every step's batch came from the memory maps
    torchrun(2, folder, tmp_path / "pair")
    assert_same_run(alone, saved(tmp_path / "pair"))


def test_compiled_training_makes_the_same_run(corpus, single, tmp_path, monkeypatch):
    # inductor would build C++ for minutes on a CPU; aot_eager traces the same graph
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m: real_compile(m, backend="aot_eager"))
    compiled = one_process(corpus, tmp_path / "compiled", "--compile", "--micro-batch", "4")
    assert_same_run(saved(single), compiled)


def test_more_processes_than_gpus_is_refused_before_joining(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RuntimeError, match="start at most 1 processes per machine"):
        distributed.start("cuda")
    assert not torch.distributed.is_initialized()


def test_without_an_output_bias_b_U_stays_zero_and_untrained(corpus, tmp_path):
    out = tmp_path / "no-bias"
    meta = one_process(corpus, out, "--no-output-bias", "--tie-weights")
    assert meta["train_config"]["output_bias"] is False
    model = load(out)
    assert torch.count_nonzero(model.unembed.b_U) == 0  # the unigram start was skipped too
    state = torch.load(out / "optimizer.pt", weights_only=True)
    trained = sum(len(group["params"]) for group in state["param_groups"])
    assert trained == sum(1 for p in model.parameters()) - 1  # every parameter but b_U


def test_hellaswag_is_scored_at_its_interval_or_skipped(corpus, tmp_path, monkeypatch, capsys):
    from gpt2_course import hellaswag

    # offline (as in every test): said once, and the run goes on
    offline = one_process(corpus, tmp_path / "offline", "--hellaswag", "3")
    assert capsys.readouterr().out.count("HellaSwag skipped") == 1
    assert not any("hellaswag_acc" in row for row in offline["history"])
    # endings that do not fit the model's 16 tokens: said once, the run goes on
    sample = hellaswag.load_jsonl(Path(__file__).parent / "data" / "hellaswag_sample.jsonl")
    monkeypatch.setattr(hellaswag, "load_hellaswag", lambda **kwargs: sample)
    one_process(corpus, tmp_path / "too-long", "--hellaswag", "3")
    assert capsys.readouterr().out.count("HellaSwag skipped: an ending of") == 1
    # short examples: scored every 3 steps, acc and acc_norm over all of them
    short = [
        hellaswag.Example(ctx="The ferry left", endings=[e, "the gulls", "a boy", "noon"], label=0)
        for e in ("the harbour", "at seven", "the island", "the bell twice")
    ]
    monkeypatch.setattr(hellaswag, "load_hellaswag", lambda **kwargs: short)
    scored = one_process(corpus, tmp_path / "scored", "--hellaswag", "3")
    rows = [row for row in scored["history"] if "hellaswag_acc" in row]
    assert [row["step"] for row in rows] == [0, 3, 6]
    for row in rows:
        for key in ("hellaswag_acc", "hellaswag_acc_norm"):
            assert row[key] * 4 == round(row[key] * 4)  # a count out of the 4 examples


@pytest.mark.parametrize("scaled", [["--micro-batch", "2"], ["--precision", "bf16"]])
def test_a_loss_without_gradient_is_diagnosed_on_the_scaled_path_too(
    corpus, tmp_path, monkeypatch, capsys, scaled
):
    real_part = trainer._part

    def detached_loss(name):
        part = real_part(name)
        if name == "training.next_token_loss":
            return lambda logits, tokens: part(logits, tokens).detach()
        return part

    monkeypatch.setattr(trainer, "_part", detached_loss)
    assert main(["train", *flags(corpus, tmp_path / "x"), *scaled]) == 1
    assert "next_token_loss returned a tensor with no gradient" in capsys.readouterr().err
