"""The toy world: an embedded, laptop-sized stand-in for the internet-scale priors of text-to-3D.

Thirty-three objects (five primitives in six colours, plus a snowman, a chair and a mug that
have a front and a back) defined once as exact SDFs with albedo (``shapes``), an exact sphere
tracer that renders them (``render``), the training data of the toy diffusion prior
(``data``) and its closed vocabulary (``vocab``). The ground truth they provide also drives
the ``toyworld-reference-guidance`` oracle and the evaluations.

The names below are the common entry points; the renderer is
``lift3d.priors.toyworld.render.render`` (not re-exported here, so that the name ``render`` keeps
meaning the submodule) and the data pipeline lives in ``lift3d.priors.toyworld.data``.
"""

from lift3d.priors.toyworld.shapes import CATALOGUE, ToyObject, get_object, list_prompts
from lift3d.priors.toyworld.vocab import ObjectSpec, UnknownPromptError, parse_prompt, tokenize

__all__ = [
    "CATALOGUE",
    "ToyObject",
    "get_object",
    "list_prompts",
    "ObjectSpec",
    "UnknownPromptError",
    "parse_prompt",
    "tokenize",
]
