"""What every notebook's first cell calls: the device, whose code runs, the reference's mode."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from gpt2_course import parts


def device() -> torch.device:
    """The fastest device here: a CUDA GPU, then Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def setup(show_reference: bool = True) -> None:
    """Print where the code under test comes from and which reference it is checked against."""
    torch.set_grad_enabled(True)
    if parts.solutions_everywhere():
        print("Running the REFERENCE SOLUTIONS (GPT2_COURSE_SOLUTIONS=1): solutions/*.py")
    else:
        print("Running YOUR code from gpt2_course/exercises/ (edits are picked up automatically).")
    print(f"Device for training and generation: {device()}")
    if show_reference:
        from gpt2_course.reference import get_reference

        print(get_reference().describe())


def environment_report() -> str:
    """Versions, device and offline switches: what to paste into a question to an instructor."""
    import os
    import platform
    import sys
    from importlib.metadata import PackageNotFoundError, version

    from gpt2_course.reference import offline_forced
    from gpt2_course.tokenizer import cache_dir

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    here = device()
    if here.type == "cuda":
        accelerator = f"cuda ({torch.cuda.get_device_name(0)})"
    else:
        accelerator = here.type
    rows = [
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("torch", torch.__version__),
        ("transformer_lens", installed("transformer-lens")),
        ("transformers", installed("transformers")),
        ("einops / jaxtyping", f"{installed('einops')} / {installed('jaxtyping')}"),
        ("device", accelerator),
        ("CPU threads used by torch", str(torch.get_num_threads())),
        ("GPT2_COURSE_OFFLINE", os.environ.get("GPT2_COURSE_OFFLINE", "(not set)")),
        ("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "(not set)")),
        ("offline forced", "yes" if offline_forced() else "no"),
        ("GPT2_COURSE_SOLUTIONS", os.environ.get("GPT2_COURSE_SOLUTIONS", "(not set)")),
        (
            "parts come from",
            "solutions/" if parts.solutions_everywhere() else "gpt2_course/exercises/",
        ),
        ("course cache", str(cache_dir())),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


@contextmanager
def your_code(*components: str) -> Iterator[None]:
    """Run a cell that uses your components; a stub not written yet prints a note, not a traceback.

    With the reference solutions everywhere (CI) nothing is caught: there a
    NotImplementedError would be a bug in the course.
    """
    try:
        yield
    except NotImplementedError as error:
        if parts.solutions_everywhere():
            raise
        names = ", ".join(components) or "one of your components"
        print(
            f"Not yet: this cell uses {names}, and your code said: {error}\n"
            "Come back after the exercise, or continue with the reference solution with "
            "parts.use_solution(...)."
        )


def expect(condition: object, message: str) -> None:
    """Assert what a cell shows, but only when the reference solutions run everywhere (CI).

    There a broken solution must fail the notebook run; a learner's unfinished code instead
    sees the cell's own printout (a failing check, a False), not an AssertionError.
    """
    if parts.solutions_everywhere() and not condition:
        raise AssertionError(message)


# Which notebook builds each box of the diagram, and the boxes each topic highlights.
_NOTEBOOK_OF = {
    "Embedding": "01",
    "PositionalEmbedding": "01",
    "Unembedding": "01",
    "LayerNorm": "02",
    "ln_final": "02",
    "MultiHeadAttention": "03",
    "MLP": "04",
    "TransformerBlock": "04",
}
_HIGHLIGHTS = {
    "embeddings": {"Embedding", "PositionalEmbedding", "Unembedding"},
    "layernorm": {"LayerNorm", "ln_final"},
    "attention": {"MultiHeadAttention"},
    "mlp": {"MLP"},
    "block": {"TransformerBlock", "LayerNorm", "MultiHeadAttention", "MLP"},
    "transformer": set(_NOTEBOOK_OF),
}


def draw_gpt2(highlight: str | None = None):
    """Draw GPT-2 small: the residual stream flowing up through 12 pre-LN blocks.

    `highlight` (e.g. "embeddings", "layernorm", "attention", "mlp", "block")
    colours the boxes that topic builds. Returns the matplotlib figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle, FancyBboxPatch

    if highlight is not None and highlight not in _HIGHLIGHTS:
        raise ValueError(f"highlight must be one of {sorted(_HIGHLIGHTS)}, not {highlight!r}")
    lit = _HIGHLIGHTS.get(highlight, set())
    fig, ax = plt.subplots(figsize=(7.5, 9.5))
    ax.set_xlim(0, 10)
    ax.set_ylim(-0.3, 15.6)
    ax.axis("off")
    resid_x = 4.2
    arrow = dict(arrowstyle="-|>", color="#444", lw=1.3, shrinkA=0, shrinkB=0)

    def box(x0: float, y0: float, w: float, h: float, kind: str, text: str) -> None:
        colour = "#ffd166" if kind in lit else ("#e9ecef" if kind else "#ffffff")
        ax.add_patch(
            FancyBboxPatch(
                (x0, y0),
                w,
                h,
                boxstyle="round,pad=0.03,rounding_size=0.15",
                facecolor=colour,
                edgecolor="#333",
                lw=1.2,
                zorder=3,
            )
        )
        ax.text(x0 + w / 2, y0 + h / 2, text, ha="center", va="center", fontsize=9, zorder=4)
        if kind in _NOTEBOOK_OF:
            ax.text(
                x0 + w + 0.12,
                y0 + h / 2,
                _NOTEBOOK_OF[kind],
                fontsize=8,
                color="#888",
                va="center",
                zorder=4,
            )

    def plus(y: float) -> None:
        ax.add_patch(Circle((resid_x, y), 0.22, facecolor="white", edgecolor="#333", zorder=5))
        ax.text(resid_x, y, "+", ha="center", va="center", fontsize=12, zorder=6)

    def branch(y_from: float, y_to: float, first: tuple[str, str], second: tuple[str, str]) -> None:
        """A sublayer: LayerNorm then attention/MLP, read from and added back to the stream."""
        side = 7.0
        ax.plot([resid_x, side], [y_from, y_from], color="#444", lw=1.3, zorder=2)
        ax.annotate("", (side, y_from + 0.4), (side, y_from), arrowprops=arrow)
        box(side - 1.25, y_from + 0.4, 2.5, 0.7, first[0], first[1])
        ax.annotate("", (side, y_from + 1.5), (side, y_from + 1.1), arrowprops=arrow)
        box(side - 1.25, y_from + 1.5, 2.5, 0.9, second[0], second[1])
        ax.plot([side, side], [y_from + 2.4, y_to], color="#444", lw=1.3, zorder=2)
        ax.annotate("", (resid_x + 0.22, y_to), (side, y_to), arrowprops=arrow)
        plus(y_to)

    # tokens and the two embeddings
    box(2.7, -0.2, 3.0, 0.7, "", "token ids  [batch, pos]")
    box(0.3, 1.2, 3.0, 0.9, "Embedding", "Embedding\nW_E [50257, 768]")
    box(5.2, 1.2, 3.3, 0.9, "PositionalEmbedding", "PositionalEmbedding\nW_pos [1024, 768]")
    ax.annotate("", (1.8, 1.2), (3.6, 0.5), arrowprops=arrow)
    ax.annotate("", (6.8, 1.2), (4.8, 0.5), arrowprops=arrow)
    plus(2.8)
    ax.annotate("", (resid_x - 0.2, 2.72), (1.8, 2.1), arrowprops=arrow)
    ax.annotate("", (resid_x + 0.2, 2.72), (6.8, 2.1), arrowprops=arrow)

    # the residual stream and one block, repeated 12 times
    ax.plot([resid_x, resid_x], [3.02, 12.0], color="#4d96ff", lw=4, zorder=1, alpha=0.6)
    ax.text(
        resid_x - 0.35,
        7.4,
        "residual stream  [batch, pos, 768]",
        rotation=90,
        ha="center",
        va="center",
        fontsize=9,
        color="#1d5fbf",
    )
    frame = "block" if "TransformerBlock" in lit else ""
    ax.add_patch(
        FancyBboxPatch(
            (0.4, 3.4),
            9.2,
            7.9,
            boxstyle="round,pad=0.05,rounding_size=0.3",
            facecolor="#fff6da" if frame else "none",
            edgecolor="#888",
            ls="--",
            lw=1.2,
            zorder=0,
        )
    )
    ax.text(0.7, 11.0, "TransformerBlock  × 12  (04)", fontsize=9, color="#555")
    branch(
        3.8,
        6.9,
        ("LayerNorm", "ln1: LayerNorm"),
        ("MultiHeadAttention", "MultiHeadAttention\n12 heads × 64"),
    )
    branch(7.3, 10.4, ("LayerNorm", "ln2: LayerNorm"), ("MLP", "MLP\n768 → 3072 → 768"))

    # the top of the model
    box(2.7, 12.0, 3.0, 0.7, "ln_final", "ln_final: LayerNorm")
    ax.annotate("", (resid_x, 13.2), (resid_x, 12.7), arrowprops=arrow)
    box(2.5, 13.2, 3.4, 0.9, "Unembedding", "Unembedding\nW_U [768, 50257], b_U")
    ax.annotate("", (resid_x, 14.6), (resid_x, 14.1), arrowprops=arrow)
    ax.text(
        resid_x,
        14.9,
        "logits  [batch, pos, 50257]: a score for every next token",
        ha="center",
        va="center",
        fontsize=9,
    )
    title = "GPT-2 small" + (": this notebook builds the yellow boxes" if lit else "")
    ax.set_title(title, fontsize=11)
    fig.tight_layout()
    return fig
