"""The general text-to-3D system: guidance losses plus the shared regularizers, with stages.

Recipes (DreamFusion, Magic3D, Fantasia3D, ...) are configs of this system; a recipe that needs
its own step logic subclasses BaseSystem in a file of its own.
"""

from __future__ import annotations

from lift3d.registry import register
from lift3d.systems.base import BaseSystem


@register("text-to-3d-system")
class TextTo3DSystem(BaseSystem):
    """Renders random cameras, scores them with the guidance, adds weighted regularizers."""
