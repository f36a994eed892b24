"""The package's shape: imports point one way (no circles, no lower layer importing an upper one),
the README's pass table is the pipeline's order, and a pass added to the pipeline reaches every
target family."""

import ast
import os
import re

import pytest

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "pockengine")

# Lowest first. A module may import its own layer and those below (a module's layer: the longest
# prefix of its dotted name listed here).
LAYERS = (
    ("leaves", ("errors", "validate", "random", "rounding", "timing", "cache", "torch_kernels", "ir", "artifact_files",
                "targets.device_runner")),
    ("the job", ("optim", "sparse", "awq", "smoothquant", "lora", "lite_residual", "quantize", "frontend", "job")),
    ("autodiff", ("autodiff",)),
    ("passes", ("passes",)),
    ("analyses", ("analysis",)),
    ("tuning logs", ("tuning", "tuning.database")),
    ("pipeline", ("pipeline",)),
    ("presets", ("targets", "targets.aarch64_sysroot", "targets.cuda", "targets.cuda.device")),
    ("target families", ("targets.family", "targets.host", "targets.aarch64", "targets.cuda.kernel_check",
                         "targets.cuda.schedules", "targets.cuda.nvcc", "targets.cuda.family", "targets.cortex_m",
                         "targets.families")),
    ("tuning search", ("tuning.search",)),
    ("runtime", ("runtime", "optimizer_state")),
    ("build", ("build",)),
    # "": the package itself (pockengine/__init__.py)
    ("front doors", ("bench", "sparse_search", "cli", "__main__", "")),
)


def modules() -> dict:
    """{dotted name relative to the package ("" for its __init__): path}."""
    found = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                relative = os.path.relpath(os.path.join(directory, name), PACKAGE)[:-3].replace(os.sep, ".")
                found[relative.removesuffix("__init__").rstrip(".")] = os.path.join(directory, name)
    return found


def imports(name: str, path: str, known: dict) -> set:
    """The package's modules `name` imports, wherever the import statement is (a function-local
    import is still an import)."""
    is_package = path.endswith("__init__.py")
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "pockengine" or alias.name.startswith("pockengine."):
                    found.add(alias.name.removeprefix("pockengine").lstrip("."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == "pockengine" or node.module.startswith("pockengine.")):
                source = node.module.removeprefix("pockengine").lstrip(".")
            else:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}".lstrip(".")
                found.add(submodule if submodule in known else source)
    return {m for m in found if m in known and m != name}


def layer_of(name: str) -> int:
    best, layer = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".") or prefix == "") and len(prefix) > best:
                best, layer = len(prefix), index
    return layer


@pytest.fixture(scope="module")
def graph() -> dict:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_imports_point_down_the_layers(graph):
    wrong = [f"pockengine.{a} ({LAYERS[layer_of(a)][0]}) imports pockengine.{b} ({LAYERS[layer_of(b)][0]})"
             for a, targets in sorted(graph.items()) for b in sorted(targets) if layer_of(b) > layer_of(a)]
    assert not wrong, "\n".join(wrong)


def test_no_import_circles(graph):
    """Tarjan's strongly connected components: any with more than one module is a circle."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not circles, circles


def test_every_module_has_a_layer():
    assert [name for name in modules() if layer_of(name) is None] == []


def test_the_readme_pass_table_is_the_pipelines_order():
    from pockengine import pipeline

    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    table = readme[readme.index("| pass | level | what it does |"):]
    table = table[:table.index("\n\n")]
    rows = [re.match(r"\| ([^|]+) \|", line).group(1).strip() for line in table.splitlines()[2:]]
    named = [row.strip("`") for row in rows if not row.startswith("`memory_plan`")]  # the analyses come last
    assert named == list(pipeline.PASSES)
    assert rows[-1].startswith("`memory_plan`")
    for name in pipeline.PASSES:  # each names a file of pockengine/passes/ (or the tuning-log phase)
        assert name == "(tuning logs)" or os.path.isfile(os.path.join(PACKAGE, "passes", f"{name}.py")), name


def test_a_pass_added_in_the_pipeline_runs_for_every_target_family(monkeypatch):
    """Adding a pass to every target is one line in pipeline.py: here a toy pass put first in
    `dataflow_passes` (as a line in that function would) runs in the build of every family."""
    import tvm

    import pockengine as pe
    from pockengine import pipeline
    from pockengine.job import load_job
    from pockengine.targets import resolve

    seen = []

    @tvm.transform.module_pass(opt_level=0, name="Toy")
    def toy(mod, _ctx):
        seen.append(str(tvm.target.Target.current().kind.name))
        return mod

    original = pipeline.dataflow_passes

    def with_toy(lowering, target, signature, plan_memory=True):
        return [toy] + original(lowering, target, signature, plan_memory)

    monkeypatch.setattr(pipeline, "dataflow_passes", with_toy)
    job = load_job(os.path.join(ROOT, "examples", "mlp_digits", "train.py"))
    built = []
    for name in ("host", "rpi4", "jetson-orin", "cortex-m4"):
        preset = resolve(name)
        if preset.missing_tools("build"):
            continue  # `make test` installs them; without them this family cannot build here
        before = len(seen)
        program = pe.compile(job, preset)
        assert seen[before:] == [preset.target().kind.name] and program.meta["family"] == preset.family
        built.append(preset.family)
    assert "host" in built and len(set(built)) == len(built)


def test_importing_the_compiler_parses_none_of_tvms_tensor_intrinsics():
    """tvm.s_tir.tensor_intrin's __init__ parses every TVMScript intrinsic TVM ships (CUDA's too): it
    cost every process that imported pockengine.build 2.5 minutes (the CLI, the artifact tests, the
    tuning builders). The compiler registers the two it uses itself (passes/schedule_int8_dot.py)."""
    import subprocess
    import sys

    code = ("import sys, pockengine, pockengine.build, pockengine.pipeline, pockengine.cli; "
            "print([m for m in sys.modules if m.startswith('tvm.s_tir.tensor_intrin')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
