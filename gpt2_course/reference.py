"""The trusted reference: TransformerLens 4's `TransformerBridge` around GPT-2 small.

Pretrained GPT-2 weights are used when they can be had (a local Hugging Face
cache, or the Hub when it answers quickly). Otherwise, and always when
`GPT2_COURSE_OFFLINE=1` or `HF_HUB_OFFLINE=1` is set and nothing is cached,
the reference is GPT-2 small with seeded random weights: enough to check
every component exactly. The reference is built once per process.
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # transformers is imported where it is used: it costs seconds to import
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast

HUB_HOST = "huggingface.co"
PROBE_SECONDS = 3.0  # a notebook must never hang on the network
RANDOM_SEED = 1234


def offline_forced() -> bool:
    """True when the learner (or CI) asked for no network at all."""
    truthy = {"1", "true", "yes", "on"}
    return any(
        os.environ.get(name, "").strip().lower() in truthy
        for name in ("GPT2_COURSE_OFFLINE", "HF_HUB_OFFLINE")
    )


def hub_reachable(timeout: float = PROBE_SECONDS) -> bool:
    """A quick TCP probe of the Hub, bounded by `timeout` seconds."""
    if offline_forced():
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_pretrained_gpt2(allow_download: bool) -> GPT2LMHeadModel | None:
    """GPT-2 small's pretrained weights, from the local cache or (if allowed) the Hub."""
    from transformers import GPT2LMHeadModel

    try:
        return GPT2LMHeadModel.from_pretrained("gpt2", local_files_only=True)
    except Exception:  # not cached (or a damaged cache): try the Hub
        pass
    if not allow_download:
        return None
    try:
        return GPT2LMHeadModel.from_pretrained("gpt2")
    except Exception as error:  # a network failure half-way is not fatal
        warnings.warn(
            f"Could not download GPT-2's weights ({error}); using random weights.", stacklevel=2
        )
        return None


def random_gpt2(seed: int = RANDOM_SEED) -> GPT2LMHeadModel:
    """GPT-2 small with seeded random weights: the same on every CPU, every run."""
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(GPT2Config())


@dataclass
class Reference:
    """The reference model and how it was obtained."""

    bridge: object  # transformer_lens.model_bridge.TransformerBridge
    hf_model: GPT2LMHeadModel  # wrapped in place by the bridge: use hf_state_dict for its weights
    tokenizer: GPT2TokenizerFast
    pretrained: bool
    hf_state_dict: dict[str, torch.Tensor]  # Hugging Face's names and Conv1D layout

    @property
    def mode(self) -> str:
        if self.pretrained:
            return "pretrained GPT-2 small weights"
        return "GPT-2 small with seeded random weights (offline: no pretrained weights)"

    def describe(self) -> str:
        if self.pretrained:
            return "Reference model: GPT-2 small with its pretrained weights."
        why = (
            "offline mode was forced (GPT2_COURSE_OFFLINE / HF_HUB_OFFLINE)"
            if offline_forced()
            else "the Hugging Face Hub could not be reached"
        )
        return (
            f"Reference model: GPT-2 small with seeded random weights, because {why}.\n"
            "Every check is still exact: it compares your code with GPT-2's computation.\n"
            "Predictions and generated text will look like noise until you have real weights."
        )

    def to_tokens(self, text: str | list[str]) -> torch.Tensor:
        """Token ids [batch, pos] for a text (or equally long texts), with no BOS added."""
        texts = [text] if isinstance(text, str) else text
        ids = [self.tokenizer(t)["input_ids"] for t in texts]
        if len({len(i) for i in ids}) != 1:
            raise ValueError("texts in one batch must have the same number of tokens")
        return torch.tensor(ids, dtype=torch.long)

    @torch.no_grad()
    def run_with_cache(self, tokens: torch.Tensor):
        """Logits and the activation cache of the reference on `tokens`."""
        return self.bridge.run_with_cache(tokens)


def _boot_bridge(hf_model: GPT2LMHeadModel, tokenizer: GPT2TokenizerFast):
    from transformer_lens.model_bridge import TransformerBridge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers("gpt2", hf_model=hf_model, tokenizer=tokenizer)
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)
    return bridge


@cache
def get_reference() -> Reference:
    """The process-wide reference model (pretrained if possible, else seeded random)."""
    from gpt2_course.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    hf_model = None if offline_forced() else load_pretrained_gpt2(allow_download=hub_reachable())
    if offline_forced():
        # offline still uses weights that are already on disk
        hf_model = load_pretrained_gpt2(allow_download=False)
    pretrained = hf_model is not None
    if hf_model is None:
        hf_model = random_gpt2()
    hf_model.eval()
    # The bridge rewires hf_model's submodules, so keep its state dict as Hugging Face names it.
    hf_state_dict = {name: tensor.detach() for name, tensor in hf_model.state_dict().items()}
    # raw (unfolded) weights: no enable_compatibility_mode(), so logits equal HF's exactly
    bridge = _boot_bridge(hf_model, tokenizer)
    return Reference(bridge, hf_model, tokenizer, pretrained, hf_state_dict)
