"""The layout's promises: imports run one way (scripts -> pipelines -> drpo_utils), no cycles, the method
file holds only the method, and no module reaches into sys.path."""

import ast
import os
import re
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
    assert {"drpo_utils", "pipelines.runtime", "pipelines.rewards", "pipelines.features"} <= set(graph)
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


# Module and function size limits, with the exceptions each justified:
LINE_LIMIT, FUNCTION_LIMIT = 450, 60
# the method and nothing else (with the released recipe's options, and the one-step generator of each family:
# scheduler-stepped UNets, FLUX's flow matching), one file, imports no project module (DESIGN)
LONGER_MODULES = {"drpo_utils": 680}
LONGER_FUNCTIONS = {("pipelines.rewards.server", "make_handler"): 90}  # the stdlib server, rebuilt by issue 24


def function_lengths(path: str) -> dict[str, int]:
    tree = ast.parse(open(path).read())
    return {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_modules_and_functions_stay_small():
    too_long = {}
    for name, path in project_modules().items():
        lines = sum(1 for _ in open(path))
        if lines > LONGER_MODULES.get(name, LINE_LIMIT):
            too_long[name] = lines
        for function, length in function_lengths(path).items():
            if length > LONGER_FUNCTIONS.get((name, function), FUNCTION_LIMIT):
                too_long[f"{name}.{function}"] = length
    assert too_long == {}


def namespace_parameters(path: str) -> list[str]:
    """Functions taking an argparse namespace: a parameter named ``args`` / ``namespace`` or annotated
    ``argparse.Namespace`` (``*args`` is not one)."""
    found = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for arg in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
                annotation = ast.unparse(arg.annotation) if arg.annotation is not None else ""
                if arg.arg in ("args", "namespace") or "Namespace" in annotation:
                    found.append(f"{node.name}({arg.arg})")
    return found


def test_only_the_configuration_builder_reads_the_argparse_namespace():
    """Modules take typed configs (pipelines/config.py); pipelines/cli.py builds them from the flags, the
    scripts and their own ``main`` excepted (a tool's ``main(args=None)`` takes an argv list)."""
    readers = {name: found for name, path in project_modules().items()
               if name.startswith("pipelines") and name != "pipelines.cli"
               and (found := [f for f in namespace_parameters(path) if not f.startswith("main(")])}
    assert readers == {}


def test_the_namespace_rule_sees_an_args_parameter(tmp_path):
    (tmp_path / "a.py").write_text("import argparse\n\ndef f(args):\n    pass\n\ndef g(x: argparse.Namespace):\n"
                                   "    pass\n\ndef h(*args):\n    pass\n")
    assert namespace_parameters(str(tmp_path / "a.py")) == ["f(args)", "g(x)"]


# String literals equal to a method's name outside its own module and the registry, allowed for a reason:
PROJECT_NAME_USES = {("pipelines.cli", "drpo"): "the default tracker project name",
                     ("pipelines.config", "drpo"): "the default tracker project name",
                     ("pipelines.report", "drpo"): "the project's tag on the Hub, whatever the method"}


def string_constants(path: str) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(open(path).read()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def test_every_method_name_is_written_only_in_its_own_module():
    """A method is one entry of pipelines/methods.py: no other module keeps a list of method names."""
    import importlib

    import train_drpo  # noqa: F401 - registers DrPO
    from pipelines import methods

    modules = {name: path for name, path in project_modules().items() if not name.startswith("benchmarks")}
    for name, method in methods.registered().items():
        home = importlib.import_module(method.update.__module__).__name__
        elsewhere = sorted(module for module, path in modules.items()
                           if module not in (home, "pipelines.methods") and name in string_constants(path)
                           and (module, name) not in PROJECT_NAME_USES)
        assert elsewhere == [], (name, home)


CLOCKS = {"time", "perf_counter", "monotonic", "process_time", "time_ns", "perf_counter_ns", "monotonic_ns"}
TIMED_KEYS = re.compile(r"seconds|latency|per_micro_step|elapsed|speedup|over_bound|_time$")  # benchmark results
ORDERINGS = (ast.Lt, ast.LtE, ast.Gt, ast.GtE)


def clock_assertions(source: str) -> list[int]:
    """Lines of ``assert`` statements that depend on a clock: one that calls time.time() / perf_counter() /
    monotonic() (or their _ns forms), or that orders (<, >) a duration against anything but 0 — a duration
    being a name assigned from a clock reading or from a benchmark result's timing key (``["..._seconds"]``),
    or derived from one. ``duration > 0`` is allowed: it holds on any machine."""

    def calls_clock(node) -> bool:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Call):
                func = sub.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if name in CLOCKS and (not isinstance(func, ast.Attribute) or getattr(func.value, "id", "") == "time"):
                    return True
        return False

    def is_duration(node, timed_names) -> bool:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and sub.id in timed_names:
                return True
            key = getattr(sub, "slice", None) if isinstance(sub, ast.Subscript) else None
            if isinstance(key, ast.Constant) and isinstance(key.value, str) and TIMED_KEYS.search(key.value):
                return True
        return calls_clock(node)

    def orders_a_duration(node, timed_names) -> bool:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Compare) and any(isinstance(op, ORDERINGS) for op in sub.ops):
                operands = [sub.left, *sub.comparators]
                others = [o for o in operands if not is_duration(o, timed_names)]
                if len(others) < len(operands) and not all(isinstance(o, ast.Constant) and o.value == 0
                                                           for o in others):
                    return True
        return False

    def own_nodes(scope):
        """The scope's nodes, without those of functions defined inside it (they are scopes of their own)."""
        stack = list(ast.iter_child_nodes(scope))
        while stack:
            node = stack.pop()
            yield node
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                stack.extend(ast.iter_child_nodes(node))

    lines = set()
    tree = ast.parse(source)
    for scope in [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))]:
        timed = set()  # per function: a name means what it was assigned there
        for _ in range(3):  # names derived from timed names (start -> elapsed -> ratio)
            for node in own_nodes(scope):
                if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and node.value is not None \
                        and is_duration(node.value, timed):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    timed |= {t.id for target in targets for t in ast.walk(target) if isinstance(t, ast.Name)}
        lines |= {node.lineno for node in own_nodes(scope) if isinstance(node, ast.Assert)
                  and (calls_clock(node) or orders_a_duration(node, timed))}
    return sorted(lines)


def test_no_test_asserts_a_wall_clock_time():
    """Timing belongs to benchmarks/ and the README: a test that asserts a duration fails on a busy machine."""
    offenders = {}
    for name in sorted(os.listdir(os.path.join(ROOT, "tests"))):
        if name.endswith(".py"):
            with open(os.path.join(ROOT, "tests", name), encoding="utf-8") as handle:
                if lines := clock_assertions(handle.read()):
                    offenders[name] = lines
    assert offenders == {}


def test_the_clock_rule_sees_timed_assertions():
    assert clock_assertions("import time\nstart = time.time()\nwork()\nassert time.time() - start < 5\n") == [4]
    assert clock_assertions("from time import perf_counter\nt0 = perf_counter()\nelapsed = perf_counter() - t0\n"
                            "ratio = elapsed / 2\nassert ratio < 1\n") == [5]
    assert clock_assertions("import time\ndeadline = time.time() + 5\nwhile time.time() < deadline:\n    pass\n"
                            "assert done()\n") == []
    assert clock_assertions("def a():\n    start = time.time()\n\n\ndef b(start):\n    assert start\n") == []
    # a benchmark's timing result: ordered against a threshold is flagged, positivity is not
    assert clock_assertions("serial = result['per_micro_step']['serial']\nhidden = (serial - 1) / 2\n"
                            "assert hidden > 0.4\nassert result['drpo_seconds'] > 0\n") == [3]


POSIX_ONLY = {"fcntl", "termios", "tty", "pty", "pwd", "grp", "resource", "posix", "crypt", "syslog"}


def top_level_imports(source: str) -> set[str]:
    """Modules a file imports when it is imported (module level, not inside a function or class)."""
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_no_module_imports_a_posix_only_module_at_import_time():
    """Importable on Windows and macOS: the output lock is filelock, free memory is psutil, the parent-death
    signal is armed only on Linux (inside a function)."""
    offenders = {}
    for name, path in project_modules().items():
        with open(path, encoding="utf-8") as handle:
            if found := top_level_imports(handle.read()) & POSIX_ONLY:
                offenders[name] = sorted(found)
    assert offenders == {}
    assert top_level_imports("import fcntl\ndef f():\n    import termios\n") == {"fcntl"}  # the rule sees them


def test_the_package_metadata_is_whole():
    """pyproject.toml: every console entry point names a callable that exists; every project module is in
    the package (a top-level module or a pipelines* package; benchmarks/ stays in the clone); requirements.txt installs the extras, not a
    list of its own; pytest only in the test extra."""
    import importlib
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        project = tomllib.load(handle)
    for name, target in project["project"]["scripts"].items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name
    top_level = set(project["tool"]["setuptools"]["py-modules"])
    for name in project_modules():  # benchmarks/ is the clone's tooling, not the package
        assert name.split(".")[0] in top_level | {"pipelines", "benchmarks"}, f"{name} is outside the package"
    extras = project["project"]["optional-dependencies"]
    assert set(extras) >= {"hps", "imagereward", "geneval", "judge", "test", "all"}
    assert not any("pytest" in dependency for dependency in project["project"]["dependencies"])
    with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as handle:
        requirements = [line.strip() for line in handle if line.strip() and not line.startswith("#")]
    assert requirements == ["-e .[all]"]
