"""`train.chips`: one chip table for `speechlm-compile` and for the trainer's MFU."""

from __future__ import annotations

import types

import pytest

from speechlm_jax.train import chips, compile_aot, metrics


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("NVIDIA H200", 989e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("NVIDIA L4", 121e12),
        ("TPU v6 lite", 918e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5e", 197e12),
        ("TPU v5p", 459e12),
        ("TPU v5", 459e12),
        ("TPU v4", 275e12),
    ],
)
def test_mfu_and_compile_read_one_table(kind, peak):
    device = types.SimpleNamespace(platform="gpu" if kind.startswith("NVIDIA") else "tpu", device_kind=kind)
    assert metrics.peak_flops(device) == compile_aot.chip_of(kind).peak_flops == peak
    assert compile_aot.CHIPS is chips.CHIPS


def test_an_unknown_chip_is_named():
    with pytest.raises(ValueError, match="no HBM / peak figures for device kind 'NVIDIA T4'"):
        metrics.peak_flops(types.SimpleNamespace(platform="gpu", device_kind="NVIDIA T4"))
