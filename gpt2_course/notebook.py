"""What every notebook's first cell calls: the device, whose code runs, the reference's mode."""

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
