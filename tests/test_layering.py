"""The package's layers import downwards only: config, data, loss and models below the sampler and inference,
those below the runtime, the runtime below the experience layer, that below the stages' trainers, and those below
the quickstart, the CLI and the web UI. Checked on every import statement, including the lazy ones inside functions.

A module's layer is that of the longest dotted prefix listed: `stages` (the registry and each stage's options,
which the config reads) is at the bottom while `stages.sft` (a trainer) is near the top."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rlhf_time"
# Lower number = lower layer; a module may import its own layer or any lower one.
LAYERS = {
    "errors": 0, "constants": 0, "atomic": 0, "downloads": 0, "logs": 0, "storage": 0, "user_functions": 0,
    "stages": 0, "stages.section": 0,  # the stage registry and the option sections (torch-free)
    "config": 1, "config_checks": 1, "config_docs": 1, "config_errors": 1, "config_yaml": 1,
    "loss": 2, "data": 2, "templates": 2,
    "models": 3,
    "experience": 4, "experience.sampler": 4, "experience.paged_engine": 4, "experience.engines": 4, "plots": 4, "agents": 4,
    "inference": 5, "report": 5, "experience.rewards": 5, "experience.environments": 5, "experience.agent_loop": 5,
    "runtime": 6,
    "experience.critic": 7, "experience.experience": 7,
    "stages.trainers": 8, "stages.sft": 8, "stages.preference": 8, "stages.reward": 8, "stages.dpo": 8, "stages.kto": 8, "stages.online_dpo": 8,
    "stages.kd": 8, "stages.on_policy": 8, "stages.grpo": 8, "stages.ppo": 8,
    "quickstart": 9, "cli": 9, "webui": 9,  # the web UI sits beside the CLI (which starts it) and runs it
    "__init__": 10, "__main__": 10,
}


def _layer(module: str) -> int:
    parts = module.split(".")[1:] or ["__init__"]
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in LAYERS:
            if prefix == "stages" and len(parts) > 1 and not parts[1].endswith("_options"):
                raise AssertionError(f"rlhf_time.{'.'.join(parts)}: add its layer to LAYERS")
            return LAYERS[prefix]
    raise AssertionError(f"rlhf_time.{'.'.join(parts)}: add its layer to LAYERS")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlhf_time"):
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names if alias.name.startswith("rlhf_time")]
    return names


def test_every_import_goes_down_the_layers():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(("rlhf_time", *path.relative_to(PACKAGE).with_suffix("").parts))
        own = _layer(module)
        wrong += [f"{module} -> {target}" for target in _imports(path) if _layer(target) > own]
    assert wrong == []


def _module_graph() -> dict[str, set[str]]:
    """Each rlhf_time module -> the rlhf_time modules it imports (lazy imports included; a package is its
    __init__; `from package import module` names the module)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        modules[".".join(("rlhf_time", *parts))] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: climb from this module's package
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in modules else base)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_no_import_cycle():
    """No two modules import each other, directly or through others (strongly connected components of size 1)."""
    graph = _module_graph()
    order, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(module):
        order[module] = low[module] = len(order)
        stack.append(module)
        on_stack.add(module)
        for target in graph[module]:
            if target not in order:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], order[target])
        if low[module] == order[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in graph:
        if module not in order:
            visit(module)
    assert cycles == []
    assert "rlhf_time.data.streaming" in graph["rlhf_time.data.validation"]  # the graph sees real imports
