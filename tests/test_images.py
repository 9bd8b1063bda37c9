"""Specification of ddpm_lightning.images: pixel conversions, layouts and the atomic file write."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ddpm_lightning.images import atomic_write, nchw_to_nhwc, nhwc_to_nchw, to_model_range, to_uint8

# --------------------------------------------------------------------------- pixel conversions


def test_to_model_range_endpoints_and_exact_roundtrip_of_all_256_levels():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = to_model_range(u)
    assert x.dtype == torch.float32
    assert x.shape == u.shape
    assert x.flatten()[0].item() == -1.0
    assert x.flatten()[255].item() == 1.0
    assert torch.all(x.flatten()[1:] > x.flatten()[:-1])  # strictly increasing
    back = to_uint8(x)
    assert back.dtype == torch.uint8
    assert torch.equal(back, u)


def test_to_uint8_clamps_out_of_range_values_and_rounds():
    x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 7.0])
    # (x+1)/2*255: 0, 0, 127.5 -> 128 (round half to even), 191.25 -> 191, 255, 255
    assert to_uint8(x).tolist() == [0, 0, 128, 191, 255, 255]


def test_to_model_range_rejects_float_input():
    with pytest.raises(TypeError, match="uint8"):
        to_model_range(torch.zeros(1, 1, 32, 32))


def test_to_uint8_inverts_to_model_range_on_a_batch_and_to_model_range_is_within_half_a_level():
    u = torch.randint(0, 256, (4, 1, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert torch.equal(to_uint8(to_model_range(u)), u)
    x = torch.linspace(-1, 1, 1001)
    assert torch.all((to_model_range(to_uint8(x)) - x).abs() <= 1 / 255 + 1e-6)  # half a level is 1/255 in [-1, 1]


def test_layout_helpers_swap_the_channel_axis_and_round_trip():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.uint8).reshape(2, 3, 4, 5)  # (N, C, H, W)
    y = nchw_to_nhwc(x)
    assert y.shape == (2, 4, 5, 3) and y.dtype == torch.uint8 and y.is_contiguous()
    assert y[1, 2, 3, 0] == x[1, 0, 2, 3]
    back = nhwc_to_nchw(y)
    assert back.is_contiguous() and torch.equal(back, x)
    with pytest.raises(ValueError, match="4-d"):
        nchw_to_nhwc(torch.zeros(3, 4, 5))


# --------------------------------------------------------------------------- atomic_write


def test_atomic_write_writes_through_a_temporary_file_in_the_same_folder(tmp_path):
    target = tmp_path / "sub" / "out.bin"  # the folder is created
    seen = []

    def writer(tmp):
        seen.append(tmp)
        assert tmp.parent == target.parent and tmp != target
        assert not target.exists()  # nothing under the final name until the write is done
        tmp.write_bytes(b"new")

    assert atomic_write(target, writer) == target
    assert target.read_bytes() == b"new"
    assert os.listdir(target.parent) == ["out.bin"]  # no temporary file left
    assert seen[0].name.startswith(".out.bin.tmp-")


def test_atomic_write_replaces_an_existing_file(tmp_path):
    target = tmp_path / "samples.npz"
    target.write_bytes(b"old")

    def save(tmp):
        with open(tmp, "wb") as f:  # np.savez on a path would append .npz
            np.savez(f, np.zeros((2, 32, 32, 1), np.uint8))

    atomic_write(str(target), save, fsync=False)
    assert np.load(target)["arr_0"].shape == (2, 32, 32, 1)
    assert sorted(os.listdir(tmp_path)) == ["samples.npz"]


def test_a_failing_writer_leaves_the_old_file_intact_and_no_temporary_file(tmp_path):
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"old checkpoint")

    def half_then_fail(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt  # any BaseException, e.g. a kill turned into an exception

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old checkpoint"
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_a_writer_that_writes_nothing_is_an_error_and_changes_nothing(tmp_path):
    target = tmp_path / "grid.png"
    with pytest.raises(FileNotFoundError, match="did not create"):
        atomic_write(target, lambda tmp: None)
    assert os.listdir(tmp_path) == []
