"""The package's modules import one another without a circle: every import counts, at the top of a
module or inside a function (where one could otherwise hide a circle), but for those under
`if TYPE_CHECKING:`, which never run."""

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = [ROOT / "mnist_lab", ROOT / "hydra_plugins" / "mnist_lab_plugins"]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


MODULES = {module_name(path): path for package in PACKAGES for path in package.rglob("*.py")}


def imported(path: Path) -> set[str]:
    """The package's modules that `path` imports (a package's own __init__ aside: importing a
    module of a package always runs it first, which is no circle of ours)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []  # never runs
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    own = module_name(path)
    return {name for name in found if name in MODULES and name != own and not own.startswith(f"{name}.")}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, path = [], {}, []

    def visit(module: str) -> None:
        state[module], _ = "open", path.append(module)
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                found.append(path[path.index(other) :] + [other])
            elif other not in state:
                visit(other)
        state[module], _ = "done", path.pop()

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


def test_the_finder_sees_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_of_the_package_imports_itself_round_a_circle():
    graph = {name: imported(path) for name, path in MODULES.items()}
    assert graph["mnist_lab.resume"] >= {"mnist_lab.run_folder", "mnist_lab.trust"}  # the walk sees imports
    assert not (found := cycles(graph)), "import circles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_package_and_the_command_lines_entry_load_no_torch():
    """`import mnist_lab` (and so `python train.py --help`, a typo's answer) comes before torch and
    Lightning, which take seconds to load: they load when a run starts."""
    code = "import sys, mnist_lab, mnist_lab.api; print(sorted({'torch', 'pytorch_lightning'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
