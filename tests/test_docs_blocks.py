"""Every code block of the README and of docs/stages.md runs, as written, in the order a reader meets it.

The blocks are read from the Markdown when the tests are collected, so an edit of either page is tested at once.
`rlhf-time ...` commands run in this process through `rlhf_time.cli.main`, Python blocks through `exec`, both in one
working folder that holds the repository's `examples/` and `rlhf_time/` (so relative paths resolve as they do from
the repository root) and receives every run's `outputs/`: the session's `user_folder` (tests/user_runs.py), where
tests/test_examples.py runs the example files too, so a `train` command that both run (the quickstart, each
example) trains once and both check that run. The only changes to what a user runs: every training
run stops after MAX_STEPS optimiser steps (`max_steps=2` appended to a `train` command; `max_steps` set in every
`TrainingConfig(...)` call of a Python block), but for the commands in RUN_IN_FULL, which run as shipped because
another test checks what their full runs wrote; and `chat` reads its lines from CHAT_INPUT. Charts, reports,
progress bars and trackers stay at their defaults. A command that is identical to one already run is not run
twice (the quickstart appears in both pages). Commands that cannot run here are listed in NOT_RUN with the reason.
"""

from __future__ import annotations

import ast
import io
import json
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from rlhf_time.cli import main
from tests.user_runs import UserFolder

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs/stages.md")  # in reading order: stages.md starts from the README's quickstart
MAX_STEPS = 2
CHAT_INPUT = "把数字写成中文：42\n/reset\n把数字写成中文：7\n\n"

# Commands of the pages that this test does not run, each with the reason (matched on the command's start).
NOT_RUN = {
    "python3 -m venv": "creates the environment the suite runs in; CI runs the set-up command itself (.ci/run)",
    ". .venv/bin/activate": "part of the set-up command (see above)",
    "pip install": "part of the set-up command (see above)",
    "python -m pytest tests": "the test suite itself, which CI runs (.ci/run)",
    "rlhf-time webui": "serves a page until stopped; tests/webui/test_browser.py starts it and drives it in Chromium",
    "rlhf-time train examples/sft_full.yaml --nproc 8": "needs 8 GPUs; `--nproc 2` under gloo is run by "
    "tests/distributed/test_data_parallel.py::test_cli_nproc_launches_torchrun_with_tensorboard_on_rank_zero",
}
# `train` commands that run in full, as shipped (not shortened to MAX_STEPS), each with the test that checks those
# very runs in the same working folder (matched on the command's start).
RUN_IN_FULL = {
    "rlhf-time train examples/rlhf_pipeline/": "tests/test_rlhf_pipeline.py runs the pipeline's three steps in full "
    "and checks that its PPO step raises the learned reward",
}
# Blocks that show output or data formats rather than something to run.
SHOWN_ONLY = {"text"}


@dataclass
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    language: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}:{self.language}"


def read_blocks(page: str) -> list[Block]:
    blocks, lines = [], (ROOT / page).read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        opening = re.match(r"^```(\S*)\s*$", lines[index])
        if not opening:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        blocks.append(Block(page, index + 1, opening[1], "\n".join(lines[index + 1:end])))
        index = end + 1
    return blocks


BLOCKS = [block for page in PAGES for block in read_blocks(page)]


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped, `a && b` split."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            commands.append(words[:cut])
            words = words[cut + 1:]
    return commands


def not_run_reason(words: list[str]) -> str | None:
    command = " ".join(words)
    return next((reason for start, reason in NOT_RUN.items() if command.startswith(start)), None)


def with_max_steps(tree: ast.Module) -> ast.Module:
    """Set max_steps=MAX_STEPS in every TrainingConfig(...) call of a Python block."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "TrainingConfig":
            node.keywords = [k for k in node.keywords if k.arg != "max_steps"]
            node.keywords.append(ast.keyword("max_steps", ast.Constant(MAX_STEPS)))
    return ast.fix_missing_locations(tree)


class Reader:
    """Runs the blocks in order in one working folder, each at most once, remembering each one's outcome."""

    def __init__(self, user_folder: UserFolder):
        self.user_folder = user_folder
        self.folder = user_folder.folder
        self.outcomes: dict[int, BaseException | None] = {}
        self.commands_run: set[str] = set()
        self.skipped: list[tuple[str, str]] = []

    def run_through(self, index: int) -> None:
        for earlier in range(index + 1):
            if earlier not in self.outcomes:
                try:
                    self._run(BLOCKS[earlier])
                    self.outcomes[earlier] = None
                except BaseException as error:  # noqa: BLE001 - kept and re-raised by that block's own test
                    self.outcomes[earlier] = error
        failed_before = [BLOCKS[i].id for i in range(index) if self.outcomes[i] is not None]
        if self.outcomes[index] is not None:
            note = f" (earlier blocks failed too: {', '.join(failed_before)})" if failed_before else ""
            raise AssertionError(f"{BLOCKS[index].id} failed{note}") from self.outcomes[index]

    def _run(self, block: Block) -> None:
        runner = getattr(self, f"_run_{block.language or 'unlabelled'}", None)
        assert runner is not None or block.language in SHOWN_ONLY, (
            f"{block.id}: no way to run a ```{block.language} block; label output ```text or teach this test")
        if runner is not None:
            runner(block)

    def _run_python(self, block: Block) -> None:
        from rlhf_time.stages import STAGES

        tree = with_max_steps(ast.parse(block.code, filename=block.id))
        registered = dict(STAGES)
        try:
            exec(compile(tree, block.id, "exec"), {"__name__": "__docs__"})  # noqa: S102 - the page's own code
        finally:  # a stage a page registers (register_stage) stays that page's
            STAGES.clear()
            STAGES.update(registered)

    def _run_bash(self, block: Block) -> None:
        for words in shell_commands(block.code):
            command = " ".join(words)
            reason = not_run_reason(words)
            if reason:
                self.skipped.append((command, reason))
                continue
            assert words[0] == "rlhf-time", f"{block.id}: `{command}` is neither an rlhf-time command nor in NOT_RUN"
            if command in self.commands_run:
                continue
            argv = words[1:]
            if argv[0] == "train":
                in_full = any(command.startswith(start) for start in RUN_IN_FULL)
                run = self.user_folder.train([*argv[1:], *([] if in_full else [f"max_steps={MAX_STEPS}"])])
                assert run.code == 0, f"{block.id}: `{command}` exited with {run.code}"
                self.commands_run.add(command)
                continue
            stdin = sys.stdin
            sys.stdin = io.StringIO(CHAT_INPUT if argv[0] == "chat" else "")
            try:
                code = main(argv)
            finally:
                sys.stdin = stdin
            assert code == 0, f"{block.id}: `{command}` exited with {code}"
            self.commands_run.add(command)

    def _run_yaml(self, block: Block) -> None:
        """A config excerpt: it must be a valid TrainingConfig as written."""
        import yaml

        from rlhf_time import TrainingConfig

        TrainingConfig(**yaml.safe_load(block.code))

    def _run_jsonl(self, block: Block) -> None:
        for line in block.code.splitlines():
            assert isinstance(json.loads(line), dict), f"{block.id}: {line}"


@pytest.fixture(scope="module")
def reader(user_folder) -> Reader:
    return Reader(user_folder)


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[block.id for block in BLOCKS])
def test_block_runs_as_written(index, reader, monkeypatch):
    monkeypatch.chdir(reader.folder)
    monkeypatch.setenv("RLHF_TIME_CACHE", str(reader.user_folder.cache))  # the tiny model, built as on a new machine
    reader.run_through(index)


def test_the_pages_have_runnable_blocks_and_every_skip_has_a_reason():
    train_commands = [" ".join(words) for block in BLOCKS if block.language == "bash"
                      for words in shell_commands(block.code) if words[:2] == ["rlhf-time", "train"]]
    for stage_example in ("sft_full", "sft_lora", "sft_freeze", "rm", "dpo", "kd", "grpo", "ppo"):
        assert f"rlhf-time train examples/{stage_example}.yaml" in train_commands
    assert "rlhf-time train" in train_commands  # the quickstart, before the examples that start from its model
    for start, reason in [*NOT_RUN.items(), *RUN_IN_FULL.items()]:
        assert reason.strip() and any(" ".join(words).startswith(start) for block in BLOCKS if block.language == "bash"
                                      for words in shell_commands(block.code)), f"unused entry: {start}"
    assert shell_commands("a b \\\n  c && d # note\n# comment only\n") == [["a", "b", "c"], ["d"]]
