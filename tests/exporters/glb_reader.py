"""A hand-written reader for binary glTF, independent of trimesh's loader (shared by the exporter tests)."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def read_glb(path: Path) -> tuple[dict, bytes]:
    """The JSON and BIN chunks of a binary glTF, parsed by hand (independent of trimesh's loader)."""
    data = Path(path).read_bytes()
    magic, version, length = struct.unpack_from("<4sII", data, 0)
    assert magic == b"glTF" and version == 2 and length == len(data)
    off, chunks = 12, {}
    while off < length:
        clen, ctype = struct.unpack_from("<I4s", data, off)
        chunks[ctype] = data[off + 8 : off + 8 + clen]
        off += 8 + clen
    return json.loads(chunks[b"JSON"]), chunks[b"BIN\x00"]


def glb_accessor(js: dict, blob: bytes, index: int) -> np.ndarray:
    acc = js["accessors"][index]
    view = js["bufferViews"][acc["bufferView"]]
    assert "byteStride" not in view, "interleaved buffers are not handled by this test reader"
    dtype = {5126: np.float32, 5125: np.uint32, 5123: np.uint16, 5121: np.uint8}[acc["componentType"]]
    n = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}[acc["type"]]
    start = view.get("byteOffset", 0) + acc.get("byteOffset", 0)
    return np.frombuffer(blob, dtype, count=acc["count"] * n, offset=start).reshape(acc["count"], n)


def glb_image(js: dict, blob: bytes, texture_index: int) -> np.ndarray:
    img = js["images"][js["textures"][texture_index]["source"]]
    view = js["bufferViews"][img["bufferView"]]
    start = view.get("byteOffset", 0)
    return np.asarray(Image.open(io.BytesIO(blob[start : start + view["byteLength"]])))
