"""Throughput accounting: tokens/sec, padding fraction, peak memory and model-FLOPs utilisation (MFU)."""

from __future__ import annotations

import functools
import resource
import time

import torch
from torch import nn

# Dense bf16 tensor-core peaks (FLOP/s) of common accelerators, from the vendors' data sheets.
GPU_PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
    "L40": 181e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12,
    "V100": 125e12, "T4": 65e12,
}


class ThroughputMeter:
    """Counts the tokens of each micro-batch and turns them into per-step and whole-run rates.

    Model FLOPs of a step (nanoGPT / PaLM convention, causal attention):
        6 * N * tokens  +  6 * L * d_attn * sum_i(len_i^2)
    with N the parameter count (embeddings excluded), L decoder layers, d_attn = heads * head_dim.
    MFU = model FLOPs per second / the device's peak.
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = base.config
        embeddings = base.get_input_embeddings().weight.numel()
        self.params = sum(p.numel() for p in base.parameters()) - embeddings
        self.layers = config.num_hidden_layers
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.attn_width = config.num_attention_heads * head_dim
        self.device = device
        self.peak_flops = device_peak_flops(device)
        self._step = self._zero()
        self._run = self._zero()
        self._run_seconds = 0.0

    @staticmethod
    def _zero() -> dict[str, float]:
        return {"tokens": 0.0, "target_tokens": 0.0, "slots": 0.0, "flops": 0.0}

    def add_batch(self, batch: dict[str, torch.Tensor]) -> None:
        lengths = example_lengths(batch)
        tokens = float(lengths.sum())
        labels = batch["labels"] if "labels" in batch else batch.get("chosen_labels")
        counts = {
            "tokens": tokens,
            "target_tokens": float((labels != -100).sum()) if labels is not None else 0.0,
            "slots": float(batch["input_ids"].numel()),
            "flops": 6 * self.params * tokens + 6 * self.layers * self.attn_width * float((lengths.double() ** 2).sum()),
        }
        for key, value in counts.items():
            self._step[key] += value

    def end_step(self, seconds: float, world_size: int) -> dict[str, float]:
        step, self._step = self._step, self._zero()
        for key, value in step.items():
            self._run[key] += value
        self._run_seconds += seconds
        return self._rates(step, seconds, world_size, prefix="train/")

    def summary(self) -> dict[str, float]:
        return {k.removeprefix("train/"): v for k, v in self._rates(self._run, self._run_seconds, 1, "train/").items()}

    def _rates(self, counts: dict[str, float], seconds: float, world_size: int, prefix: str) -> dict[str, float]:
        seconds = max(seconds, 1e-9)
        rates = {
            "tokens_per_sec": counts["tokens"] * world_size / seconds,
            "target_tokens_per_sec": counts["target_tokens"] * world_size / seconds,
            "padding_fraction": 1.0 - counts["tokens"] / max(counts["slots"], 1.0),
            "peak_memory_gb": peak_memory_bytes(self.device) / 2**30,
            "mfu": counts["flops"] / seconds / self.peak_flops,
        }
        return {prefix + k: v for k, v in rates.items()}


def example_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Real length of every example in a batch: mask row sums, or the segments of packed rows."""
    if "seq_lens" in batch:
        return batch["seq_lens"].flatten().cpu()
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return mask.sum(dim=1).cpu()
    ids = batch["input_ids"]
    return torch.full((ids.shape[0],), ids.shape[1])


def peak_memory_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB


@functools.lru_cache(maxsize=None)
def device_peak_flops(device: torch.device) -> float:
    """Peak FLOP/s: the data-sheet figure for known GPUs, else a measured float32 matmul rate (CPU)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
    return measured_matmul_flops(device)


def measured_matmul_flops(device: torch.device, size: int = 512, repeats: int = 6) -> float:
    """Best of a few (size x size) float32 matmuls. Kept small: it runs inside train() (1024 x 8 took ~2 s on a
    busy 2-core CPU, a visible share of a short run)."""
    generator = torch.Generator(device).manual_seed(0)  # never touch the global RNG (exact resume)
    a = torch.randn(size, size, device=device, generator=generator)
    b = torch.randn(size, size, device=device, generator=generator)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
