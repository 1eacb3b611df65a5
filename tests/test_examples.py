"""Every file in examples/ runs as shipped, as a new user runs it: `rlhf-time train <file>` from a fresh working
directory, after the quickstart (which the examples that start from a trained model read). Only max_steps is
shortened; charts, report.md, the progress bar, TensorBoard and the run folders stay as the user gets them.

The working directory is the session's `user_folder` (tests/user_runs.py), where tests/test_docs_blocks.py runs the
README's commands, which include the quickstart and `rlhf-time train examples/<file>` for most examples with the
same shortening: each such run trains once, and the test here checks that run (its exit code, its stderr, and its
run folder, which must still hold what the run wrote).

The RLHF pipeline (examples/rlhf_pipeline) runs in full, as shipped, in tests/test_rlhf_pipeline.py, and the SLURM
script below with stand-ins for the SLURM commands."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SHORT = "max_steps=2"
# In dependency order: the quickstart's model is the start (or the teacher) of kd, grpo and ppo.
YAML_EXAMPLES = ["sft_full", "sft_lora", "sft_freeze", "sft_qlora", "agent_sft", "pretrain_text", "rm", "dpo", "orpo", "simpo",
                 "kto", "kd", "grpo", "rloo", "online_dpo", "agent_grpo", "guess_number", "ppo"]
GENERATIVE = {"sft_full", "sft_lora", "sft_freeze", "sft_qlora", "agent_sft", "pretrain_text", "dpo", "orpo", "simpo", "kto", "kd",
              "grpo", "rloo", "online_dpo", "agent_grpo", "guess_number", "ppo"}
COVERED_ELSEWHERE = {"rlhf_pipeline": "tests/test_rlhf_pipeline.py", "data": "read by the YAML examples",
                     "grpo_rewards.py": "reward functions of grpo.yaml, rloo.yaml, online_dpo.yaml and ppo.yaml",
                     "guess_number.py": "the environment of guess_number.yaml",
                     "agent_rewards.py": "reward functions of agent_grpo.yaml",
                     "tools.py": "the agent examples' tool: tests/test_tools.py (its schema is data/agent_sft.jsonl's "
                                 "tools; data/make_agent_data.py reproduces the data)"}


def test_every_example_file_is_run_here():
    shipped = {path.name for path in EXAMPLES.iterdir()}
    run = {f"{name}.yaml" for name in YAML_EXAMPLES} | {"slurm_multinode.sh"} | set(COVERED_ELSEWHERE)
    assert shipped == run, f"add the new example to tests/test_examples.py: {sorted(shipped ^ run)}"


@pytest.fixture(scope="module")
def workdir(user_folder):
    """The session's fresh working directory (tests/user_runs.py) after the README's first command, `rlhf-time train`
    (shortened)."""
    run = user_folder.train([SHORT])
    assert run.code == 0, run.err[-3000:]
    folder = user_folder.folder
    assert (folder / "outputs" / "quickstart" / "final" / "model.safetensors").is_file()
    return folder


@pytest.mark.parametrize("name", YAML_EXAMPLES)
def test_example_runs_as_shipped(name, workdir, user_folder):
    run = user_folder.train([str(EXAMPLES / f"{name}.yaml"), SHORT])
    assert run.code == 0, run.err[-3000:]
    err = run.err
    assert "Traceback" not in err and "report.md not written" not in err and "no sample generations" not in err
    import yaml

    run_dir = workdir / "outputs" / yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())["experiment_name"]
    assert run.unchanged(run_dir, workdir), f"{run_dir} was written again after `rlhf-time train {name}.yaml`"
    assert {"config.json", "adapter_config.json"} & {path.name for path in (run_dir / "final").iterdir()}
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*")), "the default tracker wrote nothing"
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    assert list((run_dir / "plots").glob("*.png")) and "(plots/loss.png)" in report
    if name in GENERATIVE:  # before/after answers of the first records of the eval (else train) data
        table = report.split("## Sample generations")[1].split("## Config")[0]
        rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| prompt")]
        assert len(rows) == 3, table


def test_text_data_report_samples_continue_the_documents(workdir):
    """Text data: the first tokens of a document are the prompt, the rest of it the reference."""
    import json

    report = (workdir / "outputs" / "pretrain_text" / "report.md").read_text(encoding="utf-8")
    header, first = report.split("## Sample generations")[1].split("\n| ")[1:3]
    assert header.startswith("prompt | reference |")
    prompt, reference = (cell.strip() for cell in first.split(" | ")[:2])
    document = json.loads((EXAMPLES / "data" / "pretrain_text.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert document["content"].startswith(prompt) and prompt + reference == document["content"]


def test_prompt_data_report_uses_the_answer_field(workdir):
    import json

    report = (workdir / "outputs" / "grpo" / "report.md").read_text(encoding="utf-8")
    first = report.split("## Sample generations")[1].split("\n| ")[2]
    record = json.loads((EXAMPLES / "data" / "grpo_eval.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert [cell.strip() for cell in first.split(" | ")[:2]] == [record["prompt"], record["answer"]]


def test_slurm_example_runs_with_stand_ins_for_slurm(workdir, tmp_path):
    """examples/slurm_multinode.sh as shipped, on one "node" of 2 CPU processes: srun runs its command once,
    scontrol names this host, and torchrun is torch's own launcher (FSDP over gloo)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_ins = {
        "srun": '#!/bin/sh\nexec "$@"\n',
        "scontrol": "#!/bin/sh\necho 127.0.0.1\n",
        "torchrun": f'#!/bin/sh\nexec {sys.executable} -m torch.distributed.run "$@"\n',
    }
    for name, text in stand_ins.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_NNODES": "1",
           "SLURM_GPUS_ON_NODE": "2", "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_ID": str(os.getpid()),
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(EXAMPLES / "slurm_multinode.sh"), str(EXAMPLES / "sft_full.yaml"), SHORT,
                             "experiment_name=slurm"],
                            cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (workdir / "outputs" / "slurm" / "final" / "model.safetensors").is_file()
