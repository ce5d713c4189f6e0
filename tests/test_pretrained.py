"""The pretrained-weights path, proven offline on checkpoints the tests write themselves."""

import json
import shutil
import socket
import warnings

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2_course import parts
from gpt2_course.config import TransformerConfig
from gpt2_course.pretrained import (
    CheckpointError,
    check_gpt2_state_dict,
    config_from_state_dict,
    load_gpt2_state_dict,
    load_pretrained_model,
)
from solutions.transformer import Transformer, load_gpt2_weights

TINY = dict(
    n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=32, bos_token_id=96, eos_token_id=96
)


@pytest.fixture(scope="module")
def tiny_hf() -> GPT2LMHeadModel:
    """A small GPT-2 with every weight random, LayerNorms and biases included."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**TINY)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            shift = 1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0
            param.copy_(shift + 0.2 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def saved(tiny_hf, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    tiny_hf.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, TINY["vocab_size"], (3, 20), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test instead of waiting on the network."""

    def refuse(*args, **kwargs):
        raise AssertionError("the pretrained path tried to reach the network in a test")

    monkeypatch.setattr(socket, "create_connection", refuse)


def assert_same_logits(model, hf, tokens):
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-5, rtol=1e-4)


def load(source, cfg=None):
    with parts.using(parts.SOLUTIONS):
        return load_pretrained_model(source, cfg)


def test_folder_from_save_pretrained(saved, tiny_hf, tokens):
    assert (saved / "model.safetensors").is_file()
    model = load(saved)
    assert isinstance(model, Transformer) and not model.training
    assert (model.cfg.n_heads, model.cfg.d_head, model.cfg.n_layers) == (4, 16, 2)
    assert (model.cfg.d_vocab, model.cfg.n_ctx, model.cfg.d_mlp) == (97, 32, 256)
    assert_same_logits(model, tiny_hf, tokens)
    # GPT-2's tied unembedding: save_pretrained leaves lm_head out, W_U is wte transposed
    assert torch.equal(model.unembed.W_U, tiny_hf.transformer.wte.weight.T)


def test_single_safetensors_file(saved, tiny_hf, tokens, tmp_path):
    # next to its config.json, the head count is read from it
    assert_same_logits(load(saved / "model.safetensors"), tiny_hf, tokens)
    # alone, the sizes come from the shapes; the head count must be given (or is guessed)
    alone = tmp_path / "weights.safetensors"
    shutil.copy(saved / "model.safetensors", alone)
    cfg = config_from_state_dict(load_gpt2_state_dict(alone), {"n_head": 4})
    assert_same_logits(load(alone, cfg), tiny_hf, tokens)
    with pytest.warns(UserWarning, match="n_heads"):
        guessed = load(alone)
    assert guessed.cfg.d_head == 64  # every GPT-2 model has 64-wide heads


def test_pytorch_bin_and_sharded_folders(saved, tiny_hf, tokens, tmp_path):
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    shutil.copy(saved / "config.json", bin_folder)
    torch.save(tiny_hf.state_dict(), bin_folder / "pytorch_model.bin")
    assert_same_logits(load(bin_folder), tiny_hf, tokens)

    sharded = tmp_path / "sharded"
    tiny_hf.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert_same_logits(load(sharded), tiny_hf, tokens)


def test_state_dict_names_with_or_without_prefix(tiny_hf, tokens):
    full = tiny_hf.state_dict()  # "transformer.h.0...", and a tied "lm_head.weight"
    bare = {k.removeprefix("transformer."): v for k, v in full.items() if k != "lm_head.weight"}
    cfg = config_from_state_dict(full, {"n_head": 4})
    for sd in (full, bare):
        with parts.using(parts.SOLUTIONS):
            model = Transformer(cfg).eval()
        load_gpt2_weights(model, sd)
        assert_same_logits(model, tiny_hf, tokens)
    assert not any(k.startswith("transformer.") for k in check_gpt2_state_dict(full, cfg))


def test_load_gpt2_state_dict_returns_hf_weights(saved, tiny_hf):
    sd = load_gpt2_state_dict(saved)
    for name, tensor in tiny_hf.state_dict().items():
        if name != "lm_head.weight":
            assert torch.equal(sd[name], tensor), name


# ------------------------------------------------------------------ clear errors


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_gpt2_state_dict(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_gpt2_state_dict("./not_here.safetensors")


def test_folder_without_weights(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="holds no GPT-2 weights.*notes.txt"):
        load_gpt2_state_dict(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors(saved, tmp_path, damage):
    data = (saved / "model.safetensors").read_bytes()
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(
        {
            "truncated": data[: len(data) // 2],
            "garbage": b"\x07not a checkpoint" * 50,
            "empty": b"",
        }[damage]
    )
    with pytest.raises(CheckpointError, match="empty|truncated or corrupt") as info:
        load_gpt2_state_dict(bad)
    assert "again" in str(info.value)  # it says what to do
    with pytest.raises(CheckpointError):
        load(tmp_path)  # the folder path reads the same file


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_pytorch_bin(tiny_hf, tmp_path, damage):
    good = tmp_path / "good.bin"
    torch.save(tiny_hf.state_dict(), good)
    data = good.read_bytes()
    bad = tmp_path / "pytorch_model.bin"
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"garbage" * 100)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_gpt2_state_dict(bad)


def test_checkpoint_of_the_wrong_shape(saved):
    sd = load_gpt2_state_dict(saved)
    with pytest.raises(
        CheckpointError, match=r"'wte.weight' has shape \[97, 64\].*needs \[50257, 768\]"
    ):
        check_gpt2_state_dict(sd, TransformerConfig())
    with parts.using(parts.SOLUTIONS):
        small = Transformer(
            TransformerConfig(
                d_model=64, d_vocab=97, n_ctx=32, n_heads=4, d_head=16, d_mlp=256, n_layers=1
            )
        )
    with pytest.raises(CheckpointError, match="has 2 layers, the model 1.*n_layers=2"):
        load_gpt2_weights(small, sd)  # the reference solution checks before it copies


def test_missing_keys_and_non_tensors(saved):
    sd = load_gpt2_state_dict(saved)
    cfg = config_from_state_dict(sd, {"n_head": 4})
    partial = {k: v for k, v in sd.items() if "h.1.mlp" not in k}
    with pytest.raises(CheckpointError, match=r"has no 'h.1.mlp.c_fc.weight' \(and 3 more\)"):
        check_gpt2_state_dict(partial, cfg)
    with pytest.raises(CheckpointError, match="not a tensor"):
        check_gpt2_state_dict({**sd, "wte.weight": [1, 2]}, cfg)
    with pytest.raises(CheckpointError, match="empty dict"):
        check_gpt2_state_dict({}, cfg)
    with pytest.raises(CheckpointError, match="cannot tell the model's size"):
        config_from_state_dict({"encoder.weight": torch.zeros(3, 3)})


def test_wrong_activation_is_refused(saved, tmp_path):
    folder = tmp_path / "relu"
    shutil.copytree(saved, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(CheckpointError, match="relu"):
        load(folder)


def test_hub_name_offline_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="offline mode is on.*save_pretrained"):
            load_gpt2_state_dict("gpt2-course-test/no-such-model")


@pytest.mark.slow
def test_full_size_path_matches_the_reference():
    """GPT-2 small: the reference's Hugging Face state dict through the same loading code."""
    from gpt2_course.checks.reference_data import text_run, text_tokens
    from gpt2_course.reference import get_reference

    sd = get_reference().hf_state_dict
    with pytest.warns(UserWarning, match="n_heads = d_model // 64 = 12"):
        cfg = config_from_state_dict(sd)  # no config.json: GPT-2's 64-wide heads assumed
    assert cfg == TransformerConfig()
    with parts.using(parts.SOLUTIONS):
        model = Transformer(cfg).eval()
    load_gpt2_weights(model, sd)
    with torch.no_grad():
        torch.testing.assert_close(model(text_tokens()), text_run()[0], atol=1e-4, rtol=1e-3)
