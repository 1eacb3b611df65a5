"""Deterministic, offline Chinese/English chat data of realistic shapes for the real-vocabulary benchmarks.

Prompts of 20-600 tokens and responses of 10-300 tokens (uniform, so ~310 and ~155 on average), half the
records Chinese, half English, a few mixing both, counted with the tokenizer the benchmark trains with.
Sentences are drawn from fixed word lists with a seeded RNG: the text is not meaningful, but its token
statistics (CJK characters, Latin words, digits, punctuation, newlines) are those of real chat data.
"""

from __future__ import annotations

import random

PROMPT_TOKENS, RESPONSE_TOKENS = (20, 600), (10, 300)
# Qwen's ChatML, written out as templates so rlhf_time and TRL tokenise exactly the same text.
PROMPT_TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
RESPONSE_TEMPLATE = "{response}"

EN_WORDS = (
    "model data training loss gradient learning rate batch token sequence attention layer weight memory speed "
    "python function return value list string number file error question answer example result method system "
    "user network server request response time today people world city river mountain music history science "
    "simple quick careful important different possible available better larger smaller first second last next "
    "explain describe compare write show find check use make take give build run test read keep change start"
).split()
ZH_WORDS = (
    "模型 数据 训练 损失 梯度 学习率 批次 序列 注意力 参数 内存 速度 函数 返回 数值 列表 字符串 文件 错误 问题 答案 "
    "例子 结果 方法 系统 用户 网络 服务器 请求 时间 今天 我们 你们 他们 世界 城市 河流 山脉 音乐 历史 科学 简单 "
    "快速 仔细 重要 不同 可能 更好 更大 第一 第二 最后 下一步 解释 描述 比较 写出 显示 查找 检查 使用 构建 运行 "
    "测试 阅读 保持 改变 开始 因为 所以 但是 如果 然后 已经 还是 非常 一些 这个 那个 可以 需要 应该"
).split()


def _sentence(rng: random.Random, chinese: bool) -> str:
    if chinese:
        words = rng.choices(ZH_WORDS, k=rng.randint(4, 12))
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randint(1, 2048)))
        return "".join(words) + rng.choice("。，！？；") + ("\n" if rng.random() < 0.1 else "")
    words = rng.choices(EN_WORDS, k=rng.randint(5, 16))
    if rng.random() < 0.2:
        words.insert(rng.randrange(len(words)), str(rng.randint(1, 2048)))
    text = " ".join(words).capitalize() + rng.choice(".,!?;:")
    return text + ("\n" if rng.random() < 0.1 else " ")


def _text(rng: random.Random, count_tokens, target: int, chinese: bool) -> str:
    """Whole sentences until the text has at least `target` tokens (a little more: sentences are not cut)."""
    parts, tokens = [], 0
    while tokens < target:
        sentence = _sentence(rng, chinese if rng.random() > 0.05 else not chinese)  # ~5% code-switching
        parts.append(sentence)
        tokens += count_tokens(sentence)
    return "".join(parts).strip()


def make_chat_records(count: int, tokenizer, seed: int = 0, *, prompt_tokens: tuple[int, int] = PROMPT_TOKENS,
                      response_tokens: tuple[int, int] = RESPONSE_TOKENS) -> list[dict[str, str]]:
    """`count` {"prompt", "response"} records, the same for a given (count, seed, lengths) on every machine; the
    token ranges default to realistic chat shapes (quick checks pass shorter ones)."""
    rng = random.Random(seed)
    count_tokens = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    records = []
    for _ in range(count):
        chinese = rng.random() < 0.5
        records.append({"prompt": _text(rng, count_tokens, rng.randint(*prompt_tokens), chinese),
                        "response": _text(rng, count_tokens, rng.randint(*response_tokens), chinese)})
    return records


def make_preference_pairs(count: int, tokenizer, seed: int = 0, *, prompt_tokens: tuple[int, int] = PROMPT_TOKENS,
                          response_tokens: tuple[int, int] = RESPONSE_TOKENS) -> list[dict[str, str]]:
    """`count` {"prompt", "chosen", "rejected"} pairs: one prompt, two independently drawn responses (token
    ranges as in make_chat_records)."""
    rng = random.Random(seed + 1)
    count_tokens = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    pairs = []
    for _ in range(count):
        chinese = rng.random() < 0.5
        pairs.append({"prompt": _text(rng, count_tokens, rng.randint(*prompt_tokens), chinese),
                      "chosen": _text(rng, count_tokens, rng.randint(*response_tokens), chinese),
                      "rejected": _text(rng, count_tokens, rng.randint(*response_tokens), chinese)})
    return pairs


def character_variety(prompts: list[str], completions: list[str], **_) -> list[float]:
    """A reward for GRPO on these prompts (bench/gpu_check.py): distinct characters / characters of each completion.
    Any score that differs within a group gives non-zero advantages; the check measures speed, not learning."""
    return [len(set(text)) / max(len(text), 1) for text in completions]
