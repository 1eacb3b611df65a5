"""bench/real_vocab.py's GRPO (against TRL) and PPO (against the plain loop) cases, shortened: every variant
trains at Qwen's real vocabulary and the table reports each."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("trl")


@pytest.mark.parametrize("stage, batch, variants", [("grpo", "1", ("rlhf_time", "rlhf_time_micro", "trl")), ("ppo", "4", ("rlhf_time", "plain"))])
def test_the_real_vocabulary_rl_bench_runs_both_variants(tmp_path, stage, batch, variants):
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "real_vocab.py"), stage, "--model", "64x2", "--steps", "1",
         "--batch-size", batch, "--micro-batch", "4", "--completion-tokens", "4", "--prompt-tokens", "20,40",
         "--threads", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / f"{stage}_64x2_cpu.json").read_text())["results"]
    assert set(results) == set(variants), done.stderr[-3000:]
    for result in results.values():
        assert len(result["step_ends"]) == 1 and result["peak_memory_gb"] > 0
        assert 1 <= result["completion_lengths"][0] <= 4 and 0 < result["rewards"][0] <= 1
    table = (tmp_path / f"{stage}_64x2_cpu.md").read_text()
    assert all(f"| {name}" in table for name in ("rlhf_time", "TRL" if stage == "grpo" else "plain"))
