"""Saved folders carry the layout used in training: custom prompt/response templates become the tokenizer's
chat template, so an exported model answers as the adapter did through transformers and `rlhf-time predict`;
export writes the base model's dtype (or --dtype) and merges into bases given as hub ids."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_time import SFTrainer
from rlhf_time.cli import main
from rlhf_time.data.tokenize import ConversationEncoder
from rlhf_time.templates import bos_text_for, training_chat_template

from .trainer.helpers import tiny_config

PROMPT_TEMPLATE = '问："{prompt}"\n'
RESPONSE_TEMPLATE = "答：{response}\n"


def _layout(prompt):
    """The training layout written out by hand (the tiny tokenizer adds no BOS)."""
    return f'问："{prompt}"\n答：'


@pytest.mark.parametrize("system_prompt", [None, "你是一个{AI}助手。\\ \"引号\""])
def test_chat_template_gives_the_training_tokens(tiny_tokenizer, system_prompt):
    tokenizer = tiny_tokenizer
    template = training_chat_template(prompt_template=PROMPT_TEMPLATE, response_template=RESPONSE_TEMPLATE,
                                      system_prompt=system_prompt, bos_text=bos_text_for(tokenizer),
                                      eos_token=tokenizer.eos_token)
    conversation = [{"role": "user", "content": "1+1 😀"}, {"role": "assistant", "content": "二"},
                    {"role": "user", "content": "x{prompt}y"}, {"role": "assistant", "content": "三\n"}]
    system = system_prompt + "\n" if system_prompt else ""
    expected = system + '问："1+1 😀"\n答：二\n<|im_end|>问："x{prompt}y"\n答：三\n\n<|im_end|>'
    old, tokenizer.chat_template = tokenizer.chat_template, template
    try:
        assert tokenizer.apply_chat_template(conversation, tokenize=False) == expected
        assert tokenizer.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True) == \
            system + '问："1+1 😀"\n答：'
        # The ids training uses (segments tokenised separately) equal the template's text tokenised whole.
        encoder = ConversationEncoder(tokenizer, prompt_template=PROMPT_TEMPLATE, response_template=RESPONSE_TEMPLATE,
                                      system_prompt=system_prompt)
        [(input_ids, _)] = encoder.encode_many([encoder.segments(conversation)])
        assert input_ids == tokenizer(expected, add_special_tokens=False)["input_ids"]
    finally:
        tokenizer.chat_template = old


def _greedy(model, tokenizer, texts, new_tokens=8, forced=False):
    """Greedy answers; forced=True generates exactly new_tokens (no early end) so there is always text to compare."""
    answers = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, min_new_tokens=new_tokens if forced else 0)
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers


def _predict(model_dir, prompts, tmp_path, name):
    prompt_file, out = tmp_path / f"{name}.txt", tmp_path / f"{name}.jsonl"
    prompt_file.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    assert main(["predict", str(model_dir), "--input", str(prompt_file), "--output", str(out), "max_new_tokens=8"]) == 0
    return [json.loads(line)["prediction"] for line in out.read_text(encoding="utf-8").splitlines()]


def test_export_of_a_templated_lora_answers_like_the_adapter(tmp_path, tiny_model_dir):
    from peft import PeftModel

    # One small step: the adapter is non-zero (B moved off its zero init) while the tiny model's answers are not
    # yet the end-of-turn token (after a few more steps every path would answer "", which compares nothing).
    config = tiny_config(tmp_path, tiny_model_dir, use_lora=True, lora_target_modules=None, learning_rate=1e-4,
                         max_steps=1, prompt_template=PROMPT_TEMPLATE, response_template=RESPONSE_TEMPLATE)
    trainer = SFTrainer(config)
    trainer.train()
    adapter, merged = trainer.run_dir / "final", tmp_path / "merged"
    assert main(["export", str(adapter), str(merged)]) == 0
    prompts = [json.loads(line)["prompt"] for line in open(config.eval_file, encoding="utf-8")][:4]

    # The adapter through peft + transformers, prompts laid out by hand as in training.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    assert any(bool(p.abs().sum()) for n, p in peft_model.named_parameters() if "lora_B" in n)
    adapter_answers = _greedy(peft_model, tokenizer, [_layout(p) for p in prompts])
    adapter_forced = _greedy(peft_model, tokenizer, [_layout(p) for p in prompts], forced=True)
    assert all(adapter_answers), adapter_answers  # non-empty answers to compare
    # The stock ChatML layout (what an export without the training template would use) answers differently.
    chatml = [f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n" for p in prompts]
    assert _greedy(peft_model, tokenizer, chatml) != adapter_answers

    # The merged folder through plain transformers: its chat template gives the training layout.
    merged_tokenizer = AutoTokenizer.from_pretrained(merged)
    texts = [merged_tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                  add_generation_prompt=True) for p in prompts]
    assert texts == [_layout(p) for p in prompts]
    merged_model = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert _greedy(merged_model, merged_tokenizer, texts) == adapter_answers
    assert _greedy(merged_model, merged_tokenizer, texts, forced=True) == adapter_forced

    # `rlhf-time predict` on the adapter and on the merged folder.
    assert _predict(adapter, prompts, tmp_path, "adapter") == adapter_answers
    assert _predict(merged, prompts, tmp_path, "merged") == adapter_answers


def _bf16_base_and_adapter(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    base_dir = tmp_path / "base_bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(base_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def _weight_dtypes(folder):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return {handle.get_slice(name).get_dtype() for name in handle.keys()}


def test_export_keeps_the_base_dtype_or_the_one_asked_for(tmp_path, tiny_model_dir):
    base_dir, adapter_dir = _bf16_base_and_adapter(tmp_path, tiny_model_dir)
    assert main(["export", str(adapter_dir), str(tmp_path / "default")]) == 0
    assert _weight_dtypes(tmp_path / "default") == {"BF16"}
    assert main(["export", str(adapter_dir), str(tmp_path / "fp32"), "--dtype", "float32"]) == 0
    assert _weight_dtypes(tmp_path / "fp32") == {"F32"}
    assert main(["export", str(adapter_dir), str(tmp_path / "fp16"), "--dtype", "float16"]) == 0
    assert _weight_dtypes(tmp_path / "fp16") == {"F16"}
    # The merge itself: W + scale * B @ A, computed here from the adapter's own tensors.
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as handle:
        a = handle.get_tensor(next(k for k in handle.keys() if "layers.0.self_attn.q_proj.lora_A" in k))
        b = handle.get_tensor(next(k for k in handle.keys() if "layers.0.self_attn.q_proj.lora_B" in k))
    expected = base.model.layers[0].self_attn.q_proj.weight + config["lora_alpha"] / config["r"] * b @ a
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, expected)


def test_export_merges_into_a_base_given_as_a_hub_id_from_the_cache(tmp_path, tiny_model_dir, monkeypatch):
    import huggingface_hub.constants

    base_dir, adapter_dir = _bf16_base_and_adapter(tmp_path, tiny_model_dir)
    # The layout huggingface_hub gives a downloaded repo: models--org--name/{refs/main, snapshots/<commit>/...}.
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-base" / "snapshots" / "0123abc"
    shutil.copytree(base_dir, snapshot)
    (cache / "models--someone--tiny-base" / "refs").mkdir()
    (cache / "models--someone--tiny-base" / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "base_model_name_or_path": "someone/tiny-base"}))
    shutil.rmtree(base_dir)  # only the cache holds the base now
    assert main(["export", str(adapter_dir), str(tmp_path / "merged")]) == 0
    assert _weight_dtypes(tmp_path / "merged") == {"BF16"}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged") is not None


def test_export_of_a_hub_base_that_is_not_available_is_one_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import huggingface_hub.constants

    _, adapter_dir = _bf16_base_and_adapter(tmp_path, tiny_model_dir)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config_path = adapter_dir / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": "no/such"}))
    assert main(["export", str(adapter_dir), str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "no/such" in err and "Traceback" not in err
