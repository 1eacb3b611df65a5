"""peft without bitsandbytes unless quantisation is asked for.

peft imports bitsandbytes whenever it is installed (its LoRA layer dispatch asks `is_bnb_available()`), and
bitsandbytes' CPU backend then tries to fetch a kernel from the Hub and prints "Failed to load CPU
gemm_4bit_forward ... trust_remote_code=True" on every LoRA run, merge or export. peft decides with two
lru_cache'd functions in peft.import_utils; answering them "no" once, while bitsandbytes cannot be found, keeps
it out for the rest of the process. A quantised run clears the answers again, so peft finds bitsandbytes.
"""

from __future__ import annotations

import sys

BITSANDBYTES = "bitsandbytes"


def use_bitsandbytes_in_peft(wanted: bool) -> None:
    """Import peft now with bitsandbytes hidden (wanted=False) or make it see bitsandbytes again (wanted=True)."""
    hide = not wanted and BITSANDBYTES not in sys.modules  # once it is loaded, hiding it gains nothing
    if hide:
        sys.modules[BITSANDBYTES] = None  # importlib.util.find_spec answers None for it: "not installed"
    try:
        from peft import import_utils

        for check in (import_utils.is_bnb_available, import_utils.is_bnb_4bit_available):
            if wanted:
                check.cache_clear()
            check()  # cache the answer while bitsandbytes is hidden (or not)
    finally:
        if hide:
            del sys.modules[BITSANDBYTES]  # an explicit `import bitsandbytes` elsewhere still works
