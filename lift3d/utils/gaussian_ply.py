"""Reading and writing 3D Gaussians in the PLY layout of the reference 3DGS implementation.

"3D Gaussian Splatting for Real-Time Radiance Field Rendering" (Kerbl et al., SIGGRAPH 2023)
saves a binary little-endian PLY with one ``vertex`` element whose float properties are, in
order: ``x y z nx ny nz f_dc_0..2 f_rest_0..(3K-1) opacity scale_0..2 rot_0..3``. Values are
stored pre-activation (opacity as a logit, scales as logs, rotation as an unnormalised w,x,y,z
quaternion); ``f_rest`` is channel-major (all red coefficients, then green, then blue), which is
what Gaussian viewers (SIBR, SuperSplat, antimatter15/splat, ...) expect. Coordinates are written
in our world frame (+z up), unchanged.

:func:`read_ply_vertices` also reads plain point-cloud PLYs (ascii or binary, any scalar types) so
the geometry can be initialised from them. The geometry reads and writes this format itself
(``init: ply:PATH``, ``export_ply``), so it sits in ``utils`` rather than with the exporters.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


def gaussian_ply_fields(n_rest_coeffs: int) -> list[str]:
    """Property names of the 3DGS layout for ``n_rest_coeffs`` = (deg+1)^2 - 1 coefficients per channel."""
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    names += [f"f_rest_{i}" for i in range(3 * n_rest_coeffs)]
    names += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    return names


def write_gaussian_ply(path: str | Path, xyz: np.ndarray, f_dc: np.ndarray, f_rest: np.ndarray, opacity: np.ndarray,
                       scale: np.ndarray, rotation: np.ndarray) -> None:
    """Write Gaussians as a 3DGS PLY.

    xyz [N, 3]; f_dc [N, 3] (SH degree-0 per channel); f_rest [N, K, 3] (higher SH, K may be 0);
    opacity [N, 1] or [N] (logit); scale [N, 3] (log); rotation [N, 4] (w, x, y, z).
    """
    xyz = np.asarray(xyz, dtype=np.float32).reshape(-1, 3)
    n = xyz.shape[0]
    f_rest = np.asarray(f_rest, dtype=np.float32).reshape(n, -1, 3)
    k = f_rest.shape[1]
    cols = [
        xyz,
        np.zeros((n, 3), np.float32),
        np.asarray(f_dc, dtype=np.float32).reshape(n, 3),
        np.ascontiguousarray(f_rest.transpose(0, 2, 1)).reshape(n, 3 * k),  # channel-major, as 3DGS
        np.asarray(opacity, dtype=np.float32).reshape(n, 1),
        np.asarray(scale, dtype=np.float32).reshape(n, 3),
        np.asarray(rotation, dtype=np.float32).reshape(n, 4),
    ]
    data = np.concatenate(cols, axis=1).astype("<f4")
    names = gaussian_ply_fields(k)
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    header += [f"property float {nm}" for nm in names]
    header += ["end_header"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(("\n".join(header) + "\n").encode("ascii"))
        fh.write(np.ascontiguousarray(data).tobytes())


def _parse_header(fh) -> tuple[str, list[tuple[str, int, list[tuple[str, str]]]]]:
    first = fh.readline().strip()
    if first != b"ply":
        raise ValueError(f"not a PLY file (first line {first!r})")
    fmt = None
    elements: list[tuple[str, int, list[tuple[str, str]]]] = []
    while True:
        line = fh.readline()
        if not line:
            raise ValueError("PLY header has no end_header")
        parts = line.decode("ascii", errors="replace").split()
        if not parts or parts[0] in ("comment", "obj_info"):
            continue
        if parts[0] == "format":
            fmt = parts[1]
        elif parts[0] == "element":
            elements.append((parts[1], int(parts[2]), []))
        elif parts[0] == "property":
            if not elements:
                raise ValueError("PLY property before any element")
            if parts[1] == "list":
                elements[-1][2].append((parts[-1], "list:" + parts[2] + ":" + parts[3]))
            else:
                if parts[1] not in _PLY_TYPES:
                    raise ValueError(f"unknown PLY property type {parts[1]!r}")
                elements[-1][2].append((parts[2], _PLY_TYPES[parts[1]]))
        elif parts[0] == "end_header":
            break
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise ValueError(f"unsupported PLY format {fmt!r}")
    return fmt, elements


def read_ply_vertices(path: str | Path) -> dict[str, np.ndarray]:
    """The ``vertex`` element of a PLY as {property name: [N] array}; elements before it must be list-free."""
    with open(path, "rb") as fh:
        fmt, elements = _parse_header(fh)
        for name, count, props in elements:
            if any(t.startswith("list:") for _, t in props):
                if name == "vertex":
                    raise ValueError("PLY vertex element with list properties is not supported")
                if fmt != "ascii":
                    raise ValueError(f"PLY element {name!r} before 'vertex' has list properties; cannot skip it")
            if fmt == "ascii":
                rows = [fh.readline().split() for _ in range(count)]
                if name == "vertex":
                    arr = np.array(rows, dtype=np.float64).reshape(count, len(props))
                    return {p: arr[:, i].astype(t) for i, (p, t) in enumerate(props)}
            else:
                end = "<" if fmt == "binary_little_endian" else ">"
                dt = np.dtype([(p, end + t) for p, t in props])
                data = np.frombuffer(fh.read(dt.itemsize * count), dtype=dt, count=count)
                if name == "vertex":
                    return {p: data[p].astype(data[p].dtype.newbyteorder("=")) for p, _ in props}
    raise ValueError(f"PLY file {path} has no 'vertex' element")


def read_gaussian_ply(path: str | Path) -> dict[str, np.ndarray]:
    """Read a 3DGS PLY: xyz [N,3], f_dc [N,3], f_rest [N,K,3], opacity [N,1], scale [N,3], rotation [N,4] (float32)."""
    v = read_ply_vertices(path)
    missing = [k for k in ("x", "f_dc_0", "opacity", "scale_0", "rot_0") if k not in v]
    if missing:
        raise ValueError(f"{path} is not a 3D Gaussian PLY: missing properties {', '.join(missing)}")
    col = lambda names: np.stack([v[k] for k in names], axis=-1).astype(np.float32)  # noqa: E731
    n = v["x"].shape[0]
    rest_names = sorted((k for k in v if k.startswith("f_rest_")), key=lambda s: int(s.split("_")[-1]))
    if len(rest_names) % 3:
        raise ValueError(f"{path}: {len(rest_names)} f_rest properties is not a multiple of 3")
    k = len(rest_names) // 3
    f_rest = col(rest_names).reshape(n, 3, k).transpose(0, 2, 1) if k else np.zeros((n, 0, 3), np.float32)
    return {
        "xyz": col(["x", "y", "z"]),
        "f_dc": col(["f_dc_0", "f_dc_1", "f_dc_2"]),
        "f_rest": np.ascontiguousarray(f_rest),
        "opacity": col(["opacity"]),
        "scale": col(["scale_0", "scale_1", "scale_2"]),
        "rotation": col(["rot_0", "rot_1", "rot_2", "rot_3"]),
    }


__all__ = ["gaussian_ply_fields", "write_gaussian_ply", "read_gaussian_ply", "read_ply_vertices"]
