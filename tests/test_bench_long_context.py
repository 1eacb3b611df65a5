"""bench/long_context.py, shortened: the tiny shape at one short length for both libraries (same example, same
losses, equal to the model's own loss before training), the memory watchdog, and a library stopping at its first
length that does not fit."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import long_context  # noqa: E402

pytest.importorskip("trl")


def test_both_libraries_train_the_same_example_to_the_plain_loss(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "long_context.py"), "--tiny", "--lengths", "128",
                           "--work", str(work), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((out / "long_context_tiny.json").read_text())
    ours, theirs = data["results"]["rlhf_time"]["128"], data["results"]["trl"]["128"]
    assert ours["fits"] and theirs["fits"] and theirs["identical_example"]
    assert len(ours["losses"]) == len(theirs["losses"]) == 2
    assert ours["losses"] == pytest.approx(theirs["losses"], rel=1e-5)
    # step 1's loss is the untrained model's own cross-entropy on the response (an independent computation)
    from transformers import AutoModelForCausalLM

    example = json.loads((work / "L128" / "example.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    with torch.no_grad():
        plain = model(input_ids=torch.tensor([example["input_ids"]]), labels=torch.tensor([example["labels"]])).loss
    assert ours["losses"][0] == pytest.approx(plain.item(), rel=1e-5)
    assert data["longest"] == {"rlhf_time": 128, "trl": 128}
    assert "| 128 | " in done.stdout and "yes (" in done.stdout


def test_the_watchdog_kills_a_child_past_the_memory_cap(tmp_path):
    # 400 MB/s up to 3 GB at most (a watchdog that never fires fails below without taking the machine's memory)
    grow = ("import time; blocks = []\nwhile True:\n    if len(blocks) < 150: blocks.append(bytearray(20 * 2**20))\n"
            "    time.sleep(0.05)")
    result = long_context.run_capped([sys.executable, "-c", grow], tmp_path / "r.json", 300 * 2**20, timeout=60)
    assert not result["fits"] and "memory" in result["killed"]
    assert 0.29 <= result["peak_memory_gb"] < 1.5  # killed soon after passing 300 MiB (polls lag on a loaded machine)
    within = "import json, sys; json.dump({'seconds': 0.0}, open(sys.argv[1], 'w'))"
    result = long_context.run_capped([sys.executable, "-c", within, str(tmp_path / "ok.json")], tmp_path / "ok.json",
                                     2**30, timeout=60)
    assert result == {"seconds": 0.0, "fits": True}


def test_a_library_stops_at_its_first_length_that_does_not_fit(tmp_path, monkeypatch):
    tried = []

    def fake_run(command, result, cap_bytes, **_):
        library, length = command[command.index("--variant") + 1], int(command[command.index("--lengths") + 1])
        tried.append((library, length))
        if library == "trl" and length >= 2048:
            return {"fits": False, "killed": "resident memory passed 8 GiB", "peak_memory_gb": 8.0}
        return {"fits": True, "peak_memory_gb": length / 1024, "seconds": 1.0, "losses": [2.0, 1.5],
                "identical_example": True, "load_average": 1.0}

    monkeypatch.setattr(long_context, "run_capped", fake_run)
    args = long_context.parse_args(["--lengths", "1024,2048,4096,8192"])
    results = long_context.measure(tmp_path, args)
    assert [length for library, length in tried if library == "trl"] == [1024, 2048]
    assert [length for library, length in tried if library == "rlhf_time"] == [1024, 2048, 4096, 8192]
    long_context.report(results, {"shape": "256x4", "parameters": 80.9e6, "vocab_size": 151_936}, args, tmp_path)
    text = (tmp_path / "long_context.md").read_text()
    assert "| 2,048 | 2.00 | 8.00 (killed) | 1.0 | - | - |" in text
    assert "TRL: longest example within 8 GiB: 1,024 tokens; first miss: 2,048" in text
    assert "ratio rlhf_time / TRL: at least 8.0x" in text
    assert "rlhf_time: longest example within 8 GiB: 8,192 tokens; fits every length tried, 0.00 GiB below" in text
