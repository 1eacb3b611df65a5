"""Throughput accounting: tokens/sec, padding fraction, peak memory and model-FLOPs utilisation (MFU)."""

from __future__ import annotations

import functools
import resource
import time
from typing import Optional

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

    Model FLOPs are those of the trained model's own matrix products, counted from the real (unpadded) lengths;
    one multiply-add is 2 FLOPs. One forward pass costs:
        body       2 * N_body * tokens          N_body: the weights of every matrix product but the input
                                                embedding (a lookup) and the LM head
        LM head    2 * H * V * projected        projected: positions with a label; the losses form logits only
                                                there. Counted the same for a tied head (it shares the
                                                embedding's weights, not its cost) and an untied one
        attention  2 * d_attn * layers * L^2    per example of length L: QK^T and AV (2 matmuls x 2 FLOPs x
                                                d_attn per query-key pair) over the causal half, L^2 / 2 pairs
    with d_attn = heads * head_dim. Training = 3 x forward (backward = 2 x forward); recomputation (gradient
    checkpointing, the chunked losses' backward) is not model work and is not counted.
    GRPO (a batch with group_size G > 1): its update runs each prompt once for the G completions that share it
    (stages/on_policy.py, _completion_states), so a prompt of p tokens counts once, and a completion of c tokens
    counts c tokens and p * c + c^2 / 2 attention pairs. (Where that path is off -- gradient checkpointing,
    FSDP, a LoRA-wrapped head -- the prompt runs G times and MFU reads low.)
    Frozen models' forwards inside a step (DPO's reference, KD's teacher) are not counted: MFU reads low there.
    MFU = model FLOPs per second / the device's peak (device_peak_flops).
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = base.config
        head = base.get_output_embeddings()
        head_weights = {id(p) for p in head.parameters()} if head is not None else set()
        skipped = head_weights | {id(base.get_input_embeddings().weight)}
        self.body_params = sum(p.numel() for p in base.parameters() if p.dim() >= 2 and id(p) not in skipped)
        # the head's matrices (V x H, and LoRA's factors when it is adapted) per projected position
        self.head_params = sum(p.numel() for p in head.parameters() if p.dim() >= 2) if head is not None else 0
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.attention_per_pair = 2 * 2 * config.num_attention_heads * head_dim * config.num_hidden_layers
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
            "flops": 3 * self.forward_flops(batch),
        }
        for key, value in counts.items():
            self._step[key] += value

    def forward_flops(self, batch: dict[str, torch.Tensor]) -> float:
        """Model FLOPs of one forward pass of the trained model over `batch` (see the class docstring)."""
        group = int(batch["group_size"]) if "group_size" in batch else 1
        if group > 1:
            tokens, pairs = shared_prompt_work(batch, group)
        else:
            lengths = example_lengths(batch).double()
            tokens, pairs = float(lengths.sum()), float((lengths**2).sum()) / 2
        labels = batch.get("labels")
        projected = float((labels[:, 1:] != -100).sum()) if labels is not None else tokens
        return 2 * self.body_params * tokens + 2 * self.head_params * projected + self.attention_per_pair * pairs

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
    """CUDA: the most memory torch allocated. CPU: this program's peak resident memory -- on Linux VmHWM, because
    getrusage carries the peak from before exec over, so a process started from a large one (a pytest worker, a
    notebook, a benchmark driver) would report its parent's peak."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    high_water = process_memory_bytes("VmHWM")
    if high_water is None:  # not Linux
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB
    return float(high_water)


def process_memory_bytes(field: str, pid: int | str = "self") -> Optional[int]:
    """A memory line of /proc/<pid>/status in bytes (VmHWM: peak resident memory since the program started, VmRSS:
    resident now); None without that file or line (not Linux, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # the kernel writes kB
    except OSError:
        return None
    return None


def shared_prompt_work(batch: dict[str, torch.Tensor], group: int) -> tuple[float, float]:
    """(tokens, causal attention pairs) of a GRPO batch whose G consecutive rows share one prompt that runs once:
    each prompt's p real tokens and p^2 / 2 pairs once, each completion's c tokens and p * c + c^2 / 2 pairs."""
    mask = batch["attention_mask"]  # (N, P + C): left-padded prompts, then completions
    prompt_width = mask.shape[1] - batch["loss_mask"].shape[1]
    prompts = mask[::group, :prompt_width].sum(dim=1).double().cpu()  # (N / G,)
    completions = mask[:, prompt_width:].sum(dim=1).double().cpu()  # (N,)
    shared = prompts.repeat_interleave(group)  # (N,) each row's prompt length
    tokens = prompts.sum() + completions.sum()
    pairs = (prompts**2).sum() / 2 + (shared * completions + completions**2 / 2).sum()
    return float(tokens), float(pairs)


def device_peak_flops(device: torch.device) -> float:
    """Peak FLOP/s: the data-sheet bf16 figure for known GPUs; else measured (cpu_peak_flops, or the best matmul
    rate of an unknown GPU)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
        return _measured_gpu_peak(device)
    return cpu_peak_flops(torch.get_num_threads())


@functools.lru_cache(maxsize=None)
def cpu_peak_flops(threads: int) -> float:
    """The CPU's peak for a process of `threads` threads: threads x the best one-thread matmul rate, float32 or
    bfloat16 (autocast's CPU dtype), 256-1024 wide.

    One thread is measured and scaled, rather than all threads at once: on a shared machine a multi-threaded
    matmul waits for its busiest core (512 x 512 float32 read 18-200 GFLOP/s from one run to the next on a busy
    2-core box, and the old 512-only, float32-only figure let MFU read up to 1.5), while one thread's rate is
    steady, and perfect scaling over the threads is what a peak means. ~0.2 s, once per process and thread count.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = max(matmul_rate(torch.device("cpu"), size, dtype)
                   for size in (256, 512, 1024) for dtype in (torch.float32, torch.bfloat16))
    finally:
        torch.set_num_threads(previous)
    return threads * best


@functools.lru_cache(maxsize=None)
def _measured_gpu_peak(device: torch.device) -> float:
    return max(matmul_rate(device, size, dtype) for size in (2048, 4096) for dtype in (torch.float32, torch.bfloat16))


def matmul_rate(device: torch.device, size: int, dtype: torch.dtype, repeats: int = 3) -> float:
    """FLOP/s of the fastest of `repeats` (size x size) @ (size x size) products, after one warm-up product."""
    generator = torch.Generator(device).manual_seed(0)  # never touch the global RNG (exact resume)
    a = torch.randn(size, size, device=device, generator=generator).to(dtype)
    b = torch.randn(size, size, device=device, generator=generator).to(dtype)
    a @ b
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
