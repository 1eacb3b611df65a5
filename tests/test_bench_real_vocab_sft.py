"""bench/real_vocab.py's SFT case, shortened, with a chunk-size variant: it runs with its own loss_chunk_bytes and
trains to TRL's losses (the chunk changes memory and time, never the numbers)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("trl")


def test_the_real_vocabulary_sft_bench_weighs_chunk_sizes_against_trl(tmp_path):
    variants = ("rlhf_time_chunk32", "trl")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "real_vocab.py"), "sft", "--model", "64x2", "--steps", "1",
         "--batch-size", "2", "--threads", "1", "--variants", ",".join(variants), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "sft_64x2_cpu.json").read_text())["results"]
    assert set(results) == set(variants), done.stderr[-3000:]
    assert results["rlhf_time_chunk32"]["loss_chunk_bytes"] == 32 * 2**20  # the default is 128 MiB
    assert results["rlhf_time_chunk32"]["losses"] == pytest.approx(results["trl"]["losses"], rel=1e-4)
    table = (tmp_path / "sft_64x2_cpu.md").read_text()
    assert "| rlhf_time loss_chunk_bytes 32 MiB |" in table and "| TRL SFTTrainer |" in table
