"""Hash-grid and frequency encodings: values against a scalar reference, gradients, progressive band."""

from __future__ import annotations

import math

import pytest
import torch

from lift3d.backends import tcnn_backend
from lift3d.geometry.encodings import FrequencyEncoding, HashGridEncoding, get_encoding


PRIMES = (1, 2654435761, 805459861)


def reference_encode(enc: HashGridEncoding, x: torch.Tensor, base_res: int, pls: float, log2_T: int) -> torch.Tensor:
    """Point-by-point, level-by-level, corner-by-corner Python evaluation from the definition."""
    T = 1 << log2_T
    table = enc.embeddings.detach().double()  # [F, M]
    out = torch.zeros(x.shape[0], enc.n_levels * enc.n_features_per_level, dtype=torch.float64)
    for lv in range(enc.n_levels):
        scale = base_res * pls**lv - 1.0
        res = math.ceil(scale) + 2
        rp = 1 << (res - 1).bit_length()
        dense = rp**3 <= T
        offset = int(enc.offsets.view(-1)[lv])
        for n in range(x.shape[0]):
            pos = [float(x[n, d]) * scale + 0.5 for d in range(3)]
            cell = [math.floor(p) for p in pos]
            frac = [p - c for p, c in zip(pos, cell)]
            for corner in range(8):
                bits = [(corner >> d) & 1 for d in range(3)]
                c = [cell[d] + bits[d] for d in range(3)]
                if dense:
                    idx = c[0] + c[1] * rp + c[2] * rp * rp
                    assert idx < rp**3
                else:
                    idx = ((c[0] * PRIMES[0]) ^ (c[1] * PRIMES[1]) ^ (c[2] * PRIMES[2])) % T
                w = 1.0
                for d in range(3):
                    w *= frac[d] if bits[d] else 1.0 - frac[d]
                F = enc.n_features_per_level
                out[n, lv * F : (lv + 1) * F] += w * table[:, offset + idx]
    return out


def small_grid(**kw):
    cfg = dict(n_levels=6, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4, per_level_scale=1.7)
    cfg.update(kw)
    torch.manual_seed(0)
    enc = HashGridEncoding(**cfg)
    with torch.no_grad():
        enc.embeddings.uniform_(-1, 1)  # make every entry matter
    return enc, cfg


def test_hashgrid_matches_scalar_reference_dense_and_hashed_levels():
    enc, cfg = small_grid(chunk_size=7)  # odd chunk size exercises the chunk loop
    # Levels 0-1 fit the 1024-entry table densely, finer ones are hashed.
    assert enc.level_sizes[0] < 1024 and enc.level_sizes[-1] == 1024
    x = torch.rand(23, 3)
    x[0] = torch.tensor([0.0, 1.0, 0.5])  # box faces
    ref = reference_encode(enc, x, cfg["base_resolution"], cfg["per_level_scale"], cfg["log2_hashmap_size"])
    with torch.no_grad():
        fast = enc(x)
    torch.testing.assert_close(fast.double(), ref, atol=1e-5, rtol=1e-5)
    # The differentiable path (taken when points need gradients) gives the same values.
    slow = enc(x.clone().requires_grad_(True))
    torch.testing.assert_close(slow.detach(), fast)


def table_grad(enc: HashGridEncoding, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """d(sum(enc(x) * g)) / d(table); points needing gradients take the plain autograd path."""
    enc.embeddings.grad = None
    (enc(x) * g).sum().backward()
    return enc.embeddings.grad.clone()


def assert_table_grad_matches_autograd(enc: HashGridEncoding, x: torch.Tensor) -> None:
    g = torch.randn(x.shape[0], enc.n_output_dims)
    fast_grad = table_grad(enc, x, g)
    torch.testing.assert_close(fast_grad, table_grad(enc, x.clone().requires_grad_(True), g), atol=1e-5, rtol=1e-5)
    assert fast_grad.abs().sum() > 0


def test_hashgrid_table_gradient_fast_equals_autograd():
    enc, _ = small_grid(chunk_size=16)
    assert_table_grad_matches_autograd(enc, torch.rand(100, 3))


@pytest.mark.parametrize("n_features", [1, 3, 4])
def test_hashgrid_any_feature_count_matches_reference_and_autograd(n_features):
    # 1 and 3 channels take the one-real-row-per-channel path, 4 packs two complex rows.
    enc, cfg = small_grid(n_features_per_level=n_features, chunk_size=7)
    x = torch.rand(23, 3)
    ref = reference_encode(enc, x, cfg["base_resolution"], cfg["per_level_scale"], cfg["log2_hashmap_size"])
    with torch.no_grad():
        torch.testing.assert_close(enc(x).double(), ref, atol=1e-5, rtol=1e-5)
    assert_table_grad_matches_autograd(enc, x)


@pytest.mark.parametrize("n_features", [2, 3])
def test_hashgrid_backward_recomputes_corners_beyond_the_save_budget(monkeypatch, n_features):
    from lift3d.geometry.encodings import _HashGridFunction

    enc, _ = small_grid(n_features_per_level=n_features, chunk_size=16)
    x = torch.rand(100, 3)
    g = torch.randn(100, enc.n_output_dims)
    kept = table_grad(enc, x, g)
    monkeypatch.setattr(_HashGridFunction, "SAVE_BUDGET_BYTES", 0)
    torch.testing.assert_close(table_grad(enc, x, g), kept, atol=1e-6, rtol=1e-6)


def test_hashgrid_gradcheck_float64():
    enc = HashGridEncoding(n_levels=2, n_features_per_level=2, log2_hashmap_size=5, base_resolution=2,
                           per_level_scale=2.0, chunk_size=5).double()
    x = torch.rand(9, 3, dtype=torch.float64) * 0.9 + 0.05
    table = enc.embeddings.detach().clone().requires_grad_(True)

    def via_table(t):
        from lift3d.geometry.encodings import _HashGridFunction

        return _HashGridFunction.apply(x.t().contiguous(), t, enc)

    assert torch.autograd.gradcheck(via_table, (table,), eps=1e-6, atol=1e-6)
    xr = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: enc(p), (xr,), eps=1e-7, atol=1e-5)


def test_hashgrid_input_gradient_supports_double_backward():
    enc, _ = small_grid()
    x = torch.rand(10, 3, requires_grad=True)
    y = enc(x).pow(2).sum()
    (gx,) = torch.autograd.grad(y, x, create_graph=True)
    gx.pow(2).sum().backward()  # eikonal-style second order reaches the table
    assert enc.embeddings.grad is not None and enc.embeddings.grad.abs().sum() > 0


def test_progressive_band_masks_fine_levels():
    enc = get_encoding(3, {"otype": "ProgressiveBandHashGrid", "n_levels": 4, "n_features_per_level": 2,
                           "log2_hashmap_size": 10, "base_resolution": 4, "per_level_scale": 1.5,
                           "start_level": 2, "start_step": 10, "update_steps": 5}, backend="torch")
    with torch.no_grad():
        enc.embeddings.uniform_(-1, 1)
    x = torch.rand(50, 3)
    enc.update_step(0, 0)
    out = enc(x)
    assert out[:, 4:].abs().max() == 0 and out[:, :4].abs().max() > 0
    out.sum().backward()
    # No gradient reaches the masked levels' table blocks.
    sizes, offs = enc.level_sizes, enc.offsets.view(-1).tolist()
    for lv in (2, 3):
        assert enc.embeddings.grad[:, offs[lv] : offs[lv] + sizes[lv]].abs().max() == 0
    enc.update_step(0, 15)  # 2 + (15 - 10) // 5 = 3 levels
    assert enc(x)[:, 6:].abs().max() == 0 and enc(x)[:, 4:6].abs().max() > 0
    enc.update_step(0, 100)
    assert enc(x)[:, 6:].abs().max() > 0


def test_frequency_encoding_values_and_masking():
    enc = FrequencyEncoding(3, n_frequencies=4, include_input=True)
    x = torch.rand(5, 3)
    out = enc(x)
    assert out.shape == (5, 3 + 3 * 4 * 2) and enc.n_output_dims == 27
    torch.testing.assert_close(out[:, :3], x)
    # Frequency k=2, sine, dim 1.
    torch.testing.assert_close(out[:, 3 + (2 * 2 + 0) * 3 + 1], torch.sin(4 * math.pi * x[:, 1]))
    pb = get_encoding(3, {"otype": "ProgressiveBandFrequency", "n_frequencies": 4, "n_masking_step": 100})
    pb.update_step(0, 0)
    assert pb(x).abs().max() == 0
    pb.update_step(0, 100)
    torch.testing.assert_close(pb(x), enc(x)[:, 3:])


def test_get_encoding_rejects_unknown_keys_and_types():
    with pytest.raises(ValueError, match="n_levls"):
        get_encoding(3, {"otype": "HashGrid", "n_levls": 4})
    with pytest.raises(ValueError, match="otype"):
        get_encoding(3, {"otype": "Bogus"})


@pytest.mark.skipif(not torch.cuda.is_available() or not tcnn_backend.available(),
                    reason="tiny-cuda-nn parity needs CUDA and tinycudann")
def test_tcnn_encoding_matches_torch_interface_and_trains():
    cfg = {"otype": "HashGrid", "n_levels": 8, "n_features_per_level": 2, "log2_hashmap_size": 15,
           "base_resolution": 16, "per_level_scale": 1.447269237440378}
    t_enc = get_encoding(3, cfg, backend="tcnn").cuda()
    r_enc = get_encoding(3, cfg, backend="torch").cuda()
    x = torch.rand(4096, 3, device="cuda")
    assert t_enc(x).shape == r_enc(x).shape
    # Both fit the same smooth target equally well (table layouts differ, so values cannot match).
    target = torch.sin(6 * x).sum(-1, keepdim=True)
    losses = []
    for enc in (t_enc, r_enc):
        head = torch.nn.Linear(enc.n_output_dims, 1).cuda()
        opt = torch.optim.Adam(list(enc.parameters()) + list(head.parameters()), lr=1e-2)
        for _ in range(200):
            loss = (head(enc(x)) - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses.append(float(loss))
    assert losses[0] < 0.05 and losses[1] < 0.05


def test_chunks_grow_with_the_thread_count_and_change_nothing_but_speed(monkeypatch):
    # Each thread's share of a chunk stays the size one thread works best with.
    enc, _ = small_grid(n_levels=8, chunk_size=10**9)
    x = torch.rand(20000, 3)
    out1 = enc(x)
    out1.sum().backward()
    g1 = enc.embeddings.grad.clone()
    enc.embeddings.grad = None
    assert enc._chunk_points(10**6) == HashGridEncoding.CHUNK_LEVEL_POINTS // 8
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert enc._chunk_points(10**6) == 3 * HashGridEncoding.CHUNK_LEVEL_POINTS // 8
    monkeypatch.setattr(HashGridEncoding, "CHUNK_PER_THREAD", False)
    assert enc._chunk_points(10**6) == HashGridEncoding.CHUNK_LEVEL_POINTS // 8
    monkeypatch.setattr(HashGridEncoding, "CHUNK_PER_THREAD", True)
    out3 = enc(x)  # 10 chunks of 2048 points become 4 of 6144
    out3.sum().backward()
    torch.testing.assert_close(out3, out1, rtol=0, atol=0)
    torch.testing.assert_close(enc.embeddings.grad, g1, rtol=1e-5, atol=1e-6)  # summed in another order
