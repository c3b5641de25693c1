"""The best torch device this machine has: CUDA, then Apple's MPS, then the CPU."""

from __future__ import annotations

from typing import Any, Optional


def best_device(name: Optional[str] = None) -> Any:
    """``name`` as a torch.device; None or 'auto': CUDA when torch sees it, else MPS when available, else the CPU."""
    import torch

    if name and name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
