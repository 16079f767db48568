"""Rotary position embeddings: frequency tables with the configured scaling (ops.rope applies them).

Uses the Hugging Face layout ("rotate half"): dims [0, D/2) pair with
[D/2, D). GGUF converters permute Q/K rows for llama.cpp's interleaved layout;
weights.py undoes that, so one layout serves both checkpoint formats.
"""
import math

import torch

SUPPORTED = ("default", "linear", "llama3", "freq_factors")


def inverse_frequencies(head_dim, theta, scaling=None):
    """[D/2] float32 inverse frequencies, scaled as `scaling` (HF rope_scaling dict) says.

    float32 throughout, as transformers computes them, so positions rotate identically.
    """
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "freq_factors":  # GGUF files with a rope_freqs tensor (Llama 3.1 converted by llama.cpp)
        return inv / torch.tensor(scaling["factors"], dtype=torch.float32)
    if kind == "llama3":
        # Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = ((old_ctx / wavelen - low) / (high - low)).clamp(0, 1)
        scaled = (1 - smooth) * inv / factor + smooth * inv
        return torch.where(wavelen > old_ctx / low, inv / factor, torch.where(wavelen < old_ctx / high, inv, scaled))
    raise ValueError(f"rope scaling type {kind!r} is not supported; supported: {', '.join(SUPPORTED)}")


def tables(head_dim, theta, scaling, max_positions, device):
    """cos and sin tables [max_positions, D/2] in float32."""
    inv = inverse_frequencies(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv)
    return angles.cos().to(device), angles.sin().to(device)
