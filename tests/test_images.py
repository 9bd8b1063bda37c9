"""Specification of ddpm_lightning.images: pixel conversions, layouts and the atomic file write."""

from __future__ import annotations

import pytest
import torch

from ddpm_lightning.images import to_model_range, to_uint8


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
