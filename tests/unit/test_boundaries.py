"""The package's shape, checked from the source: imports go one way (no cycle; the product never imports
the launcher; the command-line tools are leaves; the kernels stand alone), and only
gorilla_dist/engine/ reads private fields of DeepSpeed or megatron-core or replaces their functions.

Each rule is also run on a small piece of code that breaks it, so a scanner that finds nothing because
it looks at nothing fails here."""

from __future__ import annotations

import ast
import importlib.util
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOTS = {"gorilla_dist": REPO / "gorilla_dist", "launcher": REPO / "launcher"}
CLIS = ("gorilla_dist.generate", "gorilla_dist.evaluate", "gorilla_dist.export", "gorilla_dist.checkpoint.__main__",
        "gorilla_dist.data.prepare", "gorilla_dist.worker", "gorilla_dist.finetune.check")
"""Entry points nothing may import."""
LIBRARIES = ("deepspeed", "megatron")
DEEPSPEED_FIELDS = {
    # parameters and optimizers (ZeRO partitions, fp32 masters, links between them)
    "ds_id", "ds_shape", "ds_tensor", "ds_numel", "fp32_partitioned_groups_flat", "single_partition_of_fp32_groups",
    "bit16_groups", "bf16_groups", "fp16_groups", "fp32_groups", "fp32_groups_flat_partition",
    "averaged_gradients", "loss_scaler", "loss_scale_config",
    # the engine's counters and switches
    "skipped_steps", "global_steps", "global_samples", "enable_backward_allreduce", "clip_fp32_gradients",
    "get_global_grad_norm",
}
"""DeepSpeed fields without a leading underscore that are internals all the same."""


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in ROOTS.items():
        for f in folder.rglob("*.py"):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = f
    return found


def imported_names(name: str, path: Path, tree: ast.AST):
    """(absolute module name, imported attribute or None, node) for every import statement, at any depth."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                yield base, alias.name, node


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports (the most specific module an import names)."""
    def resolve(target: str) -> str | None:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        return target or None

    graph = {}
    for name, path in mods.items():
        edges = set()
        for base, attr, _ in imported_names(name, path, ast.parse(path.read_text())):
            target = resolve(f"{base}.{attr}" if attr else base)
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def graph():
    return import_graph(modules())


def test_the_import_graph_has_no_cycle(graph):
    assert len(graph) > 40  # the scan sees the package
    assert cycles(graph) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_product_never_imports_the_launcher(graph):
    wrong = {m: sorted(t for t in targets if t.startswith("launcher")) for m, targets in graph.items()
             if m.startswith("gorilla_dist")}
    assert {m: t for m, t in wrong.items() if t} == {}
    assert "gorilla_dist.runtime" in graph["launcher.backends"]  # shared helpers come from the product


def test_command_line_tools_are_leaves(graph):
    assert all(cli in graph for cli in CLIS)
    importers = {cli: sorted(m for m, targets in graph.items() if cli in targets) for cli in CLIS}
    assert {cli: who for cli, who in importers.items() if who} == {}


def test_kernels_import_nothing_else_of_the_package(graph):
    kernels = [m for m in graph if m.startswith("gorilla_dist.kernels")]
    assert len(kernels) >= 7
    outside = {m: sorted(t for t in graph[m] if not t.startswith("gorilla_dist.kernels")) for m in kernels}
    assert {m: t for m, t in outside.items() if t} == {}


# ---- only the engine knows DeepSpeed's and megatron-core's internals ----

def _is_private(attr: str) -> bool:
    return attr.startswith("_") and not attr.startswith("__")


def _module_aliases(name: str, path: Path, tree: ast.AST) -> set[str]:
    """Local names bound to a module object (import x / import x.y as z / from x import submodule)."""
    aliases = set()
    for base, attr, node in imported_names(name, path, tree):
        for alias in node.names:
            if attr is None:
                aliases.add(alias.asname or alias.name.split(".")[0])
            elif alias.name == attr and _is_module(f"{base}.{attr}"):
                aliases.add(alias.asname or attr)
    return aliases


def _is_module(dotted: str) -> bool:
    try:
        return importlib.util.find_spec(dotted) is not None
    except (ImportError, ValueError):
        return False


def internals_used(name: str, path: Path, source: str) -> list[str]:
    """What `source` (module `name`) does that only gorilla_dist/engine/ may do: import DeepSpeed; import a
    private name from another module; read or write a private attribute of anything but self/cls, or a
    DeepSpeed internal field; assign into a module object (monkeypatching) or swap an object's class."""
    tree = ast.parse(source)
    found = []

    def where(node) -> str:
        return f"{path.name}:{node.lineno}"

    for base, attr, node in imported_names(name, path, tree):
        if base.split(".")[0] == "deepspeed":
            found.append(f"{where(node)} imports {base}")
        if attr and _is_private(attr) and not base.startswith(name):
            found.append(f"{where(node)} imports private {base}.{attr}")
    modules_here = _module_aliases(name, path, tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if _is_private(node.attr) and owner not in ("self", "cls"):
                found.append(f"{where(node)} uses private attribute .{node.attr}")
            elif node.attr in DEEPSPEED_FIELDS:
                found.append(f"{where(node)} uses DeepSpeed's .{node.attr}")
            if isinstance(node.ctx, ast.Store) and (owner in modules_here or node.attr == "__class__" or (
                    isinstance(node.value, ast.Subscript) and ast.unparse(node.value.value) == "sys.modules")):
                found.append(f"{where(node)} assigns {ast.unparse(node)} (a module's attribute or a class)")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            field = node.args[1].value
            if _is_private(field) or field in DEEPSPEED_FIELDS:
                found.append(f"{where(node)} {node.func.id}(..., {field!r})")
    return found


def test_only_the_engine_reads_or_patches_library_internals():
    mods = modules()
    outside = {n: p for n, p in mods.items() if not n.startswith("gorilla_dist.engine")}
    assert len(outside) > 35 and any(n.startswith("gorilla_dist.engine.") for n in mods)
    found = {n: internals_used(n, p, p.read_text()) for n, p in outside.items()}
    assert {n: f for n, f in found.items() if f} == {}
    # the engine itself does all of these (the scan would see them anywhere else)
    engine = [f for n, p in mods.items() if n.startswith("gorilla_dist.engine") for f in internals_used(n, p, p.read_text())]
    for kind in ("imports deepspeed", "private attribute", "DeepSpeed's .", "assigns", "hasattr"):
        assert any(kind in f for f in engine), kind


def test_the_internals_scan_finds_each_kind_of_access():
    source = textwrap.dedent("""
        import sys
        import deepspeed.comm
        import megatron.core.tensor_parallel.layers as layers
        from megatron.core.tensor_parallel import random as mrandom
        from megatron.core.tensor_parallel.random import _set_all_rng_states

        def f(engine, p, rope):
            engine._global_grad_norm = 1.0
            layers.get_tensor_model_parallel_group_if_none = None
            mrandom.anything = None
            sys.modules["deepspeed.comm.torch"].build_shm_op = None
            rope.__class__ = object
            if hasattr(p, "ds_id") or getattr(engine.optimizer, "_hp_optimizer_states_linked", False):
                return p.ds_shape, engine.skipped_steps
    """)
    found = internals_used("gorilla_dist.example", REPO / "gorilla_dist" / "example.py", source)
    text = "\n".join(found)
    for expected in ["imports deepspeed.comm", "imports private megatron.core.tensor_parallel.random._set_all_rng_states",
                     "private attribute ._global_grad_norm", "assigns layers.get_tensor_model_parallel_group_if_none",
                     "assigns mrandom.anything", "assigns sys.modules['deepspeed.comm.torch'].build_shm_op",
                     "assigns rope.__class__", "hasattr(..., 'ds_id')", "getattr(..., '_hp_optimizer_states_linked')",
                     "DeepSpeed's .ds_shape", "DeepSpeed's .skipped_steps"]:
        assert expected in text, f"{expected!r} not in:\n{text}"


# ---- sizes, names: each decided in one place ----

PARALLEL_DIMS = "gorilla_dist.config.parallel"
"""The one module that derives a parallel size from the world size (ParallelDims)."""


def sizes_from_world(source: str) -> list[str]:
    """Divisions of a world size (world, world_size, WORLD_SIZE, nproc...) by a model-parallel size (tp, pp,
    cp, tensor/model-parallel sizes): a data-parallel size computed outside ParallelDims."""
    import re

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.FloorDiv, ast.Div)):
            left, right = ast.unparse(node.left), ast.unparse(node.right)
            if (re.search(r"world|nproc", left, re.IGNORECASE)
                    and re.search(r"\b[tpc]p\b|tensor|model_parallel", right, re.IGNORECASE)):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_only_parallel_dims_computes_a_data_parallel_size():
    mods = modules()
    assert PARALLEL_DIMS in mods and "ParallelDims" in mods[PARALLEL_DIMS].read_text()
    found = {n: sizes_from_world(p.read_text()) for n, p in mods.items() if n != PARALLEL_DIMS}
    assert {n: f for n, f in found.items() if f} == {}
    broken = textwrap.dedent("""
        dp = world // p.tp
        n = (world if world is not None else world_size(cfg)) // cfg.parallel.tp
        k = torch.distributed.get_world_size() / ps.get_tensor_model_parallel_world_size()
        fine = tokens // micro_batch
    """)
    assert len(sizes_from_world(broken)) == 3


OBJECTIVE_NAMES = {"clm", "classify", "contrastive", "denoise", "permute"}
ATTENTION_NAMES = {"dense", "flash", "sliding", "strided", "bigbird", "learned"}


def names_compared(source: str, names: set[str]) -> list[str]:
    """Comparisons (==, !=, in, not in) with one of `names` as a string constant, alone or in a tuple, list,
    set or dict: code that tests a plug-in's name instead of asking the plug-in."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                consts = [side] if isinstance(side, ast.Constant) else (
                    side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else
                    side.keys if isinstance(side, ast.Dict) else [])
                if any(isinstance(c, ast.Constant) and c.value in names for c in consts):
                    found.append(f"line {node.lineno}: {ast.unparse(node)}")
                    break
    return found


@pytest.mark.parametrize("names, home", [(OBJECTIVE_NAMES, "gorilla_dist.objectives"),
                                         (ATTENTION_NAMES, "gorilla_dist.kernels")])
def test_only_a_plugins_package_tests_its_names(names, home):
    mods = modules()
    assert any(n.startswith(home) for n in mods)
    found = {n: names_compared(p.read_text(), names) for n, p in mods.items() if not n.startswith(home)}
    assert {n: f for n, f in found.items() if f} == {}
    broken = textwrap.dedent("""
        if o.name == "classify" and c.target == "label": pass
        if m.attention not in ("dense", "flash"): pass
        x = name in {"permute": 1}
        fine = kind == "other"
    """)
    assert len(names_compared(broken, names)) == 1 + (names is OBJECTIVE_NAMES)
