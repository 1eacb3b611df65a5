"""Run under torchrun by test_fsdp_loading.py: `loading_worker.py MODEL_DIR OUT_DIR MODE [key=value ...]`.

MODE `today`: every rank loads the full model, then FSDP shards it (the loading before rank-0 loading existed).
MODE `rank0`: parallel.load_model (rank 0 loads, the others build on the meta device) then shard_model.
MODE `aux_today`: a frozen auxiliary model (a KD teacher, cast to bf16) loaded as it was before rank-0 loading:
every rank loads it fully, moves and casts it, then FSDP shards it.
MODE `aux`: the same teacher through auxiliary.build_auxiliary_model, then shard_model (as the loop does).
Each rank writes its peak-RSS growth during loading + sharding and its random state; rank 0 writes the
gathered full weights.
"""

import hashlib
import json
import resource
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from rlhf_time.config import TrainingConfig, parse_overrides
from rlhf_time.models import apply_tuning, load_causal_lm, model_family
from rlhf_time.models import load_tokenizer
from rlhf_time.runtime import parallel
from rlhf_time.runtime.auxiliary import AuxiliaryModel, build_auxiliary_model
from rlhf_time.runtime.distributed import init_distributed
from tests.distributed import exit_probe

torch.set_num_threads(1)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main(model_dir: str, out_dir: str, mode: str, overrides: list[str]) -> None:
    exit_probe.watch(out_dir, launch=mode)
    config = TrainingConfig(model_name=model_dir, model_type=None, distributed="fsdp", **parse_overrides(overrides))
    dist = init_distributed("cpu")
    family = model_family(config)

    def build(meta: bool):
        return apply_tuning(load_causal_lm(config, meta=meta), config, family)

    build(True)  # imports the model's code first: only the weights' memory is measured
    torch.manual_seed(config.seed)
    before = peak_rss_bytes()

    if mode == "today":
        model = build(False).to(dist.device)
    elif mode == "rank0":
        model = parallel.load_model(build, config, dist)
    elif mode == "aux_today":
        model = load_causal_lm(config, path=model_dir).to(dist.device).to(torch.bfloat16).eval().requires_grad_(False)
    else:
        teacher = AuxiliaryModel("teacher", source=model_dir, same_vocabulary=True, cast_to_amp_dtype=True)
        model = build_auxiliary_model(teacher, None, load_tokenizer(config), config, dist, torch.bfloat16)
    parallel.shard_model(model, config)
    grown = peak_rss_bytes() - before
    out = Path(out_dir)
    rng = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()
    (out / f"{mode}-rank{dist.rank}.json").write_text(json.dumps({"peak_growth": grown, "rng": rng}))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.is_main:
        save_file({k: v.contiguous() for k, v in full.items()}, str(out / f"{mode}.safetensors"))
    exit_probe.note_running()  # the library leaves the group at exit, after this function has let go of the model


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
