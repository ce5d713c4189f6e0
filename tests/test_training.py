"""Training: the data pipeline, the baselines, checkpoints, resuming, the CLI."""

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2_course import data as data_module
from gpt2_course import parts, trainer
from gpt2_course.cli import main
from gpt2_course.data import (
    DataError,
    baselines,
    bigram_loss,
    load_data,
    text_files,
    unigram_loss,
    windows,
)
from gpt2_course.tokenizer import END_OF_TEXT_ID, get_tokenizer
from gpt2_course.trainer import (
    CheckpointError,
    TrainConfig,
    TrainingError,
    load_checkpoint,
    model_config,
    save_checkpoint,
    train,
)

# Original sentences, enough for a few dozen windows of 16 tokens.
STORY_A = (
    "The lighthouse keeper wrote the weather in a green notebook every morning. "
    "On calm days she painted the railings; on stormy days she counted the ships. "
    "Her brother sent letters from the mainland about the price of flour and the new school. "
) * 3
STORY_B = (
    "A small robot learned to water the tomatoes in the school garden. "
    "It measured the soil with a copper probe and wrote the numbers on a chalkboard. "
    "When the rain came, the robot rolled under the bench and waited. "
) * 3
TINY = dict(d_model=16, n_layers=1, n_heads=2, n_ctx=16)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "a.txt").write_text(STORY_A, encoding="utf-8")
    (folder / "b.txt").write_text(STORY_B, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tiny_data(corpus):
    return load_data(corpus, seq_len=16, val_fraction=0.2, seed=0, verbose=False)


@pytest.fixture
def solutions():
    with parts.using(parts.SOLUTIONS):
        yield


def tiny_config(tmp_path: Path, **overrides) -> TrainConfig:
    settings = dict(
        model=model_config("tiny", **TINY),
        steps=6,
        eval_interval=3,
        eval_windows=4,
        sample_interval=0,
        out_dir=str(tmp_path / "ckpt"),
        device="cpu",
    )
    return TrainConfig(**{**settings, **overrides})


# ------------------------------------------------------------------ data


def test_load_data_tokenizes_and_cuts_windows(corpus, tiny_data):
    tok = get_tokenizer()
    docs = [tok(s)["input_ids"] + [END_OF_TEXT_ID] for s in (STORY_A, STORY_B)]
    n_tokens = sum(len(d) for d in docs)
    assert tiny_data.source == "files"
    assert tiny_data.n_documents == 2 and tiny_data.n_tokens == n_tokens
    n_windows = n_tokens // 16
    assert len(tiny_data.train) + len(tiny_data.val) == n_windows
    assert len(tiny_data.val) == round(n_windows * 0.2)
    assert tiny_data.train.dtype == torch.long and tiny_data.train.shape[1] == 16
    # The windows are the two documents, in the seeded order, joined and cut.
    stream = torch.cat([tiny_data.train, tiny_data.val]).flatten().tolist()
    joined = [docs[0] + docs[1], docs[1] + docs[0]]
    assert any(stream == j[: len(stream)] for j in joined)
    assert END_OF_TEXT_ID in stream


def test_windows_split_and_order():
    tokens = np.arange(10)
    offsets = np.array([0, 4, 10])
    train_w, val_w = windows(tokens, offsets, seq_len=3, val_fraction=0.34, seed=1)
    assert train_w.shape == (2, 3) and val_w.shape == (1, 3)
    stream = torch.cat([train_w, val_w]).flatten().tolist()
    assert stream in ([0, 1, 2, 3, 4, 5, 6, 7, 8], [4, 5, 6, 7, 8, 9, 0, 1, 2])
    again = windows(tokens, offsets, seq_len=3, val_fraction=0.34, seed=1)
    assert torch.equal(again[0], train_w)  # seeded


def test_too_little_text_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="too few"):
        windows(np.arange(5), np.array([0, 5]), seq_len=4, val_fraction=0.1, seed=0)
    (tmp_path / "short.txt").write_text("Hello there.", encoding="utf-8")
    with pytest.raises(DataError, match="too few"):
        load_data(tmp_path / "short.txt", seq_len=64, verbose=False)


def test_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no text file matches"):
        text_files(tmp_path / "missing*.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt files"):
        text_files(tmp_path / "empty")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ol\xe9".encode("latin-1") * 50)
    with pytest.raises(DataError, match="not UTF-8"):
        load_data(tmp_path / "latin1.txt", seq_len=4, verbose=False)


def test_builtin_corpus_is_python_documentation():
    import itertools
    import sys
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    for kind in [dict(reference=True), dict(reference=False, docstrings=True)]:
        docs = list(
            itertools.islice(data_module.python_documentation(stdlib, sys.version, 1, **kind), 5)
        )
        assert docs, f"no documentation found in this Python ({kind})"
        text = " ".join(d["text"] for d in docs)
        for word in (" the ", " is ", " of "):  # real English prose, not random tokens
            assert word in text


def test_repeated_paragraphs_are_kept_once():
    seen: set[str] = set()
    long_a = "The if statement is used for conditional execution of a suite."
    long_b = "A while loop repeats a suite as long as an expression stays true."
    first = data_module._new_paragraphs(f"{long_a}\n\nNote:\n\n{long_b}", seen)
    second = data_module._new_paragraphs(
        f"Note:\n\n{long_a}\n\nSomething new here, long enough.", seen
    )
    assert first == f"{long_a}\n\nNote:\n\n{long_b}"
    assert second == "Note:\n\nSomething new here, long enough."


def _fake_generator(calls):
    import datasets

    def fake(generator, **kwargs):
        calls.append(generator.__name__)
        if generator is data_module.tinystories_documents:
            raise ConnectionError("no route to huggingface.co")
        text = "The statement is used to loop over the elements of a sequence. " * 40
        return datasets.Dataset.from_dict({"text": [text], "name": ["x"]})

    return fake


def test_auto_falls_back_to_builtin_and_says_so(monkeypatch, capsys):
    import gpt2_course.reference

    calls = []
    monkeypatch.setattr(data_module, "_from_generator", _fake_generator(calls))
    monkeypatch.setattr(gpt2_course.reference, "hub_reachable", lambda *a, **k: False)
    result = load_data("auto", seq_len=16, verbose=True)
    out = capsys.readouterr().out
    assert result.source == "builtin" and calls == ["python_documentation"]
    assert "not reachable" in out and "Python's own documentation" in out
    # online, but the download fails: announced, and the builtin corpus again
    calls.clear()
    monkeypatch.setattr(gpt2_course.reference, "hub_reachable", lambda *a, **k: True)
    result = load_data("auto", seq_len=16, verbose=True)
    out = capsys.readouterr().out
    assert calls == ["tinystories_documents", "python_documentation"]
    assert result.source == "builtin" and "Could not load TinyStories" in out


# ------------------------------------------------------------------ baselines


def test_baselines_match_hand_computation():
    train_w = torch.tensor([[0, 1, 0, 1], [0, 1, 2, 0]])
    val_w = torch.tensor([[1, 0, 3]])
    # predictions in val: 1 -> 0 and 0 -> 3. Next-token counts in train: 0:2, 1:3, 2:1 (of 6).
    k = 0.5
    expected_unigram = -(math.log(2.5 / 8) + math.log(0.5 / 8)) / 2
    # pairs in train: (0,1) x3, (1,0), (1,2), (2,0); rows: 0 three times, 1 twice
    expected_bigram = -(math.log(1.5 / 4) + math.log(0.5 / 5)) / 2
    assert unigram_loss(train_w, val_w, 4, k) == pytest.approx(expected_unigram, rel=1e-12)
    assert bigram_loss(train_w, val_w, 4, k) == pytest.approx(expected_bigram, rel=1e-12)
    b = baselines(train_w, val_w, d_vocab=4)
    assert b.uniform == pytest.approx(math.log(4))


def test_baseline_smoothing_is_chosen_without_the_validation_split(tiny_data):
    a = baselines(tiny_data.train, tiny_data.val)
    b = baselines(tiny_data.train, tiny_data.val[:1])
    assert (a.unigram_k, a.bigram_k) == (b.unigram_k, b.bigram_k)
    assert a.uniform == pytest.approx(math.log(50257))
    assert a.bigram < a.uniform and a.unigram < a.uniform


# ------------------------------------------------------------------ checkpoints


def _tiny_model(seed=0):
    return trainer.build_model(model_config("tiny", **TINY), seed)


def test_checkpoint_round_trip(tmp_path, solutions):
    model = _tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, model, optimizer, {"step": 3})
    loaded, cfg, meta = load_checkpoint(tmp_path / "model.safetensors")
    assert cfg == model.cfg and meta["step"] == 3
    for (name, a), (_, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert json.loads((tmp_path / "config.json").read_text())["format"] == "gpt2-course-checkpoint"


def test_checkpoint_write_is_atomic(tmp_path, solutions, monkeypatch):
    import safetensors.torch

    model = _tiny_model()
    save_checkpoint(tmp_path, model, None, {"step": 1})
    before = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()

    def broken_save(tensors, path):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, model, None, {"step": 2})
    after = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    assert after == before
    assert not list(tmp_path.glob(".*.tmp"))
    assert load_checkpoint(tmp_path)[2]["step"] == 1


def test_corrupt_checkpoints_are_clear_errors(tmp_path, solutions):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nothing")
    save_checkpoint(tmp_path, _tiny_model(), None, {"step": 1})
    weights = tmp_path / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(tmp_path)
    # Without the hash to catch it, the unreadable file itself is reported.
    config = json.loads((tmp_path / "config.json").read_text())
    config["sha256"] = {}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tmp_path)


def test_mismatched_checkpoint_is_a_clear_error(tmp_path, solutions, tiny_data):
    save_checkpoint(tmp_path, _tiny_model(), None, {"step": 1})
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_config"]["d_model"] = 32
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(tmp_path)
    # resuming into a different model size
    run = tiny_config(tmp_path, steps=3)
    train(run, data=tiny_data, progress=False, verbose=False)
    bigger = tiny_config(tmp_path, steps=6, model=model_config("tiny", **{**TINY, "d_model": 32}))
    with pytest.raises(CheckpointError, match="different model: d_model=16 there, 32 here"):
        train(bigger, data=tiny_data, resume=True, progress=False, verbose=False)


# ------------------------------------------------------------------ training


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_after_ctrl_c_continues_exactly(tmp_path, solutions, tiny_data, monkeypatch):
    straight = train(tiny_config(tmp_path / "a"), data=tiny_data, progress=False, verbose=False)
    assert straight.step == 6

    real_batch = trainer._batch_indices

    def interrupt_at_step_4(n_windows, batch_size, seed, step):
        if step == 4:
            raise KeyboardInterrupt
        return real_batch(n_windows, batch_size, seed, step)

    monkeypatch.setattr(trainer, "_batch_indices", interrupt_at_step_4)
    first = train(tiny_config(tmp_path / "b"), data=tiny_data, progress=False, verbose=False)
    assert first.interrupted and first.step == 4
    assert load_checkpoint(tmp_path / "b" / "ckpt")[2]["step"] == 3  # the last one is kept

    monkeypatch.setattr(trainer, "_batch_indices", real_batch)
    resumed = train(
        tiny_config(tmp_path / "b"), data=tiny_data, resume=True, progress=False, verbose=False
    )
    assert resumed.step == 6 and not resumed.interrupted
    a, b = _weights(straight.model), _weights(resumed.model)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed.losses == straight.losses
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in straight.history]


def test_a_fresh_run_sets_the_earlier_checkpoint_aside(tmp_path, solutions, tiny_data):
    run = tiny_config(tmp_path, steps=3)
    ckpt = run.checkpoint_dir
    first = train(run, data=tiny_data, progress=False, verbose=False)
    first_weights = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "notes.txt").write_text("mine")  # something the learner put there
    train(tiny_config(tmp_path, steps=3, seed=1), data=tiny_data, progress=False, verbose=False)
    aside = ckpt.with_name(ckpt.name + ".previous")
    assert (aside / "model.safetensors").read_bytes() == first_weights
    assert (aside / "notes.txt").read_text() == "mine"
    assert load_checkpoint(aside)[2]["step"] == first.step
    # A third run must not delete the folder holding the learner's notes.
    train(tiny_config(tmp_path, steps=3, seed=2), data=tiny_data, progress=False, verbose=False)
    assert (aside / "notes.txt").read_text() == "mine"
    assert load_checkpoint(ckpt.with_name(ckpt.name + ".previous-2"))[2]["step"] == 3


def test_training_is_reproducible_across_processes_with_two_threads(tmp_path, corpus):
    # Two threads make some CPU kernels add in a varying order; the trainer must not.
    script = f"""
import json, torch
from gpt2_course import parts, trainer
from gpt2_course.data import load_data
torch.set_num_threads(2)
data = load_data({str(corpus)!r}, seq_len=32, val_fraction=0.2, seed=0, verbose=False)
config = trainer.TrainConfig(
    model=trainer.model_config("tiny", n_ctx=32), steps=25, batch_size=16, eval_interval=25,
    eval_windows=4, sample_interval=0, save=False, device="cpu",
)
with parts.using(parts.SOLUTIONS):
    print(json.dumps(trainer.train(config, data=data, progress=False, verbose=False).losses))
"""
    runs = [
        subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
        )
        for _ in range(2)
    ]
    losses = [json.loads(run.stdout.strip().splitlines()[-1]) for run in runs]
    assert len(losses[0]) == 25
    assert losses[0] == losses[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_cuda_matches_cpu(tmp_path, solutions, tiny_data):
    assert trainer.pick_device().type == "cuda"  # the default where a GPU is present
    cpu = train(tiny_config(tmp_path / "cpu"), data=tiny_data, progress=False, verbose=False)
    gpu = train(
        tiny_config(tmp_path / "gpu", device="cuda"), data=tiny_data, progress=False, verbose=False
    )
    assert next(gpu.model.parameters()).device.type == "cuda"
    assert gpu.losses == pytest.approx(cpu.losses, abs=2e-3)
    model, _, meta = load_checkpoint(tmp_path / "gpu" / "ckpt")  # a GPU checkpoint, on CPU
    assert meta["step"] == 6 and next(model.parameters()).device.type == "cpu"
    on_gpu, _, _ = load_checkpoint(tmp_path / "cpu" / "ckpt", device="cuda")
    assert next(on_gpu.parameters()).device.type == "cuda"


def test_training_is_reproducible(tmp_path, solutions, tiny_data):
    runs = [
        train(
            tiny_config(tmp_path, save=False, seed=seed),
            data=tiny_data,
            progress=False,
            verbose=False,
        )
        for seed in (0, 0, 1)
    ]
    assert runs[0].losses == runs[1].losses
    assert all(
        torch.equal(a, b)
        for a, b in zip(runs[0].model.parameters(), runs[1].model.parameters(), strict=True)
    )
    assert runs[0].losses != runs[2].losses


def test_unimplemented_parts_give_a_clear_message(tmp_path, tiny_data):
    parts.use_solution("transformer.Transformer")
    try:
        with pytest.raises(TrainingError, match="parts.use_solution"):
            train(tiny_config(tmp_path), data=tiny_data, progress=False, verbose=False)
    finally:
        parts.use_mine("transformer.Transformer")


def test_a_loss_without_gradient_stops_training_with_a_clear_message(
    tmp_path, solutions, tiny_data, monkeypatch
):
    import solutions.training as training

    real = training.next_token_loss
    # train_step uses its own file's next_token_loss, and so does the trainer's diagnosis
    monkeypatch.setattr(
        training, "next_token_loss", lambda logits, tokens: real(logits, tokens).detach()
    )
    with pytest.raises(
        TrainingError, match="next_token_loss returned a tensor with no gradient"
    ) as caught:
        train(tiny_config(tmp_path, steps=2), data=tiny_data, progress=False, verbose=False)
    assert "does not require grad" not in str(caught.value)


def test_a_model_without_gradient_stops_training_with_a_clear_message(
    tmp_path, solutions, tiny_data, monkeypatch
):
    import solutions.transformer as transformer

    real = transformer.Transformer.forward
    monkeypatch.setattr(
        transformer.Transformer, "forward", lambda self, tokens: real(self, tokens).detach()
    )
    with pytest.raises(TrainingError, match=r"logits carry none.*Transformer\.forward"):
        train(tiny_config(tmp_path, steps=2), data=tiny_data, progress=False, verbose=False)


def test_the_trainer_cuts_windows_with_make_windows(tmp_path, corpus, monkeypatch):
    import solutions.training as training

    cut: list[int] = []
    real = training.make_windows

    def counting(tokens, seq_len):
        cut.append(seq_len)
        return real(tokens, seq_len)

    monkeypatch.setattr(training, "make_windows", counting)
    with parts.using(parts.SOLUTIONS):
        config = tiny_config(tmp_path, steps=1, data=str(corpus), save=False)
        train(config, progress=False, verbose=False)
    assert cut == [TINY["n_ctx"]]
    # a wrong cut is stopped before training, with the check to run
    with pytest.raises(DataError, match=r"make_windows.*check\(\"training.make_windows\"\)"):
        windows(np.arange(40), np.array([0, 40]), 8, 0.2, 0, cut=lambda t, n: t.unfold(0, n, 1))


def test_the_first_step_of_the_warmup_moves_the_weights():
    from solutions.training import lr_at_step

    settings = dict(max_lr=1e-2, min_lr=1e-3, total_steps=100)
    assert lr_at_step(0, warmup_steps=10, **settings) == pytest.approx(1e-2 / 11)
    assert lr_at_step(10, warmup_steps=10, **settings) == pytest.approx(1e-2)  # meets the cosine
    assert lr_at_step(0, warmup_steps=0, **settings) == pytest.approx(1e-2)  # no warmup at all
    assert isinstance(lr_at_step(3, warmup_steps=10, **settings), float)


def test_config_validation():
    with pytest.raises(TrainingError, match="steps must be positive"):
        TrainConfig(steps=0)
    with pytest.raises(TrainingError, match="unknown model size"):
        model_config("huge")
    with pytest.raises(TrainingError, match="not divisible"):
        model_config("tiny", d_model=30, n_heads=4)
    cfg = model_config("tiny", d_model=32)
    assert (cfg.d_head, cfg.d_mlp, cfg.d_vocab) == (8, 128, 50257)


def test_quick_mode(monkeypatch):
    monkeypatch.delenv("GPT2_COURSE_QUICK", raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert not trainer.quick_mode()
    monkeypatch.setenv("GPT2_COURSE_QUICK", "1")
    assert trainer.quick_mode() and trainer.notebook_config().steps < TrainConfig().steps
    monkeypatch.delenv("GPT2_COURSE_QUICK")
    monkeypatch.setenv("CI", "true")
    assert not trainer.quick_mode()  # the learner's own code in CI: full run
    monkeypatch.setenv("GPT2_COURSE_SOLUTIONS", "1")
    assert trainer.quick_mode()


def test_cli_train_smoke(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    args = ["train", "--solutions", "--data", str(corpus / "*.txt"), "--out", str(out)]
    args += ["--steps", "8", "--eval-interval", "4", "--d-model", "16", "--n-layers", "1"]
    args += ["--n-heads", "2", "--n-ctx", "16", "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "bigram baseline" in printed and "validation windows" in printed
    for name in ("model.safetensors", "optimizer.pt", "config.json", "loss.png"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "config.json").read_text())
    assert meta["step"] == 8
    assert [s["step"] for s in meta["samples"]] == [0, 4, 8]  # the last one saved too
    history = meta["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]  # the loss falls


def test_cli_train_reports_unimplemented_code(tmp_path, corpus, capsys):
    args = ["train", "--data", str(corpus), "--out", str(tmp_path), "--steps", "2"]
    args += ["--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--n-ctx", "16"]
    assert main(args + ["--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "parts.use_solution" in err
    assert "Traceback" not in err
