"""The layers stay apart: backends never import the model layer, and the model layer never touches a vendor.

Both checks read the source with `ast` (nothing is imported), so they hold on any machine.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ROOT / "backends"
CORE = ROOT / "dsv3"

#: modules only a backend may import
VENDOR_MODULES = ("triton", "torch_npu", "aiter", "apex", "flash_mla", "deep_gemm", "vllm", "sglang")
#: attribute chains that branch on, or probe, the hardware
HARDWARE_ATTRIBUTES = ("torch.version.hip", "torch.version.cuda", "torch.cuda", "torch.npu")


def python_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*.py") if "__pycache__" not in path.parts)


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import statement, wherever it stands (top level, function, try)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def dotted(node: ast.AST) -> str | None:
    """"torch.cuda.is_available" for that attribute chain, None for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", python_files(BACKENDS), ids=relative)
def test_backend_code_imports_nothing_of_the_model_layer(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    wrong = [f"{relative(path)}:{line} imports {module}" for line, module in imported_modules(tree)
             if (module == "dsv3" or module.startswith("dsv3.")) and not module.startswith("dsv3.backends")]
    assert not wrong, "backends/ must not import the model layer: " + "; ".join(wrong)


@pytest.mark.parametrize("path", python_files(CORE), ids=relative)
def test_model_layer_imports_no_vendor_module_and_never_branches_on_hardware(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    wrong = [f"{relative(path)}:{line} imports {module}" for line, module in imported_modules(tree)
             if module.split(".")[0] in VENDOR_MODULES]
    for node in ast.walk(tree):
        name = dotted(node) if isinstance(node, ast.Attribute) else None
        if name and any(name == attr or name.startswith(attr + ".") for attr in HARDWARE_ATTRIBUTES):
            wrong.append(f"{relative(path)}:{node.lineno} reads {name}")
        if isinstance(node, ast.Attribute) and node.attr == "get_device_capability":
            wrong.append(f"{relative(path)}:{node.lineno} calls get_device_capability")
    assert not wrong, "dsv3/ asks its backend, never the hardware: " + "; ".join(sorted(set(wrong)))


def test_the_checks_see_what_they_look_for():
    """The two walkers find a nested import and a hardware branch (so an empty answer means something)."""
    tree = ast.parse("def f():\n    from dsv3.errors import Dsv3Error\n"
                     "    if torch.version.hip:\n        import triton\n")
    assert [module for _, module in imported_modules(tree)] == ["dsv3.errors", "triton"]
    assert "torch.version.hip" in {dotted(node) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
