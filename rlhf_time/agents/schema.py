"""Tools as Python functions: their JSON schemas (from signature and docstring) and loading them from config specs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from rlhf_time.errors import RlhfTimeError
from rlhf_time.user_functions import import_function, resolve_function_file


def tool_schema(func: Callable) -> dict[str, Any]:
    """{"type": "function", "function": {name, description, parameters}} of a function with type hints and a
    Google-style docstring (one `Args:` line per argument), by transformers.utils.get_json_schema."""
    from transformers.utils import get_json_schema

    name = getattr(func, "__name__", repr(func))
    try:
        return get_json_schema(func)
    except Exception as error:  # DocstringParsingException, TypeHintParsingException
        reason = " ".join(str(error).split())
        raise RlhfTimeError(f"tool {name!r}: no JSON schema from its signature and docstring ({reason}); give every "
                            f"argument a type hint and a Google-style docstring with an 'Args:' line each") from None


def load_tools(specs: Sequence[str | Callable], base_dir: Optional[str | Path] = None) -> list[Callable]:
    """The functions that specs name: "package.module:function", "file.py:function" (file.py next to base_dir, e.g.
    the YAML's folder, else relative to the working directory) or a callable, passed through."""
    functions = []
    for spec in specs:
        if callable(spec):
            functions.append(spec)
        else:
            functions.append(import_function(resolve_function_file(spec, base_dir), "tool")[1])
    names = [getattr(fn, "__name__", "") for fn in functions]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise RlhfTimeError(f"tools: two functions are named {duplicates[0]!r}; a call names its tool by name")
    return functions


def tools_by_name(functions: Sequence[Callable]) -> dict[str, Callable]:
    """{function name: function}, as run_tool_call looks tools up."""
    return {fn.__name__: fn for fn in functions}
