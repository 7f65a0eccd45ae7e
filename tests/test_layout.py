"""The layout's promises: imports run one way (scripts -> pipelines -> drpo_utils), no cycles, the method
file holds only the method, and no module reaches into sys.path."""

import ast
import os
import subprocess
import sys

from conftest import ROOT

PROJECT_DIRS = ("pipelines", "benchmarks")
SCRIPTS = ("train_drpo", "train_drpo_sdxl")


def project_modules() -> dict[str, str]:
    """Module name -> file, for every Python file of the project outside tests/."""
    modules = {name: os.path.join(ROOT, f"{name}.py") for name in (*SCRIPTS, "drpo_utils")}
    for top in PROJECT_DIRS:
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for file in files:
                if file.endswith(".py"):
                    relative = os.path.relpath(os.path.join(folder, file), ROOT)[:-3].replace(os.sep, ".")
                    modules[relative.removesuffix(".__init__")] = os.path.join(folder, file)
    return modules


def imported_modules(path: str, modules: dict[str, str]) -> set[str]:
    """Project modules a file imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            # the longest project module the name refers to (``from pipelines import training`` -> pipelines.training)
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_modules(path, modules) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_among_project_modules():
    graph = import_graph()
    assert {"drpo_utils", "pipelines.training", "pipelines.rewards", "pipelines.features"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_run_one_way():
    graph = import_graph()
    assert graph["drpo_utils"] == set(), graph["drpo_utils"]
    for name, targets in graph.items():
        if name.startswith("pipelines"):
            assert not targets & set(SCRIPTS), (name, targets)  # pipelines never import a script
            assert not any(t.startswith("benchmarks") for t in targets), (name, targets)


def test_importing_the_method_loads_no_pipeline_and_no_script():
    code = ("import sys, drpo_utils; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pipelines', 'train_drpo', 'train_drpo_sdxl', "
            "'benchmarks')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def changes_sys_path(path: str) -> bool:
    """Whether a file calls sys.path.insert/append/extend/remove or assigns to sys.path."""
    for node in ast.walk(ast.parse(open(path).read())):
        target = node.func.value if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else None
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
        if isinstance(target, ast.Attribute) and target.attr == "path" and getattr(target.value, "id", None) == "sys":
            return True
    return False


def test_no_sys_path_manipulation_outside_conftest():
    files = list(project_modules().values())
    for folder, _, names in os.walk(os.path.join(ROOT, "tests")):
        files += [os.path.join(folder, n) for n in names if n.endswith(".py") and n != "conftest.py"]
    assert [os.path.relpath(f, ROOT) for f in files if changes_sys_path(f)] == []


def test_the_sys_path_check_sees_insertions(tmp_path):
    (tmp_path / "a.py").write_text("import sys\nsys.path.insert(0, 'x')\n")
    (tmp_path / "b.py").write_text("import sys\nprint(sys.modules)  # sys.path in a comment\n")
    assert changes_sys_path(str(tmp_path / "a.py")) and not changes_sys_path(str(tmp_path / "b.py"))


def test_method_file_and_modules_stay_small():
    sizes = {name: sum(1 for _ in open(path)) for name, path in project_modules().items()}
    assert sizes["drpo_utils"] <= 550, sizes["drpo_utils"]  # the online and offline method, and nothing else
    assert max(sizes.values()) <= 620, max(sizes.items(), key=lambda item: item[1])
