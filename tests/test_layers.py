"""The package's structure as the design states it, checked on the source:

- layers, each importing only those at or below it: cli -> training/inference -> nn -> ops ->
  backends -> kernels, with the base helpers (_atomic, _json, _layout, _scratch, _extension) under all;
  nn does not reach into kernels, and nothing above nn reaches into ops or kernels;
- no import circle between modules (imports inside functions count: they are circles at run time);
- nn/ makes no decision about how an op runs (no device, extension, autocast, compile or backend
  checks): the op tables in ops/ are the one place.
"""
import ast
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "ahnet_fast"

BASE = {"ahnet_fast._atomic", "ahnet_fast._json", "ahnet_fast._build", "ahnet_fast._layout", "ahnet_fast._scratch", "ahnet_fast._extension",
        "ahnet_fast.kernels.errors"}
UPPER = ("ahnet_fast.training", "ahnet_fast.inference", "ahnet_fast.memory", "ahnet_fast.metrics", "ahnet_fast.detection",
         "ahnet_fast.plots", "ahnet_fast.data", "ahnet_fast.benchmark")


def layer(module: str) -> int:
    if module in BASE:
        return 0
    if module.startswith("ahnet_fast.kernels"):
        return 1
    if module == "ahnet_fast.backends":
        return 2
    if module.startswith("ahnet_fast.ops"):
        return 3
    if module.startswith("ahnet_fast.nn"):
        return 4
    if module.startswith(UPPER) or module == "ahnet_fast":  # the package re-exports the user API
        return 5
    if module in ("ahnet_fast.cli", "ahnet_fast.__main__"):
        return 6
    raise AssertionError(f"{module} is in no layer: add it to tests/test_layers.py")


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """ahnet_fast modules that ``name`` imports anywhere in its source (a package's ``from p
    import x`` counts as importing p.x when that is a module, else p)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("ahnet_fast")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            if base.startswith("ahnet_fast"):
                out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {m for m in out if m in known and m != name}


GRAPH = {name: imports(name, path, set(modules())) for name, path in modules().items()}


def test_every_module_is_in_a_layer_and_imports_only_at_or_below_it():
    wrong = []
    for name, targets in GRAPH.items():
        if name == "ahnet_fast":
            continue  # the package itself: the public API, re-exported
        for target in targets:
            if name == "ahnet_fast._extension" and target == "ahnet_fast":
                continue  # `from ahnet_fast import _C`: the compiled library, not the package's API
            if layer(target) > layer(name):
                wrong.append(f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("importer,forbidden", [
    (4, ("ahnet_fast.kernels",)),  # nn -> ops only
    (5, ("ahnet_fast.ops", "ahnet_fast.kernels")),  # training/inference -> nn only, no shortcut into ops
    (6, ("ahnet_fast.ops", "ahnet_fast.kernels")),
])
def test_no_layer_is_skipped(importer, forbidden):
    wrong = [f"{name} imports {target}" for name, targets in GRAPH.items() if name != "ahnet_fast"
             and layer(name) == importer for target in targets if target.startswith(forbidden)]
    assert not wrong, "\n".join(wrong)


def test_no_import_circle():
    graph = {n: {t for t in ts if t != "ahnet_fast"} for n, ts in GRAPH.items() if n != "ahnet_fast"}
    # the package facade is where everything starts, not a module the others depend on for code
    state, path, circles = {}, [], []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + "."):
                continue  # a package importing its own submodules to re-export them
            if state.get(nxt) == "open":
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not circles, "\n".join(circles)


# What deciding how an op runs looks like in source: these belong in ops/ (the tables), not in nn/.
DECISIONS = {"extension_available", "is_compiling", "autocast_dtype", "get_autocast_dtype", "is_autocast_enabled",
             "requested_backend", "forced_path", "use_path", "triton_interpreted", "is_cuda", "select", "dispatch"}


def test_modules_decide_nothing_about_how_ops_run():
    found = []
    for path in sorted((ROOT / "nn").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            if name in DECISIONS:
                found.append(f"{path.name}:{node.lineno} uses {name}")
            # x.device.type == "cpu" and the like
            if isinstance(node, ast.Attribute) and node.attr == "type" and isinstance(node.value, ast.Attribute) and \
                    node.value.attr == "device":
                found.append(f"{path.name}:{node.lineno} checks a device type")
    assert not found, "\n".join(found)


def test_the_checks_find_what_they_look_for(tmp_path):
    """The scans above are not vacuous: they see an upward import and a device check."""
    bad = tmp_path / "bad.py"
    bad.write_text("from ahnet_fast.training import loop\nimport torch\nif x.device.type == 'cpu': pass\n")
    assert imports("ahnet_fast.ops.bad", bad, set(modules())) == {"ahnet_fast.training.loop"}
    tree = ast.parse(bad.read_text())
    assert any(isinstance(n, ast.Attribute) and n.attr == "type" and getattr(n.value, "attr", None) == "device"
               for n in ast.walk(tree))
    assert layer("ahnet_fast.training.loop") > layer("ahnet_fast.ops.bad")


def test_every_kernel_file_has_an_op_module_of_its_name():
    """One name per op across the tree: csrc/cpu/<op>.cpp (and <op>.<variant>.cpp) and kernels/triton/<op>.py belong to
    ahnet_fast/ops/<op>.py, which has tests/test_<op>.py and benchmarks/test_bench_<op>.py."""
    repo = ROOT.parent
    ops = {p.stem for p in (ROOT / "ops").glob("*.py") if not p.stem.startswith("_")}
    kernels = {p.name.split(".")[0] for p in (repo / "csrc" / "cpu").glob("*.cpp")} | \
        {p.stem for p in (ROOT / "kernels" / "triton").glob("*.py") if not p.stem.startswith("_")}
    assert kernels - ops == set(), f"kernel files without an op module of the same name: {sorted(kernels - ops)}"
    missing = [f"{kind}{op}.py" for op in sorted(ops) for kind, folder in (("test_", "tests"),
                                                                       ("test_bench_", "benchmarks"))
               if not (repo / folder / f"{kind}{op}.py").exists()]
    assert not missing, f"ops without their test or microbenchmark file: {missing}"


def test_every_registered_op_and_schema_carries_its_op_name():
    """The name in backends.register is the op module's name, and every schema under
    torch.ops.ahnet_fast (C++ and Python-defined) starts with a registered op's name, so a kernel
    found in a profile leads back to its op module."""
    import torch

    import ahnet_fast  # noqa: F401  (registers every op)
    from ahnet_fast import backends

    ops = set(backends.registered()) | {"aniso_conv"}  # aniso_conv's paths are its own table
    modules = {p.stem for p in (ROOT / "ops").glob("*.py") if not p.stem.startswith("_")}
    assert set(backends.registered()) <= modules, \
        f"ops registered under a name with no ahnet_fast/ops/<name>.py: {sorted(set(backends.registered()) - modules)}"
    for module in sorted(modules):  # define the lazily registered Triton custom ops, so their names are checked too
        op_module = importlib.import_module(f"ahnet_fast.ops.{module}")
        for define in ("_triton_op", "_triton_ops"):
            if hasattr(op_module, define):
                getattr(op_module, define)()
    schemas = {s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("ahnet_fast::")}
    schemas |= {name for name in dir(torch.ops.ahnet_fast) if not name.startswith("_") and name != "name"
                and isinstance(getattr(torch.ops.ahnet_fast, name), torch._ops.OpOverloadPacket)}
    assert schemas, "no ahnet_fast schema found"
    stray = sorted(s for s in schemas if not any(s == op or s.startswith(op + "_") for op in ops))
    assert not stray, f"schemas that do not start with an op's name: {stray}"
