"""GPT-2's pretrained weights: find a checkpoint, read it, check it, load it into your model.

One path for every source:

    sd = load_gpt2_state_dict("gpt2")                      # the Hub (local cache first)
    sd = load_gpt2_state_dict("path/to/saved_model")       # a folder from save_pretrained
    sd = load_gpt2_state_dict("path/to/model.safetensors") # a single file (.safetensors or .bin)
    model = load_pretrained_model("gpt2")                  # your Transformer, filled with them

Whatever goes wrong (no such file, a truncated download, a checkpoint of another
shape, no network) raises `CheckpointError` saying what is wrong and what to do.
The Hub is only asked after a quick reachability probe, so nothing here hangs.
"""

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gpt2_course.config import TransformerConfig

WEIGHT_FILES = ["model.safetensors", "pytorch_model.bin"]  # what save_pretrained writes
SHARD_INDEXES = ["model.safetensors.index.json", "pytorch_model.bin.index.json"]
# Hugging Face's causal-mask buffers: not weights, present in older GPT-2 checkpoints.
_BUFFERS = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message says what is wrong and what to do."""


# ------------------------------------------------------------------ the state dict's layout


def gpt2_shapes(cfg: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Every weight a Hugging Face GPT-2 checkpoint must hold for `cfg`, with its shape.

    Names are without the "transformer." prefix. Linear layers are `Conv1D`s, stored
    [d_in, d_out]; `c_attn` holds W_Q, W_K and W_V side by side. `lm_head.weight` is
    optional: GPT-2 ties it to `wte.weight`.
    """
    d, mlp = cfg.d_model, cfg.d_mlp
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (cfg.d_vocab, d),
        "wpe.weight": (cfg.n_ctx, d),
        "ln_f.weight": (d,),
        "ln_f.bias": (d,),
    }
    for layer in range(cfg.n_layers):
        h = f"h.{layer}."
        shapes |= {
            h + "ln_1.weight": (d,),
            h + "ln_1.bias": (d,),
            h + "attn.c_attn.weight": (d, 3 * cfg.n_heads * cfg.d_head),
            h + "attn.c_attn.bias": (3 * cfg.n_heads * cfg.d_head,),
            h + "attn.c_proj.weight": (cfg.n_heads * cfg.d_head, d),
            h + "attn.c_proj.bias": (d,),
            h + "ln_2.weight": (d,),
            h + "ln_2.bias": (d,),
            h + "mlp.c_fc.weight": (d, mlp),
            h + "mlp.c_fc.bias": (mlp,),
            h + "mlp.c_proj.weight": (mlp, d),
            h + "mlp.c_proj.bias": (d,),
        }
    return shapes


def _normalise(state_dict: Any) -> dict[str, Tensor]:
    """Drop the "transformer." prefix and the mask buffers; refuse what is not a state dict."""
    if not isinstance(state_dict, dict) or not state_dict:
        raise CheckpointError(
            f"expected a GPT-2 state dict (a dict of tensor names to tensors), got "
            f"{'an empty dict' if isinstance(state_dict, dict) else type(state_dict).__name__}. "
            "Pass e.g. GPT2LMHeadModel.state_dict() or load_gpt2_state_dict(...)."
        )
    sd = {}
    for name, value in state_dict.items():
        if not isinstance(name, str) or not isinstance(value, Tensor):
            raise CheckpointError(
                f"the state dict maps {name!r} to a {type(value).__name__}, not a tensor"
            )
        name = name.removeprefix("transformer.")
        if not _BUFFERS.match(name):
            sd[name] = value
    return sd


def _layers_in(sd: dict[str, Tensor]) -> int:
    layers = {int(m.group(1)) for name in sd if (m := re.match(r"^h\.(\d+)\.", name))}
    return max(layers) + 1 if layers else 0


def _describe(sd: dict[str, Tensor]) -> str:
    """What a state dict looks like, in TransformerConfig's terms (for error messages)."""
    if "wte.weight" not in sd or sd["wte.weight"].dim() != 2:
        names = sorted(sd)
        return f"keys such as {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}"
    d_vocab, d_model = sd["wte.weight"].shape
    parts = [f"d_vocab={d_vocab}", f"d_model={d_model}", f"n_layers={_layers_in(sd)}"]
    if "wpe.weight" in sd:
        parts.append(f"n_ctx={sd['wpe.weight'].shape[0]}")
    if "h.0.mlp.c_fc.weight" in sd:
        parts.append(f"d_mlp={sd['h.0.mlp.c_fc.weight'].shape[-1]}")
    return ", ".join(parts)


def check_gpt2_state_dict(
    state_dict: dict[str, Tensor], cfg: TransformerConfig
) -> dict[str, Tensor]:
    """The state dict with Hugging Face's names minus "transformer.", checked against `cfg`.

    Raises `CheckpointError` for a weight of the wrong shape, a different number of
    layers, or a missing weight.
    """
    sd = _normalise(state_dict)
    expected = gpt2_shapes(cfg)
    if "lm_head.weight" in sd:
        expected["lm_head.weight"] = (cfg.d_vocab, cfg.d_model)
    if "lm_head.bias" in sd:  # GPT-2 has none; a course model's own unembedding has b_U
        expected["lm_head.bias"] = (cfg.d_vocab,)
    fix = (
        f"The checkpoint has {_describe(sd)}; the model was built for {_describe_cfg(cfg)}. "
        "Build the model with a TransformerConfig that matches the checkpoint "
        "(load_pretrained_model does that for you)."
    )
    for name, shape in expected.items():
        if name in sd and tuple(sd[name].shape) != shape:
            raise CheckpointError(
                f"'{name}' has shape {list(sd[name].shape)} in the checkpoint, but the model "
                f"needs {list(shape)}. {fix}"
            )
    if "wte.weight" in sd and _layers_in(sd) != cfg.n_layers:
        raise CheckpointError(
            f"the checkpoint has {_layers_in(sd)} layers, the model {cfg.n_layers}. {fix}"
        )
    missing = [name for name in expected if name not in sd]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"the GPT-2 state dict has no '{missing[0]}'{more}: is it a Hugging Face GPT-2 "
            f"checkpoint, complete? It has {_describe(sd)}."
        )
    return sd


def _describe_cfg(cfg: TransformerConfig) -> str:
    return (
        f"d_vocab={cfg.d_vocab}, d_model={cfg.d_model}, n_layers={cfg.n_layers}, "
        f"n_ctx={cfg.n_ctx}, d_mlp={cfg.d_mlp}"
    )


def config_from_state_dict(
    state_dict: dict[str, Tensor], hf_config: dict[str, Any] | None = None
) -> TransformerConfig:
    """The TransformerConfig of a GPT-2 checkpoint: sizes from its shapes, heads from config.json.

    Without a config.json the number of heads is d_model // 64, as in every GPT-2 model.
    """
    sd = _normalise(state_dict)
    for name in ("wte.weight", "wpe.weight", "h.0.mlp.c_fc.weight"):
        if name not in sd or sd[name].dim() != 2:
            raise CheckpointError(
                f"cannot tell the model's size: the checkpoint has no 2-d '{name}'. "
                f"Is it a Hugging Face GPT-2 checkpoint? It has {_describe(sd)}."
            )
    d_vocab, d_model = sd["wte.weight"].shape
    hf_config = hf_config or {}
    if "n_head" in hf_config:
        n_heads = int(hf_config["n_head"])
    else:
        n_heads = max(d_model // 64, 1)
        warnings.warn(
            f"no config.json with the checkpoint: assuming n_heads = d_model // 64 = {n_heads}, "
            "as in every GPT-2 model. Pass cfg=TransformerConfig(...) to choose.",
            stacklevel=2,
        )
    if d_model % n_heads:
        raise CheckpointError(
            f"d_model={d_model} is not divisible by n_head={n_heads} (config.json)"
        )
    return TransformerConfig(
        d_model=d_model,
        d_vocab=d_vocab,
        n_ctx=sd["wpe.weight"].shape[0],
        n_layers=_layers_in(sd),
        n_heads=n_heads,
        d_head=d_model // n_heads,
        d_mlp=sd["h.0.mlp.c_fc.weight"].shape[1],
        layer_norm_eps=float(hf_config.get("layer_norm_epsilon", TransformerConfig.layer_norm_eps)),
    )


# ------------------------------------------------------------------ reading files


def _read_file(path: Path) -> dict[str, Tensor]:
    """The tensors in one .safetensors or PyTorch checkpoint file, on the CPU."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty. Save or download the checkpoint again.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as error:  # SafetensorError, OSError, ...
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({error}). It is probably truncated "
                "or corrupt: save or download it again."
            ) from error
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError from the zip reader, ...
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {error}). "
            "It is probably truncated or corrupt (or not a checkpoint): save or download it again."
        ) from error
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]  # a training checkpoint that wraps the weights
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path} holds a {type(loaded).__name__}, not a state dict")
    return loaded


def _read_folder(folder: Path) -> dict[str, Tensor]:
    """The weights in a folder written by `save_pretrained` (single file or sharded)."""
    for index_name in SHARD_INDEXES:
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError) as error:
                raise CheckpointError(f"{index} is not a valid shard index ({error})") from error
            state_dict: dict[str, Tensor] = {}
            for shard in shards:
                if not (folder / shard).is_file():
                    raise CheckpointError(f"{index} names {shard}, which is missing from {folder}")
                state_dict |= _read_file(folder / shard)
            return state_dict
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return _read_file(folder / name)
    present = ", ".join(sorted(p.name for p in folder.iterdir())[:10]) or "nothing"
    raise CheckpointError(
        f"{folder} holds no GPT-2 weights: expected {' or '.join(WEIGHT_FILES)} "
        f"(as written by save_pretrained), found {present}."
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None  # a damaged config.json only costs us the head count


def _from_hub(repo_id: str) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """A Hub checkpoint: from the local Hugging Face cache, else downloaded if the Hub answers."""
    from huggingface_hub import hf_hub_download

    from gpt2_course.reference import hub_reachable, offline_forced

    def fetch(filename: str, local_only: bool) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, filename, local_files_only=local_only))
        except Exception:  # not cached, not on the Hub, or the network failed half-way
            return None

    for local_only in (True, False):
        if not local_only and not hub_reachable():
            break
        for name in WEIGHT_FILES:
            path = fetch(name, local_only)
            if path is not None:
                config = fetch("config.json", local_only)
                return _read_file(path), _read_json(config) if config else None
    why = (
        "offline mode is on (GPT2_COURSE_OFFLINE / HF_HUB_OFFLINE)"
        if offline_forced()
        else "the Hugging Face Hub cannot be reached from here"
    )
    raise CheckpointError(
        f"'{repo_id}' is neither a local file or folder nor in the local Hugging Face cache, "
        f"and {why}. Download it once where you have a network "
        '(python -c "from transformers import GPT2LMHeadModel as M; '
        f"M.from_pretrained('{repo_id}')\"), "
        "or pass the path of a folder saved with save_pretrained or of a .safetensors file."
    )


def _read_checkpoint(source: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """(state dict, config.json contents or None) from a file, a folder or a Hub name."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_folder(path), _read_json(path / "config.json")
    if path.is_file():
        return _read_file(path), _read_json(path.parent / "config.json")
    text = str(source)
    looks_like_path = text.startswith((".", "/", "~")) or path.suffix in {
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
    }
    if looks_like_path or not _HUB_NAME.match(text):
        raise CheckpointError(f"no such file or folder: {path}. Check the path.")
    return _from_hub(text)


def load_gpt2_state_dict(source: str | os.PathLike = "gpt2") -> dict[str, Tensor]:
    """A Hugging Face GPT-2 state dict (Conv1D layout) from a folder, a file or the Hub.

    `source` is a folder written by `save_pretrained` (model.safetensors or
    pytorch_model.bin, sharded or not), a single `.safetensors` / `.bin` file, or a
    Hub name such as "gpt2" (the local cache first; the Hub only if it answers a
    quick probe). Raises `CheckpointError` with what to do when that fails.
    """
    state_dict, _ = _read_checkpoint(source)
    return state_dict


def load_pretrained_model(
    source: str | os.PathLike = "gpt2",
    cfg: TransformerConfig | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Your `Transformer` (through `parts`), filled with a GPT-2 checkpoint's weights, in eval mode.

    Without `cfg`, the model's sizes are read off the checkpoint.
    """

    state_dict, hf_config = _read_checkpoint(source)
    if hf_config and hf_config.get("activation_function", "gelu_new") not in {
        "gelu_new",
        "gelu_pytorch_tanh",
    }:
        raise CheckpointError(
            f"{source} uses activation_function={hf_config['activation_function']!r}; "
            "the course's GPT-2 computes gelu_new, so its outputs would be wrong."
        )
    cfg = cfg or config_from_state_dict(state_dict, hf_config)
    return course_model(state_dict, cfg, package=None, device=device)


def course_model(
    hf_state_dict: dict[str, Tensor],
    cfg: TransformerConfig | None = None,
    package: str | None = "gpt2_course.reference_parts",
    device: str | torch.device | None = None,
) -> nn.Module:
    """The course's `Transformer` holding a Hugging Face GPT-2 state dict, in eval mode.

    Every part (the Transformer, its sub-parts and `load_gpt2_weights`) comes from
    `package`: the reference parts by default, `parts.SOLUTIONS`, or None for the
    parts the course uses now (the learner's, or those lent with `use_solution`).
    Without `cfg`, the sizes are read off the state dict.
    """
    from gpt2_course import parts

    cfg = cfg or config_from_state_dict(hf_state_dict)
    sd = check_gpt2_state_dict(hf_state_dict, cfg)
    with parts.using(package or parts.default_package()):
        if package in (parts.REFERENCE, parts.SOLUTIONS):
            # their loaders fill every parameter or fail: skip an initialisation they overwrite
            with torch.device("meta"):
                model = parts.Transformer(cfg)
            model = model.to_empty(device="cpu")
        else:  # a learner's model may hold buffers, or a loader that misses a weight
            model = parts.Transformer(cfg)
        parts.load_gpt2_weights(model, sd)
    if device is not None:
        model = model.to(device)
    return model.eval()
