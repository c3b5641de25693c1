"""Guidance base class: a prior that scores renders and returns loss terms.

``forward(rgb [B,H,W,3] in [0,1], prompt_utils, **batch) -> dict``. Keys starting with ``loss_``
are loss terms; the system weights ``loss_X`` by ``system.loss.lambda_X``. Other keys are
diagnostics (logged, never backpropagated). A guidance never steps an optimizer it does not own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lift3d.utils.base import BaseModule


class BaseGuidance(BaseModule):
    category = "guidance"
    #: Whether the system should also pass the render's normal map / opacity.
    wants_normals: bool = False

    @dataclass
    class Config:
        pass

    def forward(self, rgb: Tensor, prompt_utils: Any = None, **batch: Any) -> dict[str, Any]:
        raise NotImplementedError
