"""What the bench scripts share: the Qwen3 shapes they build, how a run is configured and measured in a fresh
process (peak memory, step times, load average), and how result tables are printed and kept.

The scripts run as `python bench/<name>.py`, which puts bench/ first on sys.path, so `import toolkit` finds this
file; importing it puts the repository root next, so the checkout's rlhf_time is the one measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

from rlhf_time.runtime.throughput import peak_memory_bytes  # noqa: E402  (after the path above)

QWEN3_VOCAB = 151_936  # Qwen3's embedding rows (its tokenizer's 151,669 padded to a multiple of 128)
# Qwen3 decoder shapes, by hidden size x layers; 0.6b is Qwen3-0.6B's, tied head as released.
QWEN3_SHAPES = {
    "64x2": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32),
    "128x6": dict(hidden_size=128, intermediate_size=448, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32),
    "256x4": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64),
    "512x8": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64),
    "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
}
SEED = 0


# ------------------------------------------------------------------------------------------- models
def save_qwen3(folder: Path, shape: str, tokenizer, *, vocab_size: int = QWEN3_VOCAB, **config) -> int:
    """A Qwen3 model of QWEN3_SHAPES[shape] with seeded random weights, saved with `tokenizer` into `folder`;
    returns its parameter count. `config`: more Qwen3Config fields (tie_word_embeddings, max_position_embeddings)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    fields = {"max_position_embeddings": 4096, "rope_theta": 1e6, "tie_word_embeddings": False,
              **QWEN3_SHAPES[shape], **config}
    model_config = Qwen3Config(vocab_size=vocab_size, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id, **fields)
    torch.manual_seed(SEED)
    model = Qwen3ForCausalLM(model_config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def training_config(work: Path, **fields):
    """A TrainingConfig for a measured run in `work` (model in work/model): no evaluation, saving, trackers,
    progress bar or report charts, a metrics row every step, seed 0; `fields` set the rest."""
    from rlhf_time import TrainingConfig

    measured = dict(output_dir=str(work / "runs"), model_name=str(work / "model"), model_type="Qwen",
                    eval_strategy="no", save_strategy="no", report_to="none", disable_progress_bar=True,
                    logging_steps=1, plot_metrics=False, seed=SEED, data_cache_dir=str(work / "cache"))
    return TrainingConfig(**{**measured, **fields})


# -------------------------------------------------------------------------------------- measurement
class StepClock:
    """Wall time from train begin to each optimiser step's end (CUDA synchronised), the same for every trainer."""

    def __init__(self) -> None:
        self.begin = self.end = None
        self.step_ends: list[float] = []  # seconds since train begin

    def start(self) -> None:
        self._sync()
        self.begin = time.perf_counter()

    def step(self) -> None:
        self._sync()
        self.end = time.perf_counter()
        self.step_ends.append(self.end - self.begin)

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    @property
    def seconds(self) -> float:
        return self.end - self.begin

    def steady_rate(self, work_per_step: float) -> float:
        """work_per_step x steps / seconds over the steps after the first (which pays for warm-up)."""
        ends = self.step_ends
        return work_per_step * (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 else float("nan")

    def rlhf_time_callback(self):
        from rlhf_time.runtime.callbacks import TrainerCallback

        clock = self

        class Clock(TrainerCallback):
            def on_train_begin(self, trainer):
                clock.start()

            def on_step_end(self, trainer, metrics):
                clock.step()

        return Clock()

    def transformers_callback(self):
        from transformers import TrainerCallback

        clock = self

        class Clock(TrainerCallback):
            def on_train_begin(self, *_, **__):
                clock.start()

            def on_step_end(self, *_, **__):
                clock.step()

        return Clock()


def peak_memory_gb(device: str = "cpu") -> float:
    """This process's peak memory: CUDA's max allocated on a GPU, else the peak RSS (as rlhf_time logs it)."""
    return peak_memory_bytes(torch.device(device)) / 2**30


def finish_child(result: dict, path: Path, device: str = "cpu") -> None:
    """A measuring child's last act: `result` with the process's peak memory and the machine's load average
    (the machine is shared: compare runs measured under similar load), written to `path`."""
    result.update(peak_memory_gb=peak_memory_gb(device), load_average=os.getloadavg()[0])
    path.write_text(json.dumps(result))


class ChildFailed(RuntimeError):
    """A measuring child process exited with an error; the message is the end of its stderr."""


def run_child(command: list[str], result: Path, *, timeout: float | None = None, env: dict | None = None) -> dict:
    """Run `command` in a fresh process, so its peak memory is its own, and read the result it wrote to `result`."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode:
        raise ChildFailed(done.stderr[-3000:])
    return json.loads(result.read_text())


# --------------------------------------------------------------------------------------- results
def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """The lines of a markdown table: the first column left-aligned (names), the others right-aligned (numbers)."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def write_results(out: Path, stem: str, text: str, data: dict) -> None:
    """Print the report `text` and keep it as out/<stem>.md, with `data` as out/<stem>.json."""
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text + "\n")
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1, ensure_ascii=False))
