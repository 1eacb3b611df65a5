"""Record formats -> input_ids/labels, checked against the tokenizer directly (pieces tokenised by hand here)."""

import pytest
from transformers import AutoTokenizer

from rlhf_time import TrainingConfig
from rlhf_time.data import load_sft_dataset
from rlhf_time.inference import render_generation_prompt
from tests.conftest import write_jsonl

IGNORE = -100


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def expected(tokenizer, pieces):
    """(input_ids, labels) from (text, is_target) pieces, each tokenised on its own."""
    input_ids, labels = [], []
    for text, target in pieces:
        tokens = ids(tokenizer, text)
        input_ids += tokens
        labels += tokens if target else [IGNORE] * len(tokens)
    return {"input_ids": input_ids, "labels": labels}


def load(tmp_path, tokenizer, records, name="d.jsonl", **config):
    path = write_jsonl(tmp_path / name, records)
    return load_sft_dataset(path, tokenizer, TrainingConfig(**config))


@pytest.fixture(scope="module")
def bos_tokenizer():
    """The tiny tokenizer made to add a BOS token <s> by itself, as Llama-2-style tokenizers do."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    from rlhf_time.models.tiny import TOKENIZER_DIR

    backend = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    backend.add_special_tokens(["<s>"])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", backend.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")


def test_chatml_prompt_response_masks_everything_but_the_reply_and_im_end(tmp_path, tiny_tokenizer):
    example = load(tmp_path, tiny_tokenizer, [{"prompt": "你好", "response": "我是助手"}])[0]
    context = ids(tiny_tokenizer, "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n")
    target = ids(tiny_tokenizer, "我是助手<|im_end|>")
    trailer = ids(tiny_tokenizer, "\n")
    assert example["input_ids"] == context + target + trailer
    assert example["labels"] == [IGNORE] * len(context) + target + [IGNORE] * len(trailer)
    assert target[-1] == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_record_system_field_and_config_system_prompt(tmp_path, tiny_tokenizer):
    own = load(tmp_path, tiny_tokenizer, [{"prompt": "q", "response": "a", "system": "你是一个AI助手。"}],
               system_prompt="ignored when the record has one")[0]
    added = load(tmp_path, tiny_tokenizer, [{"prompt": "q", "response": "a"}], system_prompt="你是一个AI助手。")[0]
    reference = expected(tiny_tokenizer, [
        ("<|im_start|>system\n你是一个AI助手。<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n", False),
        ("a<|im_end|>", True), ("\n", False)])
    assert own == reference and added == reference


def test_multi_turn_messages_train_every_assistant_turn(tmp_path, tiny_tokenizer):
    messages = [{"role": "system", "content": "你是一个AI助手。"}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                {"role": "assistant", "content": "d"}]
    example = load(tmp_path, tiny_tokenizer, [{"messages": messages}])[0]
    assert example == expected(tiny_tokenizer, [
        ("<|im_start|>system\n你是一个AI助手。<|im_end|>\n<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n", False),
        ("b<|im_end|>", True), ("\n<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n", False),
        ("d<|im_end|>", True), ("\n", False)])


def test_sharegpt_with_system_and_two_turns(tmp_path, tiny_tokenizer):
    record = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "a"},
                                {"from": "gpt", "value": "b"}, {"from": "user", "value": "c"},
                                {"from": "assistant", "value": "d"}]}
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    assert load(tmp_path, tiny_tokenizer, [record])[0] == load(tmp_path, tiny_tokenizer, [{"messages": messages}], "m.jsonl")[0]


def test_llama3_template_trains_eot(tmp_path, llama_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_model_dir)
    example = load(tmp_path, tokenizer, [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "again"}, {"role": "assistant", "content": "sure"}]}])[0]
    assert example == expected(tokenizer, [
        ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False), ("yo<|eot_id|>", True),
        ("<|start_header_id|>user<|end_header_id|>\n\nagain<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("sure<|eot_id|>", True)])
    assert example["labels"][-1] == tokenizer.convert_tokens_to_ids("<|eot_id|>")


def test_conversation_opening_with_the_assistant(tmp_path, tiny_tokenizer):
    example = load(tmp_path, tiny_tokenizer, [{"messages": [{"role": "assistant", "content": "hello"},
                                                            {"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "bye"}]}])[0]
    assert example == expected(tiny_tokenizer, [
        ("<|im_start|>assistant\n", False), ("hello<|im_end|>", True),
        ("\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False), ("bye<|im_end|>", True), ("\n", False)])


def test_custom_templates_train_response_and_eos(tmp_path, tiny_tokenizer):
    config = dict(prompt_template="请回答以下问题：{prompt}", response_template="回答：{response}")
    example = load(tmp_path, tiny_tokenizer, [{"prompt": "1+1", "response": "2"}], **config)[0]
    context = ids(tiny_tokenizer, "请回答以下问题：1+1回答：")
    target = ids(tiny_tokenizer, "2" + tiny_tokenizer.eos_token)
    assert example["input_ids"] == context + target
    assert example["labels"] == [IGNORE] * len(context) + target
    # The context is exactly what generation feeds the model for the same prompt.
    prompt = render_generation_prompt(tiny_tokenizer, [{"role": "user", "content": "1+1"}], **config)
    assert ids(tiny_tokenizer, prompt) == context


def test_templates_multi_turn_system_and_braces(tmp_path, tiny_tokenizer):
    config = dict(prompt_template="Q: {prompt}\n", response_template="A: {response}\n")
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "{x} {prompt}"},
                {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                {"role": "assistant", "content": "d"}]
    example = load(tmp_path, tiny_tokenizer, [{"messages": messages}], **config)[0]
    eos = tiny_tokenizer.eos_token
    assert example == expected(tiny_tokenizer, [("sys\nQ: {x} {prompt}\nA: ", False), ("b\n" + eos, True),
                                                ("Q: c\nA: ", False), ("d\n" + eos, True)])
    prompt = render_generation_prompt(tiny_tokenizer, messages[:4], **config)
    assert ids(tiny_tokenizer, prompt) == expected(tiny_tokenizer, [("sys\nQ: {x} {prompt}\nA: ", False), ("b\n" + eos, True),
                                                                    ("Q: c\nA: ", False)])["input_ids"]


def test_one_template_defaults_the_other(tmp_path, tiny_tokenizer):
    only_prompt = load(tmp_path, tiny_tokenizer, [{"prompt": "p", "response": "r"}], prompt_template="Q: {prompt}\n")[0]
    assert only_prompt == expected(tiny_tokenizer, [("Q: p\n", False), ("r" + tiny_tokenizer.eos_token, True)])
    only_response = load(tmp_path, tiny_tokenizer, [{"prompt": "p", "response": "r"}], response_template="\nA: {response}")[0]
    assert only_response == expected(tiny_tokenizer, [("p\nA: ", False), ("r" + tiny_tokenizer.eos_token, True)])


def test_tokenizer_that_adds_bos_gets_it_once_as_context(tmp_path, bos_tokenizer):
    config = dict(prompt_template="Q: {prompt}\n", response_template="A: {response}")
    example = load(tmp_path, bos_tokenizer, [{"prompt": "p", "response": "r"}], **config)[0]
    bos = bos_tokenizer.bos_token_id
    assert example["input_ids"][0] == bos and example["input_ids"].count(bos) == 1 and example["labels"][0] == IGNORE
    assert example == expected(bos_tokenizer, [("<s>Q: p\nA: ", False), ("r<|im_end|>", True)])
    prompt = render_generation_prompt(bos_tokenizer, [{"role": "user", "content": "p"}], **config)
    assert ids(bos_tokenizer, prompt) == ids(bos_tokenizer, "<s>Q: p\nA: ")


def test_chat_template_gets_the_bos_once_when_the_tokenizer_adds_one(tmp_path, bos_tokenizer, tiny_tokenizer):
    from copy import deepcopy

    bos_tokenizer = deepcopy(bos_tokenizer)
    bos_tokenizer.chat_template = tiny_tokenizer.chat_template  # ChatML does not write a BOS
    reply = [("我是助手<|im_end|>", True), ("\n", False)]
    example = load(tmp_path, bos_tokenizer, [{"prompt": "你好", "response": "我是助手"}])[0]
    assert example == expected(bos_tokenizer, [("<s><|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n", False), *reply])
    bos_tokenizer.chat_template = "{{ bos_token }}" + tiny_tokenizer.chat_template  # writes it: not doubled
    example = load(tmp_path, bos_tokenizer, [{"prompt": "你好", "response": "我是助手"}], name="b.jsonl")[0]
    assert example == expected(bos_tokenizer, [("<s><|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n", False), *reply])
    assert example["input_ids"].count(bos_tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("record", [
    {"instruction": "翻译", "input": "cat", "output": "猫"},
    {"conversations": [{"from": "human", "value": "翻译\n\ncat"}, {"from": "gpt", "value": "猫"}]},
    {"messages": [{"role": "user", "content": "翻译\n\ncat"}, {"role": "assistant", "content": "猫"}]},
])
def test_alpaca_sharegpt_messages_match_prompt_response(tmp_path, tiny_tokenizer, record):
    reference = load(tmp_path, tiny_tokenizer, [{"prompt": "翻译\n\ncat", "response": "猫"}], name="ref.jsonl")[0]
    assert load(tmp_path, tiny_tokenizer, [record])[0] == reference


def test_alpaca_without_input_is_the_instruction_alone(tmp_path, tiny_tokenizer):
    reference = load(tmp_path, tiny_tokenizer, [{"prompt": "翻译", "response": "猫"}], name="ref.jsonl")[0]
    assert load(tmp_path, tiny_tokenizer, [{"instruction": "翻译", "input": "", "output": "猫"}])[0] == reference
    assert load(tmp_path, tiny_tokenizer, [{"instruction": "翻译", "output": "猫"}], name="b.jsonl")[0] == reference


def test_truncation_right_cut_left_cut_and_counts(tmp_path, tiny_tokenizer):
    records = [{"prompt": "短", "response": "回" * 100}, {"prompt": "字" * 100, "response": "答案"},
               {"prompt": "ok", "response": "fine"}]
    dataset = load(tmp_path, tiny_tokenizer, records, max_seq_length=32)
    assert (dataset.stats.records, dataset.stats.examples, dataset.stats.truncated, dataset.stats.dropped) == (3, 3, 2, 0)
    right_cut, left_cut, whole = dataset[0], dataset[1], dataset[2]
    full = load(tmp_path, tiny_tokenizer, records, name="full.jsonl")
    assert right_cut["input_ids"] == full[0]["input_ids"][:32] and right_cut["labels"] == full[0]["labels"][:32]
    # Left cut: the prompt loses its start; the answer (shorter than 32 // 4 tokens) is kept whole.
    assert left_cut["input_ids"] == full[1]["input_ids"][-32:] and left_cut["labels"] == full[1]["labels"][-32:]
    assert whole == full[2] and dataset.lengths == [32, 32, len(full[2]["input_ids"])]


def test_left_cut_leaves_a_quarter_for_the_response(tmp_path, tiny_tokenizer):
    full = load(tmp_path, tiny_tokenizer, [{"prompt": "字" * 100, "response": "回" * 100}], name="f.jsonl")[0]
    cut = load(tmp_path, tiny_tokenizer, [{"prompt": "字" * 100, "response": "回" * 100}], max_seq_length=40)[0]
    first_target = next(i for i, label in enumerate(full["labels"]) if label != IGNORE)
    start = first_target - (40 - 40 // 4)  # context cut from the left so that 10 target positions remain
    assert cut["input_ids"] == full["input_ids"][start : start + 40]
    assert sum(label != IGNORE for label in cut["labels"]) == 10


def test_stats_count_tokens(tmp_path, tiny_tokenizer):
    dataset = load(tmp_path, tiny_tokenizer, [{"prompt": "你好", "response": "我是助手"}, {"prompt": "a", "response": "b"}])
    assert dataset.stats.total_tokens == sum(dataset.lengths)
    assert dataset.stats.target_tokens == sum(len(ids(tiny_tokenizer, t + "<|im_end|>")) for t in ("我是助手", "b"))
    assert "2 examples from 2 records" in dataset.stats.summary() and "\n" not in dataset.stats.summary()
    assert dataset.stats.records == dataset.stats.examples + dataset.stats.dropped


def test_max_samples_keeps_the_first_records(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": str(i), "response": "r"} for i in range(5)])
    dataset = load_sft_dataset(path, tiny_tokenizer, TrainingConfig(), max_samples=2)
    assert len(dataset) == 2 and dataset.stats.records == 2
    assert dataset[1] == load_sft_dataset(path, tiny_tokenizer, TrainingConfig())[1]
