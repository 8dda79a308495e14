"""The package's import graph: every arrow points down the layering, and there is no cycle.

Layers, lowest first (README "Package layout"); a module may import its own package and the
packages before it. Every import counts, including ones inside functions.
"""

import ast
import importlib.util
import pathlib

import lora_jax

LAYERS = ["core", "lora", "quant", "variants", "checkpoint", "scale", "interop", "models",
          "recipes", "cli"]
ROOT = pathlib.Path(lora_jax.__file__).parent


def _imports(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.level:
                raise AssertionError(f"{path}: relative import 'from {'.' * node.level}"
                                     f"{node.module}'; use absolute lora_jax.* imports")
            yield node.module, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "lora_jax" and len(parts) > 1 else None


def test_imports_point_down_the_layers():
    bad = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "__init__.py":
            continue
        own = rel.parts[0].removesuffix(".py")
        for module, line in _imports(path):
            dep = _layer(module)
            if dep is None or dep == own:
                continue
            if dep not in LAYERS or LAYERS.index(dep) > LAYERS.index(own):
                bad.append(f"{rel}:{line} ({own}) imports {module}")
    assert not bad, "\n".join(bad)


def test_cross_package_imports_use_the_package_api():
    """Across packages only names a package's ``__init__`` exports are imported."""
    bad = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        own = rel.parts[0].removesuffix(".py")
        for module, line in _imports(path):
            if _layer(module) in (None, own) or rel.name == "__init__.py":
                continue
            spec = importlib.util.find_spec(module)
            if spec is None or spec.submodule_search_locations is None:   # a module, not a package
                bad.append(f"{rel}:{line} imports {module}")
    assert not bad, "\n".join(bad)
