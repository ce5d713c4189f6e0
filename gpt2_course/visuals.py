"""Pictures for the notebooks: attention patterns (circuitsvis, offline) and matplotlib diagrams.

circuitsvis 1.43 renders through `RenderedHTML._repr_html_`, which first probes
http://google.com (a network call that can stall a notebook) and, when it
answers, loads its JavaScript from the unpkg CDN. `offline()` skips both: it
shows the rendering that inlines the JavaScript bundled inside the installed
package (circuitsvis/dist/cdn/iife.js), so the picture works with no network.
"""

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

_RENDER_CALL = "CircuitsVis.render("


class OfflineHTML:
    """A circuitsvis picture whose JavaScript is inline: shown without any network access."""

    def __init__(self, html: str):
        self.html = html

    def _repr_html_(self) -> str:
        return self.html

    def __html__(self) -> str:
        return self.html

    def save(self, path: str) -> None:
        """Write a standalone HTML page (open it in any browser, offline)."""
        with open(path, "w", encoding="utf-8") as file:
            file.write(
                "<!DOCTYPE html>\n<html><head><meta charset='utf-8'></head>"
                f"<body>{self.html}</body></html>"
            )

    def __repr__(self) -> str:
        return f"<OfflineHTML: a circuitsvis picture, {len(self.html) // 1024} KiB with its JS>"


def offline(rendered: Any) -> OfflineHTML:
    """Show a circuitsvis rendering, e.g. `cv.attention.attention_patterns(...)`, offline."""
    source = getattr(rendered, "local_src", None)
    if not isinstance(source, str) or _RENDER_CALL not in source:
        raise TypeError(
            "offline() takes what a circuitsvis function returns, e.g. "
            "offline(circuitsvis.attention.attention_patterns(tokens=..., attention=...))"
        )
    # The props (tokens, numbers) follow the last render call. A token such as "</script>"
    # would end the script early, so escape "</" there ("<\/" is the same string in JS).
    head, call, tail = source.rpartition(_RENDER_CALL)
    props, end_tag, rest = tail.rpartition("</script>")
    return OfflineHTML(head + call + props.replace("</", "<\\/") + end_tag + rest)


def token_strings(tokens: Tensor, tokenizer: Any) -> list[str]:
    """Each token id of a [pos] or [1, pos] tensor as the text it stands for."""
    ids = tokens.reshape(-1).tolist()
    return [tokenizer.decode([i]) for i in ids]


@torch.no_grad()
def capture_pattern(
    attn: nn.Module, x: Float[Tensor, "batch pos d_model"]
) -> Float[Tensor, "batch n_heads query_pos key_pos"]:
    """The attention pattern an attention module computes on x.

    Runs `attn(x)` and keeps what its `apply_causal_mask` returns; the pattern is
    the softmax of those masked scores over the keys, as in forward.
    """
    seen: list[Tensor] = []
    mask = getattr(attn, "apply_causal_mask", None)
    if not callable(mask):
        raise TypeError(f"{type(attn).__name__} has no apply_causal_mask method")

    def recording_mask(scores: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        masked = mask(scores, *args, **kwargs)
        seen.append(masked.detach())
        return masked

    attn.apply_causal_mask = recording_mask
    try:
        attn(x)
    finally:
        attn.__dict__.pop("apply_causal_mask", None)
    if not seen:
        raise RuntimeError(
            f"{type(attn).__name__}.forward never calls self.apply_causal_mask, so its attention "
            "pattern cannot be read off. Call it on the scaled scores, before the softmax."
        )
    return seen[-1].softmax(dim=-1)


# ------------------------------------------------------------------ matplotlib


def plot_attention_pattern(
    pattern: Float[Tensor, "query_pos key_pos"],
    tokens: Sequence[str],
    ax: Any = None,
    title: str | None = None,
) -> Any:
    """A heat map of one head's pattern: a row per query (destination), a column per key."""
    import matplotlib.pyplot as plt

    pattern = pattern.detach().float().cpu()
    if (
        pattern.dim() != 2
        or pattern.shape[0] != pattern.shape[1]
        or pattern.shape[0] != len(tokens)
    ):
        raise ValueError(
            f"expected one head's pattern of shape [{len(tokens)}, {len(tokens)}] for "
            f"{len(tokens)} tokens, got {list(pattern.shape)}"
        )
    if ax is None:
        size = min(10.0, 2.0 + 0.22 * len(tokens))
        _, ax = plt.subplots(figsize=(size + 1.5, size))
    future = torch.ones_like(pattern, dtype=torch.bool).triu(1)
    shown = pattern.masked_fill(future, float("nan"))  # blank, not 0: masked, not ignored
    image = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0)
    labels = [repr(t)[1:-1] for t in tokens]
    ax.set_xticks(range(len(tokens)), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(len(tokens)), labels, fontsize=8)
    ax.set_xlabel("key (source) token")
    ax.set_ylabel("query (destination) token")
    if title:
        ax.set_title(title)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
    return ax


def draw_attention_idea(
    tokens: Sequence[str] = ("The", " cat", " sat", " on", " the", " mat"),
    query: int = 3,
    weights: Sequence[float] = (0.10, 0.45, 0.35, 0.10),
) -> Any:
    """The idea of causal attention in two panels (illustrative weights, not a real model's).

    Left: one query token gathers information from itself and the tokens before
    it, each in proportion to its attention weight; later tokens are hidden.
    Right: the whole pattern, one row per query, with the future masked.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch

    n = len(tokens)
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.5, 1]}
    )
    for i, token in enumerate(tokens):
        future = i > query
        colour = "#bbbbbb" if future else "#1f4e79"
        left.text(
            i,
            0,
            token,
            ha="center",
            va="center",
            fontsize=13,
            color=colour,
            bbox={"boxstyle": "round", "fc": "#f2f2f2" if future else "#dbe9f6", "ec": colour},
        )
        if future:
            left.text(i, -0.35, "masked", ha="center", fontsize=9, color="#999999")
    left.text(
        query,
        1.25,
        f"{tokens[query]}",
        ha="center",
        va="center",
        fontsize=13,
        color="#7a1f1f",
        bbox={"boxstyle": "round", "fc": "#f8dede", "ec": "#7a1f1f"},
    )
    left.text(
        query + 0.55,
        1.25,
        "query: what should I look at?",
        va="center",
        fontsize=10,
        color="#7a1f1f",
    )
    for k, w in enumerate(weights[: query + 1]):
        arrow = FancyArrowPatch(
            (k, 0.18),
            (query, 1.07),
            arrowstyle="-|>",
            mutation_scale=12,
            lw=1 + 14 * w,
            color="#2e75b6",
            alpha=0.35 + 0.6 * w,
            connectionstyle="arc3,rad=-0.15",
        )
        left.add_patch(arrow)
        left.text(k + 0.22, 0.3, f"{w:.2f}", fontsize=9, color="#2e75b6")
    left.text(
        -0.5,
        -0.75,
        "keys and values: every token at or before the query offers its value,\n"
        "weighted by softmax(query . key / sqrt(d_head))",
        fontsize=9,
    )
    left.set_xlim(-0.7, n - 0.3)
    left.set_ylim(-1.0, 1.6)
    left.axis("off")
    left.set_title(f"one head, query {tokens[query]!r}: a weighted average of earlier values")

    # A plausible full pattern: each row sums to 1 over the keys it may see.
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(n, n, generator=g) * 1.2
    pattern = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(
        -1
    )
    pattern[query, : query + 1] = torch.tensor(list(weights[: query + 1]))
    plot_attention_pattern(
        pattern, tokens, ax=right, title="the pattern: rows sum to 1, future blank"
    )
    fig.tight_layout()
    return fig


def draw_residual_stream() -> Any:
    """A pre-LN transformer block: two branches that read the residual stream and add to it."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    fig, ax = plt.subplots(figsize=(7, 6.2))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 11)
    ax.axis("off")

    def box(x: float, y: float, text: str, colour: str) -> None:
        ax.add_patch(
            FancyBboxPatch(
                (x - 1.1, y - 0.4), 2.2, 0.8, boxstyle="round,pad=0.05", fc=colour, ec="#333333"
            )
        )
        ax.text(x, y, text, ha="center", va="center", fontsize=11)

    def arrow(a: tuple[float, float], b: tuple[float, float], rad: float = 0.0) -> None:
        ax.add_patch(
            FancyArrowPatch(
                a,
                b,
                arrowstyle="-|>",
                mutation_scale=14,
                lw=1.5,
                color="#333333",
                connectionstyle=f"arc3,rad={rad}",
            )
        )

    stream_x = 3.0
    ax.plot([stream_x, stream_x], [0.6, 10.2], color="#2e75b6", lw=6, alpha=0.35, zorder=0)
    arrow((stream_x, 9.6), (stream_x, 10.5))
    ax.text(stream_x, 0.2, "resid_pre", ha="center", fontsize=11)
    ax.text(stream_x, 10.6, "resid_post", ha="center", fontsize=11)
    ax.text(stream_x - 0.3, 5.5, "resid_mid", ha="right", va="center", fontsize=11)
    ax.text(0.2, 8.2, "the residual\nstream", fontsize=10, color="#2e75b6")
    for y0, ln, sub, colour, plus_y in [
        (1.5, "ln1", "attention", "#f8dede", 4.7),
        (6.2, "ln2", "MLP", "#e2f0d9", 9.2),
    ]:
        box(6.5, y0 + 0.6, ln, "#fff2cc")
        box(6.5, y0 + 2.0, sub, colour)
        arrow((stream_x, y0), (5.4, y0 + 0.6), rad=-0.2)
        arrow((6.5, y0 + 1.0), (6.5, y0 + 1.6))
        arrow((5.4, y0 + 2.0), (stream_x + 0.25, plus_y), rad=0.2)
        ax.add_patch(plt.Circle((stream_x, plus_y), 0.25, fc="white", ec="#333333", zorder=3))
        ax.text(stream_x, plus_y, "+", ha="center", va="center", fontsize=14, zorder=4)
    ax.set_title("a pre-LN block: each sublayer reads a normalised copy and adds its output back")
    fig.tight_layout()
    return fig
