"""User functions named in a config (reward functions, tools): a "package.module:function" import string or a
"path/file.py:function" file, imported and checked to be callable."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from rlhf_time.errors import RlhfTimeError


def import_function(spec: str, what: str, error: type[RlhfTimeError] = RlhfTimeError) -> tuple[str, Callable]:
    """(attribute name, function) of "package.module:function" or "path/file.py:function"; `what` ("reward
    function", "tool") opens each error message, raised as `error`."""
    module_name, colon, attribute = spec.rpartition(":") if isinstance(spec, str) else ("", "", "")
    if not colon or not module_name or not attribute:
        raise error(f"{what} {spec!r}: expected an import string 'package.module:function' or 'path/to/file.py:function'")
    try:
        module = _import_file(module_name) if module_name.endswith(".py") else importlib.import_module(module_name)
    except Exception as failure:  # ModuleNotFoundError, a missing file, or the module itself failing to import
        raise error(f"{what} {spec!r}: cannot import {module_name!r} ({type(failure).__name__}: {failure})") from None
    fn = getattr(module, attribute, None)
    if fn is None:
        raise error(f"{what} {spec!r}: module {module_name!r} has no attribute {attribute!r}")
    if not callable(fn):
        raise error(f"{what} {spec!r}: {attribute!r} is a {type(fn).__name__}, not a function")
    return attribute, fn


def resolve_function_file(spec: object, folder: Optional[str | Path]) -> object:
    """"file.py:function" with file.py relative to folder (e.g. the YAML's) when that file exists there; any other
    spec as given (a file that is not in folder stays relative to the working directory)."""
    file, colon, name = spec.rpartition(":") if isinstance(spec, str) else ("", "", "")
    if folder is None or not colon or not file.endswith(".py") or Path(file).is_absolute():
        return spec
    candidate = Path(folder) / file
    return f"{os.path.normpath(candidate) if candidate.exists() else file}:{name}"


def _import_file(path: str):
    """A module given as a file path (relative to the working directory), e.g. examples/grpo_rewards.py."""
    file = Path(path).resolve()
    if not file.is_file():
        raise FileNotFoundError(f"no file {file}")
    name = f"rlhf_time_rewards_{file.stem}"
    module_spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # so pickling / multiprocessing can find its functions
    module_spec.loader.exec_module(module)
    return module
