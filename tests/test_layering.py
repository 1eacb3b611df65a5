"""The package's layers import downwards only: config, data, loss and models below generation/inference, those
below the trainer, the trainer below the quickstart and the CLI. Checked on every import statement, including
the lazy ones inside functions."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rlhf_time"
# Lower number = lower layer; a module may import its own layer or any lower one.
LAYERS = {
    "errors": 0, "constants": 0, "stages": 0, "atomic": 0, "downloads": 0, "logs": 0, "storage": 0, "__main__": 7,
    "config": 1, "config_docs": 1,
    "loss": 2, "data": 2, "templates": 2,
    "models": 3,
    "generation": 4, "plots": 4, "rollout": 4, "inference": 5, "report": 5, "rewards": 5,
    "trainer": 6,
    "quickstart": 7, "cli": 7, "__init__": 8,
}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else "__init__"]


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
