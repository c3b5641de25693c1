"""The on-disk cache of text embeddings, shared by runs (and by processes running at once).

Encoding a prompt with a large text encoder means loading that encoder, which costs far more than
the encoding; a second run with the same prompt should not pay it. One file per (encoder, text):
``<cache_dir>/<sha256 of encoder_id>/<sha256 of text>.safetensors``, holding the tensor under the
key ``embedding`` and the text and encoder id in its metadata.

Decisions:
- Reads verify the stored text and encoder id, so a hash collision or a hand-copied file can never
  hand back another prompt's embedding; a mismatch, like a truncated or unreadable file, counts as
  a miss and the entry is recomputed and overwritten. The cache never makes a run fail: a folder
  that cannot be written only costs the caching (with a warning).
- Writes go to a temporary file in the same folder and are moved into place with ``os.replace``,
  which is atomic on one file system: a reader sees the old file or the new one, never half of
  one, and two processes writing the same key leave one of their (identical) files.
- safetensors rather than ``torch.save``: loading a cache file runs no pickle.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from contextlib import suppress
from pathlib import Path

from torch import Tensor

log = logging.getLogger(__name__)

#: Environment variable naming lift3d's cache root (overrides XDG_CACHE_HOME).
CACHE_ENV = "LIFT3D_CACHE"
#: Bumped if the file layout changes; files of another format are recomputed.
CACHE_FORMAT = "lift3d-text-embedding-1"
_TENSOR_KEY = "embedding"


def user_cache_root() -> Path:
    """lift3d's cache root: ``$LIFT3D_CACHE``, else ``$XDG_CACHE_HOME/lift3d``, else ``~/.cache/lift3d``."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lift3d"


def default_text_embedding_dir() -> Path:
    """Where text embeddings are cached unless a processor's ``cache_dir`` says otherwise."""
    return user_cache_root() / "text_embeddings"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """Text -> embedding tensor files for one encoder under ``root``."""

    def __init__(self, root: str | os.PathLike, encoder_id: str):
        self.root = Path(root).expanduser()
        self.encoder_id = encoder_id
        self.folder = self.root / _sha256(encoder_id)

    def path(self, text: str) -> Path:
        """The file that holds (or would hold) ``text``'s embedding."""
        return self.folder / f"{_sha256(text)}.safetensors"

    def load(self, text: str) -> Tensor | None:
        """The cached embedding of ``text`` (on the CPU), or None when absent, stale or unreadable."""
        from safetensors import safe_open

        path = self.path(text)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if (meta.get("format") != CACHE_FORMAT or meta.get("encoder_id") != self.encoder_id
                        or meta.get("text") != text):
                    log.warning("text-embedding cache file %s belongs to another text or encoder; recomputing", path)
                    return None
                return f.get_tensor(_TENSOR_KEY)
        except Exception as exc:  # truncated, garbage, missing tensor: all mean "recompute"
            log.warning("text-embedding cache file %s is unreadable (%s); recomputing", path, exc)
            return None

    def save(self, text: str, embedding: Tensor) -> bool:
        """Store ``embedding`` for ``text`` atomically; False (with a warning) if it could not be written."""
        from safetensors.torch import save_file

        tensor = embedding.detach().cpu().contiguous()
        meta = {"format": CACHE_FORMAT, "encoder_id": self.encoder_id, "text": text}
        tmp: str | None = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=self.folder)
            os.close(fd)
            save_file({_TENSOR_KEY: tensor}, tmp, metadata=meta)
            # mkstemp makes owner-only files; a cache shared between users needs them readable.
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path(text))
            tmp = None
            return True
        except Exception as exc:  # a full or read-only disk must not stop the run
            log.warning("could not write the text-embedding cache in %s (%s); continuing without it", self.folder, exc)
            return False
        finally:
            if tmp is not None:
                with suppress(OSError):
                    os.unlink(tmp)


__all__ = ["CACHE_ENV", "CACHE_FORMAT", "EmbeddingCache", "user_cache_root", "default_text_embedding_dir"]
