"""The one table of floating-point types by name, for the codec, latent storage and the command line."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
SHORT_NAMES: dict[torch.dtype, str] = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """"fp32" / "bf16" / "fp16" (or the long names, or a torch dtype) -> the torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in SHORT_NAMES:
            raise ValueError(f"unsupported dtype {dtype}; choose one of fp32, bf16, fp16")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of fp32, bf16, fp16")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the name torch prints, as stored in latent dataset metadata)."""
    return str(dtype).removeprefix("torch.")
