"""Prompt processors: embeddings, view-dependent prompts, negative prompts, Perp-Neg, disk cache.

The public names live in :mod:`lift3d.prompts.base` (``PromptUtils``, ``BasePromptProcessor``,
``ViewDirection``...); the toy world's processor is in :mod:`lift3d.prompts.toyworld`. This package
imports nothing itself, so ``import lift3d`` stays cheap.
"""
