"""Quantization modes: how each turns into from_pretrained arguments. The only module that
imports bitsandbytes. A mode the device cannot run is an error here, at start-up, never a
silent fallback to another mode."""

import torch

FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_supported(mode: str, device: torch.device) -> None:
    """Raise ValueError if `mode` cannot run on `device`."""
    if mode in FLOAT_DTYPES:
        if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"quantization bf16 is not supported by {torch.cuda.get_device_name(device)}")
        return
    if mode in ("int8", "nf4", "fp4"):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise ValueError(f"quantization {mode} needs bitsandbytes, which failed to import: {e}") from e
        return
    raise ValueError(f"unknown quantization mode {mode!r}")


def compute_dtype(mode: str, device: torch.device) -> torch.dtype:
    """The dtype activations and the KV cache use under `mode`."""
    if mode in FLOAT_DTYPES:
        return FLOAT_DTYPES[mode]
    if mode == "int8":
        # bitsandbytes' int8 matmul takes fp16 activations (it casts them otherwise)
        return torch.float16
    return torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16


def from_pretrained_kwargs(mode: str, device: torch.device) -> dict:
    """Arguments for AutoModelForCausalLM.from_pretrained that load weights in `mode`."""
    check_supported(mode, device)
    dtype = compute_dtype(mode, device)
    if mode in FLOAT_DTYPES:
        return {"dtype": dtype}
    from transformers import BitsAndBytesConfig

    if mode == "int8":
        quant = BitsAndBytesConfig(load_in_8bit=True)
    elif mode in ("nf4", "fp4"):
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode, bnb_4bit_compute_dtype=dtype)
    else:
        raise ValueError(f"unknown quantization mode {mode!r}")
    return {"dtype": dtype, "quantization_config": quant, "device_map": {"": device}}
