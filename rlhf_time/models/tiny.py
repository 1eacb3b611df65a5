"""The embedded default model: a ~2M-parameter Qwen3-architecture LM and a byte-level BPE tokenizer, built offline.

`model_name="tiny"` resolves to a folder made here, deterministically (fixed seed), and cached; from then on it
is loaded exactly like any local Hugging Face model folder. The tokenizer ships inside the package
(`tiny_tokenizer/tokenizer.json`); `train_tiny_tokenizer()` is how that file was made.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from rlhf_time.models.families import QWEN_CHAT_TEMPLATE

TOKENIZER_DIR = Path(__file__).parent / "tiny_tokenizer"
PAD_TOKEN, BOS_TOKEN, END_OF_TURN_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

TINY_MODEL_CONFIG = dict(
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)
TINY_SEED = 1234


def train_tiny_tokenizer(vocab_size: int = 2048) -> None:
    """Retrain the shipped tokenizer (deterministic) from the quickstart task and a small bilingual corpus."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from rlhf_time.data.quickstart import make_records

    corpus = [r["prompt"] + r["response"] for r in make_records(3000, seed=7)]
    corpus += _BILINGUAL_CORPUS.split("\n") * 4
    tokenizer = Tokenizer(models.BPE())
    # Digits and CJK characters are split one by one, so a number or a Chinese answer tokenises the same way
    # wherever it stands (a tiny vocabulary cannot afford merges of whole Chinese phrases anyway).
    cjk = Regex("[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]")
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Split(cjk, behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, BOS_TOKEN, END_OF_TURN_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    TOKENIZER_DIR.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(TOKENIZER_DIR / "tokenizer.json"))


def load_tiny_tokenizer():
    """The shipped tokenizer as a transformers fast tokenizer with ChatML and pad/eos set."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(TOKENIZER_DIR / "tokenizer.json"),
        eos_token=END_OF_TURN_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[BOS_TOKEN],
        model_max_length=TINY_MODEL_CONFIG["max_position_embeddings"],
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE  # ChatML, without Qwen3's reasoning blocks
    return tokenizer


def build_tiny_model(tokenizer):
    """A freshly initialised tiny Qwen3ForCausalLM; identical weights on every call (fixed seed)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **TINY_MODEL_CONFIG,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def tiny_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Build (once) and return the folder of the embedded default model, keyed by its recipe."""
    recipe = json.dumps({"config": TINY_MODEL_CONFIG, "seed": TINY_SEED}, sort_keys=True)
    recipe += (TOKENIZER_DIR / "tokenizer.json").read_text(encoding="utf-8")
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    root = Path(cache_dir or os.environ.get("RLHF_TIME_CACHE", Path.home() / ".cache" / "rlhf_time"))
    target = root / f"tiny-qwen3-{digest}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root))
    tokenizer = load_tiny_tokenizer()
    build_tiny_model(tokenizer).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.replace(staging, target)  # atomic; a concurrent builder may have won the race
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


_BILINGUAL_CORPUS = """You are a helpful assistant.
你是一个AI助手。
你好，请介绍一下你自己。
Hello! How can I help you today?
请回答以下问题：
回答：
The quick brown fox jumps over the lazy dog.
What is the capital of France? The capital of France is Paris.
机器学习是人工智能的一个分支。
Large language models are trained on text and fine-tuned on instructions.
大语言模型通过监督微调学习遵循指令。
Translate the following sentence into English.
今天天气很好，我们去公园散步吧。
Please answer the question briefly.
user assistant system
The answer is yes. The answer is no.
数字 零 一 二 三 四 五 六 七 八 九 十 百 千 万
Instruction: Input: Output: Response:
### Instruction:
### Response:"""
