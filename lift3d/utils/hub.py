"""Finding pretrained weights on this machine: a local folder or the Hugging Face cache, never the network.

Every module that loads real weights (Stable Diffusion, DeepFloyd IF, MVDream, Zero123, Point-E)
resolves its ``pretrained_model_name_or_path``-style setting here, so users read one kind of
message when weights are missing: the setting, the id, the folders searched, and the one command
that fetches the weights on a machine with internet. Nothing here downloads: lift3d runs where
the network may be absent, and a half-finished multi-gigabyte download at start-up helps nobody.

Only ``huggingface_hub`` is imported (lazily), never diffusers or transformers.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lift3d.config import ConfigError

__all__ = ["MissingWeightsError", "ResolvedWeights", "resolve_weights", "hub_cache_dir", "download_command"]


class MissingWeightsError(ConfigError):
    """Pretrained weights named by the config are not on this machine (a start-up error, exit 2)."""


@dataclass(frozen=True)
class ResolvedWeights:
    path: Path
    """The folder holding the weights (a local folder, or the snapshot folder in the cache)."""
    source: str
    """``local folder`` or ``Hugging Face cache``: for messages and logs."""


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as huggingface_hub resolves it (``HF_HUB_CACHE``, ``HF_HOME``/hub, ...)."""
    from huggingface_hub import constants

    # Read the environment now, not at huggingface_hub's import: a launcher or test may set it later.
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE).expanduser()


def download_command(repo_id: str, revision: str | None = None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return f"hf download {repo_id}{rev}"


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _looks_like_path(name: str) -> bool:
    """Not a hub id (``owner/name`` or a bare legacy ``name``): a path the user meant as a folder."""
    return _HUB_ID.fullmatch(name) is None or name.endswith((".", "-"))


def resolve_weights(
    name_or_path: str,
    *,
    key: str,
    required: Sequence[str] = (),
    revision: str | None = None,
    gated_url: str | None = None,
) -> ResolvedWeights:
    """The folder that holds ``name_or_path``'s weights, or a :class:`MissingWeightsError`.

    Args:
        name_or_path: a local folder, or a hub id (``owner/name``) looked up in the local cache only.
        key: the config key that set it (``system.guidance.pretrained_model_name_or_path``), for messages.
        required: files the folder must hold, relative to it (``model_index.json``, ``unet/config.json``).
        revision: a hub revision (branch, tag or commit) to look up in the cache.
        gated_url: for gated models (DeepFloyd IF), the page where the licence is accepted.
    """
    if not name_or_path:
        raise MissingWeightsError(f"config key '{key}' is empty: give a local folder or a Hugging Face model id")
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        _check_required(local, required, key, name_or_path, "local folder")
        return ResolvedWeights(local.resolve(), "local folder")
    if _looks_like_path(name_or_path):
        raise MissingWeightsError(
            f"config key '{key}' = {name_or_path!r}: no such folder ({local.resolve()}); give the folder that "
            "holds the weights, or a Hugging Face model id such as 'owner/name'")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        # local_files_only: the cache is read, the network never touched (HF_HUB_OFFLINE or not).
        folder = Path(snapshot_download(name_or_path, revision=revision, local_files_only=True, cache_dir=cache))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        gated = (f" The model is gated: accept its licence at {gated_url} while logged in (`hf auth login`) "
                 "before downloading.") if gated_url else ""
        raise MissingWeightsError(
            f"config key '{key}' = {name_or_path!r}: the weights are not on this machine (searched: the local "
            f"folder {local.resolve()}, and the Hugging Face cache {cache}; set HF_HOME or HF_HUB_CACHE to look "
            f"elsewhere). lift3d never downloads at start-up: fetch them once with `{download_command(name_or_path, revision)}` "
            f"on a machine with internet (then copy the cache folder here), or point {key}= at a folder that "
            f"holds them.{gated}") from None
    _check_required(folder, required, key, name_or_path, "Hugging Face cache")
    return ResolvedWeights(folder, "Hugging Face cache")


def _check_required(folder: Path, required: Sequence[str], key: str, name: str, source: str) -> None:
    missing = [r for r in required if not (folder / r).exists()]
    if missing:
        raise MissingWeightsError(
            f"config key '{key}' = {name!r}: the {source} {folder} lacks {', '.join(missing)}; it is not a "
            "complete model folder in the expected (diffusers) layout, or its download was interrupted")
