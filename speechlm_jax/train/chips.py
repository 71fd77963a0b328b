"""The accelerator chips the project knows: HBM and dense bf16 peak per chip, and how JAX names them.

One table for both of its users: `speechlm-compile` (`train.compile_aot`: the HBM a
compiled step must fit, slice names, step time at a given MFU) and the trainer's MFU
(`train.metrics.peak_flops`). A chip missing here is added here, for both.
"""

from __future__ import annotations

import dataclasses

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip: its HBM, dense bf16 peak, and how a slice name counts it."""

    name: str
    hbm_bytes: int
    peak_flops: float  # dense bf16 FLOP/s per chip
    name_units_per_chip: int = 1  # v4 / v5p slice names count TensorCores (two per chip)
    grid_dims: int = 2  # v4 / v5p are 3D tori, v5e / v6e 2D
    platform: str = "tpu"


# Sources: cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e} (system architecture tables: HBM per
# chip and peak bf16 compute per chip); NVIDIA H100 SXM, H200 SXM, A100 and L4 datasheets
# (dense bf16 Tensor Core FLOP/s, i.e. without 2:4 sparsity).
CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, name_units_per_chip=2, grid_dims=3),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, name_units_per_chip=2, grid_dims=3),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12),
    "h100": Chip("NVIDIA H100 80GB", 80 * 10**9, 989e12, platform="gpu"),
    "h200": Chip("NVIDIA H200", 141 * 10**9, 989e12, platform="gpu"),
    "a100-40gb": Chip("NVIDIA A100 40GB", 40 * 10**9, 312e12, platform="gpu"),
    "a100-80gb": Chip("NVIDIA A100 80GB", 80 * 10**9, 312e12, platform="gpu"),
    "l4": Chip("NVIDIA L4", 24 * 10**9, 121e12, platform="gpu"),
}
# `device_kind` prefixes of attached devices, most specific first (kinds match by prefix:
# v5p reports itself as plain "TPU v5", so it comes after the longer v5 names).
DEVICE_KINDS = (
    ("NVIDIA H200", "h200"),
    ("NVIDIA H100", "h100"),
    ("NVIDIA A100", "a100-80gb"),
    ("NVIDIA L4", "l4"),
    ("TPU v6", "v6e"),
    ("TPU v5 lite", "v5e"),
    ("TPU v5e", "v5e"),
    ("TPU v5p", "v5p"),
    ("TPU v5", "v5p"),
    ("TPU v4", "v4"),
)


def chip_of(device_kind: str) -> Chip:
    """The chip of a JAX `device_kind` ("NVIDIA H100 80GB HBM3", "TPU v5 lite", ...)."""
    for prefix, key in DEVICE_KINDS:
        if device_kind.startswith(prefix):
            return CHIPS["a100-40gb" if key == "a100-80gb" and "40GB" in device_kind else key]
    raise ValueError(f"no HBM / peak figures for device kind {device_kind!r}; known chips: {', '.join(CHIPS)}")
