"""The reference model: offline, seeded, and equal to Hugging Face's GPT-2."""

import time

import torch

from gpt2_course import reference
from gpt2_course.reference import get_reference, hub_reachable, offline_forced


def test_offline_switches(monkeypatch):
    monkeypatch.delenv("GPT2_COURSE_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert not offline_forced()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert offline_forced()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("GPT2_COURSE_OFFLINE", "true")
    assert offline_forced()
    start = time.perf_counter()
    assert not hub_reachable()  # forced offline: no probe at all
    assert time.perf_counter() - start < 0.1


def test_probe_is_bounded_and_failure_means_offline(monkeypatch):
    # No real traffic: a stand-in for the socket call records the time limit it was given.
    monkeypatch.delenv("GPT2_COURSE_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    seen = {}

    def no_answer(address, timeout):
        seen["timeout"] = timeout
        raise TimeoutError("timed out")

    monkeypatch.setattr(reference.socket, "create_connection", no_answer)
    assert hub_reachable() is False
    assert 0 < seen["timeout"] <= 5


def test_offline_reference_is_random_gpt2_small_and_says_so():
    ref = get_reference()
    assert ref is get_reference()  # built once per process
    assert not ref.pretrained  # tests run offline with an empty cache
    assert "random weights" in ref.describe()
    assert ref.bridge.blocks[0].attn.W_Q.shape == (12, 768, 64)


def test_random_weights_are_seeded():
    a, b = reference.random_gpt2(), reference.random_gpt2()
    assert torch.equal(a.transformer.h[3].mlp.c_fc.weight, b.transformer.h[3].mlp.c_fc.weight)


def test_bridge_logits_equal_hugging_face():
    ref = get_reference()
    tokens = ref.to_tokens("A short sentence for the reference model.")
    logits, cache = ref.run_with_cache(tokens)
    with torch.no_grad():
        hf_logits = ref.hf_model(tokens).logits
    torch.testing.assert_close(logits, hf_logits, atol=1e-5, rtol=1e-5)
    assert "blocks.0.ln1.hook_in" in cache


def test_hf_state_dict_keeps_hugging_face_names():
    sd = get_reference().hf_state_dict
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (768, 2304)
