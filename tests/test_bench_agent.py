"""bench/agent_pipeline.py, shortened: SFT on the multiply demonstrations with checkpoints, held-out evaluation
of a checkpoint through the tool loop, GRPO with the tool from that checkpoint, evaluation again."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_agent_pipeline_runs_sft_checkpoints_then_grpo_and_evaluates_each(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "agent_pipeline.py"), "--sft-steps", "4", "--checkpoints", "2,4",
         "--start-from", "2", "--grpo-steps", "2", "--seeds", "7", "--limit", "4", "--out", str(tmp_path),
         "eval_strategy=no"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "agent_sft"
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()
    grpo = tmp_path / "grpo_seed7" / "agent_grpo"
    assert "checkpoint-2" in (grpo / "config.yaml").read_text()  # GRPO started from the stopped SFT
    table = done.stdout.splitlines()[-5:]
    assert table[0] == "| model | success | right call |"
    assert table[2].startswith("| SFT step 2 | ") and table[3].startswith("| SFT step 4 | ")
    assert table[4].startswith("| SFT step 2 + GRPO 2 steps, seed 7 | ")
    assert all(row.endswith("/4 |") for row in table[2:])
