"""Mask selection (top-k of a gradient statistic as row-sorted CSR) and mask files."""

import pytest
import torch

from rosa_kernels import load_masks, row_order, save_masks, select_mask, validate_csr
from rosa_kernels.masks import accumulate_statistic, load_safetensors, mask_count, reduce_statistic, save_safetensors


@pytest.mark.parametrize("m,n,density", [(1, 1, 1.0), (7, 5, 0.3), (33, 17, 0.05), (1, 40, 0.2), (40, 1, 0.2),
                                         (16, 16, 1.0), (9, 6, 0.001)])
def test_select_mask_is_the_independent_top_k(m, n, density):
    gen = torch.Generator().manual_seed(m * 100 + n)
    statistic = torch.randn(m, n, generator=gen)
    nnz = mask_count(m, n, density)
    mask = select_mask(statistic, nnz)
    assert mask.nnz == nnz and mask.shape == (m, n)
    assert mask.row_offsets.dtype == mask.col_indices.dtype == mask.row_indices.dtype == torch.int32
    validate_csr(mask.row_offsets, mask.col_indices, m, n, nnz, mask.row_indices)
    assert torch.equal(mask.row_indices, row_order(mask.row_offsets))
    assert torch.equal(mask.values, torch.zeros(nnz))
    expected = torch.zeros(m * n, dtype=torch.bool)
    expected[torch.topk(statistic.abs().flatten(), nnz).indices] = True
    selected = torch.zeros(m, n, dtype=torch.bool)
    rows = torch.repeat_interleave(torch.arange(m), (mask.row_offsets[1:] - mask.row_offsets[:-1]).long())
    selected[rows, mask.col_indices.long()] = True
    assert torch.equal(selected.flatten(), expected)


def test_select_mask_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        select_mask(torch.zeros(3), 1)
    with pytest.raises(ValueError, match="nnz"):
        select_mask(torch.zeros(2, 2), 5)


@pytest.mark.parametrize("rule", ["fisher", "mean"])
def test_accumulate_statistic(rule):
    statistic = torch.zeros(4, 6)
    expected = torch.zeros(4, 6, dtype=torch.float64)
    for _ in range(3):
        dy, x = torch.randn(5, 4, dtype=torch.bfloat16), torch.randn(5, 6, dtype=torch.bfloat16)
        accumulate_statistic(statistic, dy, x, rule)
        g = dy.double().t() @ x.double()
        expected += g * g if rule == "fisher" else g
    torch.testing.assert_close(reduce_statistic(statistic, 3).double(), expected / 3, rtol=1e-5, atol=1e-5)


def test_mask_files_round_trip(tmp_path):
    masks = {"layer.0": select_mask(torch.randn(8, 5), 7), "empty": select_mask(torch.randn(3, 3), 0)}
    save_masks(tmp_path / "masks.safetensors", masks)
    loaded = load_masks(tmp_path / "masks.safetensors")
    assert set(loaded) == set(masks)
    for name, mask in masks.items():
        got = loaded[name]
        assert got.shape == mask.shape
        for field in ("row_offsets", "row_indices", "col_indices"):
            assert torch.equal(getattr(got, field), getattr(mask, field))
    with pytest.raises(TypeError):
        save_masks(tmp_path / "bad.safetensors", {"x": torch.zeros(2, 2)})
    save_safetensors({"a": torch.ones(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="masks"):
        load_masks(tmp_path / "other.safetensors")


def test_safetensors_files_round_trip_every_dtype(tmp_path):
    tensors = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).bfloat16(), "f16": torch.randn(2, 2).half(),
               "i32": torch.arange(7, dtype=torch.int32), "empty": torch.zeros(0, dtype=torch.int32),
               "f64": torch.randn(1, dtype=torch.float64), "flag": torch.tensor(True),
               "strided": torch.randn(4, 6)[:, ::2]}
    save_safetensors(tensors, tmp_path / "a.safetensors", {"k": "v"})
    back, metadata = load_safetensors(tmp_path / "a.safetensors")
    assert metadata == {"k": "v"}
    assert list(tmp_path.iterdir()) == [tmp_path / "a.safetensors"]  # no temporary file left
    for name, t in tensors.items():
        assert torch.equal(back[name], t)
    with pytest.raises(TypeError, match="dense"):
        save_safetensors({"s": torch.eye(3).to_sparse()}, tmp_path / "b.safetensors")
