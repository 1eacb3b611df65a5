"""Load a tokenizer and a causal LM (or a reward model) from a local folder, the hub, or the embedded default."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError
from torch import nn

from rlhf_time.config import TINY_MODEL_NAME, TrainingConfig
from rlhf_time.downloads import download_progress
from rlhf_time.errors import RlhfTimeError
from rlhf_time.models.checks import looks_like_hub_id, require_existing_folder, require_safetensors, require_tokenizer
from rlhf_time.models.families import ModelFamily, resolve_family
from rlhf_time.models.peft_import import use_bitsandbytes_in_peft
from rlhf_time.models.precision import load_dtype, quantization_config, target_device

log = logging.getLogger(__name__)


def resolve_model_path(name: str, model_source: str = "huggingface") -> str:
    """'tiny' -> the cached embedded default (built on first use); a model id with model_source modelscope -> its
    local ModelScope snapshot (downloaded if needed); anything else is passed through."""
    if name == TINY_MODEL_NAME:
        from rlhf_time.models.tiny import tiny_model_path

        return str(tiny_model_path())
    if model_source == "modelscope" and not Path(name).exists():
        from rlhf_time.models.modelscope import modelscope_snapshot

        return modelscope_snapshot(name)
    return name


def load_tokenizer(config: TrainingConfig, path: str | None = None):
    """The model's tokenizer with a pad token and a chat template guaranteed."""
    from transformers import AutoTokenizer

    source = path or resolve_model_path(config.model_name, config.model_source)
    tokenizer = _from_pretrained(AutoTokenizer, source, config.trust_remote_code)
    require_tokenizer(tokenizer, source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_family(config: TrainingConfig, path: str | None = None) -> ModelFamily:
    from transformers import AutoConfig

    source = adapter_base(path or resolve_model_path(config.model_name, config.model_source))
    hf_config = _from_pretrained(AutoConfig, source, config.trust_remote_code)
    return resolve_family(config.model_type, config.is_set("model_type"), hf_config.model_type)


def adapter_base(source: str) -> str:
    """For a LoRA adapter folder (adapter_config.json, no config.json) the base model it was trained on."""
    folder = Path(source)
    adapter_config = folder / "adapter_config.json"
    if adapter_config.is_file() and not (folder / "config.json").is_file():
        import json

        return json.loads(adapter_config.read_text(encoding="utf-8"))["base_model_name_or_path"]
    return source


def ensure_chat_template(tokenizer, family: ModelFamily) -> None:
    """Give a tokenizer without a chat template its family's (only used when no custom templates are set)."""
    if not getattr(tokenizer, "chat_template", None):
        log.info("tokenizer has no chat template; using the %s family's", family.name)
        tokenizer.chat_template = family.chat_template


def load_causal_lm(config: TrainingConfig, path: str | None = None, *, head: str = "causal_lm",
                   meta: bool = False) -> nn.Module:
    """The model in its load dtype (precision.load_dtype: float32 master weights unless the base is frozen or
    model_dtype says otherwise), on CPU, or quantised on the training device; head='reward' gives a 1-label
    sequence-classification model. meta=True: the same architecture on the meta device, no weights read
    (FSDP fills each rank's shards later)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    source = path or resolve_model_path(config.model_name, config.model_source)
    base = adapter_base(source)
    if config.use_lora or base != source:  # peft comes next (transformers imports it for an adapter folder too)
        use_bitsandbytes_in_peft(wanted=config.quantization != "none")
    if path is None and base != source and not config.use_lora and head == "causal_lm":
        # model_name is a LoRA adapter folder and the whole model trains (or predicts): start from base + adapter
        # merged, as `export` would write it; transformers alone would load a frozen adapter and nothing to train.
        model = load_causal_lm(config, path=resolve_model_path(base, config.model_source), meta=meta)
        return model if meta else merge_lora_adapter(model, source).requires_grad_(True)  # peft froze the base
    if path is None:
        require_safetensors(source, "model_name")
    kwargs = dict(dtype=load_dtype(config), attn_implementation=config.attn_implementation or "sdpa")
    if meta:
        factory = AutoModelForSequenceClassification if head == "reward" else AutoModelForCausalLM
        extra = {"num_labels": 1} if head == "reward" else {}
        hf_config = _from_pretrained(AutoConfig, source, config.trust_remote_code, **extra)
        with torch.device("meta"):
            return factory.from_config(hf_config, trust_remote_code=config.trust_remote_code, **kwargs)
    # Only the policy (model_name) is quantised: a frozen reference or teacher given by `path` loads in model_dtype.
    quantization = quantization_config(config) if path is None else None
    if quantization is not None:  # bitsandbytes quantises while loading, on the device the weights go to
        kwargs.update(quantization_config=quantization, device_map={"": str(target_device(config))})
    if head == "reward":
        kwargs["num_labels"] = 1
        return _from_pretrained(AutoModelForSequenceClassification, source, config.trust_remote_code, **kwargs)
    return _from_pretrained(AutoModelForCausalLM, source, config.trust_remote_code, **kwargs)


def merge_lora_adapter(model: nn.Module, adapter: str) -> nn.Module:
    """`model` with the LoRA adapter in folder `adapter` merged into its weights (a plain model again)."""
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise RlhfTimeError(f"{adapter}: not a LoRA adapter folder (no adapter_config.json)")
    require_safetensors(adapter, "adapter")
    use_bitsandbytes_in_peft(wanted=False)  # a frozen merge never needs it; if already loaded, it stays
    from peft import PeftModel

    log.info("merging adapter %s (trained on %s)", adapter, adapter_base(adapter))
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def _from_pretrained(factory, source: str, trust_remote_code: bool, **kwargs):
    if factory.__name__.startswith("AutoModel"):  # weights: safetensors only, local or from the hub
        require_safetensors(source, "model")
        kwargs.setdefault("use_safetensors", True)
    if not Path(source).exists():
        if not looks_like_hub_id(source):  # a wrong local path: say so now, not after a minute of hub retries
            raise RlhfTimeError(f"model {source}: folder not found")
        source = _hub_snapshot_or_fail(source)
    try:
        with download_progress():
            return factory.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as error:
        raise RlhfTimeError(f"cannot load {source}: {str(error).splitlines()[0]}") from None
    except SafetensorError as error:
        raise RlhfTimeError(f"cannot load {source}: a *.safetensors file is truncated or corrupt ({error}); "
                            f"copy or download it again") from None


def require_model_source(name: str, field: str, model_source: str = "huggingface") -> None:
    """Fail before anything loads, naming the config field (ref_model, teacher_model, ...), when `name` is a local
    path that does not exist, a file, or a hub id neither cached nor reachable."""
    if name == TINY_MODEL_NAME or model_source == "modelscope":
        return
    require_existing_folder(name, field)
    if not Path(name).exists():
        _hub_snapshot_or_fail(name, field)


def _hub_snapshot_or_fail(repo_id: str, field: str = "model_name") -> str:
    """A hub id already in the local cache loads from there; otherwise the hub must be reachable."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id=repo_id, filename="config.json")
    except ValueError:  # not a valid repo id
        cached = None
    if isinstance(cached, str):
        return str(Path(cached).parent)
    if not _hub_reachable():
        raise RlhfTimeError(
            f"{field} {repo_id!r} is not a local folder, not in the Hugging Face cache, and the Hub cannot be "
            f"reached (offline?). Download it first and pass the local path"
            + (", or use model_name=tiny." if field == "model_name" else ".")
        )
    return repo_id


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect instead of the hub client's minute of retries when offline."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False
