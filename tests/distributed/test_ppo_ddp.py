"""PPO under 2-process gloo DDP: the ranks sample different completions but stay identical (policy and critic)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ppo_worker.py")


def test_ranks_stay_identical_under_ddp(tmp_path, tiny_model_dir):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
               str(tiny_model_dir), str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    start = json.loads((tmp_path / "rank0.json").read_text())
    assert start["policy"] and start["critic"]
    metrics = [json.loads(line) for line in (tmp_path / "outputs" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/value/loss" in row for row in metrics)
