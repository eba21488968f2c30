"""A small mutation tester: one-operator mutations of one module, each run against the targeted tests.

    PYTHONPATH=$PWD .venv/bin/python scripts/mutation_test.py medseg/evaluation/metrics.py \
        tests/unit/test_eval_metrics.py [--json OUT.json] [--source OTHER_VERSION.py]

Mutations (inside function bodies only; docstrings untouched): arithmetic operators swapped (+ -, * /,
// /, ** *), comparisons flipped at the boundary or negated (< <=, > >=, == !=, is / is not, in / not in),
``and`` / ``or`` swapped, ``not`` and unary minus dropped, number constants changed (n -> n + 1;
0.5 -> 1.5), ``True`` / ``False`` swapped.

How: the tests run in this process under pytest, once per mutant. A mutant is compiled from the mutated
source, and each function (and method) of the loaded module whose code changed gets the mutant's code
object (``__code__``), so every reference to it — ``from module import f`` in a test included — runs the
mutant. A mutant is *killed* when a test fails (or errors, or runs past ``--timeout`` seconds), else it
*survived*. ``--source`` mutates another version of the file (e.g. main's), applied to the same module.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import importlib
import io
import json
import signal
import sys
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

SWAPS: dict[type, type] = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
    ast.Pow: ast.Mult, ast.Mod: ast.FloorDiv,
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In,
    ast.And: ast.Or, ast.Or: ast.And,
}


@dataclass
class Mutant:
    index: int
    line: int
    description: str
    status: str = "not run"  # killed | survived | timeout | not applied


def _sites(tree: ast.Module) -> list[tuple[ast.AST, str]]:
    """(node, description) of every mutation site inside a function body, in source order."""
    sites: list[tuple[ast.AST, str]] = []
    docstrings = set()
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            body = fn.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
            for node in ast.walk(fn):
                if isinstance(node, ast.BinOp | ast.AugAssign) and type(node.op) in SWAPS:
                    sites.append((node, f"{type(node.op).__name__} -> {SWAPS[type(node.op)].__name__}"))
                elif isinstance(node, ast.Compare):
                    for k, op in enumerate(node.ops):
                        if type(op) in SWAPS:
                            sites.append((node, f"compare[{k}] {type(op).__name__} -> {SWAPS[type(op)].__name__}"))
                elif isinstance(node, ast.BoolOp):
                    sites.append((node, f"{type(node.op).__name__} -> {SWAPS[type(node.op)].__name__}"))
                elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.USub):
                    sites.append((node, f"drop {type(node.op).__name__}"))
                elif isinstance(node, ast.Constant) and id(node) not in docstrings:
                    if isinstance(node.value, bool):
                        sites.append((node, f"{node.value} -> {not node.value}"))
                    elif isinstance(node.value, int | float):
                        sites.append((node, f"{node.value!r} -> {node.value + 1!r}"))
    unique, seen = [], set()
    for node, desc in sites:  # nested functions are walked twice
        key = (id(node), desc)
        if key not in seen:
            seen.add(key)
            unique.append((node, desc))
    return unique


def _mutate(tree: ast.Module, index: int) -> tuple[ast.Module, int, str]:
    """A copy of ``tree`` with mutation ``index`` applied; its line and description."""
    tree = copy.deepcopy(tree)
    node, desc = _sites(tree)[index]
    if isinstance(node, ast.BinOp | ast.AugAssign | ast.BoolOp):
        node.op = SWAPS[type(node.op)]()
    elif isinstance(node, ast.Compare):
        k = int(desc.split("[")[1].split("]")[0])
        node.ops[k] = SWAPS[type(node.ops[k])]()
    elif isinstance(node, ast.UnaryOp):
        node.op = ast.UAdd() if isinstance(node.op, ast.USub) else _Identity()  # type: ignore[assignment]
    elif isinstance(node, ast.Constant):
        node.value = (not node.value) if isinstance(node.value, bool) else node.value + 1
    return tree, node.lineno, desc


class _Identity(ast.UAdd):
    """Marks a dropped ``not``: replaced by its operand in :class:`_DropNot`."""


class _DropNot(ast.NodeTransformer):
    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        return node.operand if isinstance(node.op, _Identity) else node


def _functions(namespace: dict, module_name: str) -> dict[str, types.FunctionType]:
    """Qualified name -> function object for the module's functions and its classes' methods."""
    out: dict[str, types.FunctionType] = {}

    def add(obj: object) -> None:
        for candidate in (obj, getattr(obj, "__func__", None), getattr(obj, "fget", None), getattr(obj, "__wrapped__", None)):
            if isinstance(candidate, types.FunctionType) and candidate.__module__ == module_name:
                out[candidate.__qualname__] = candidate

    for value in namespace.values():
        add(value)
        if isinstance(value, type) and value.__module__ == module_name:
            for attr in vars(value).values():
                add(attr)
    return out


def _apply(module: types.ModuleType, tree: ast.Module, path: Path) -> dict[str, types.CodeType]:
    """Swap in the code of ``tree``'s functions where it differs; returns the originals to restore."""
    code = compile(ast.fix_missing_locations(_DropNot().visit(tree)), str(path), "exec")
    namespace: dict = {"__name__": module.__name__, "__file__": str(path), "__package__": module.__package__}
    exec(code, namespace)  # noqa: S102 - the module's own (mutated) source
    old, new = _functions(vars(module), module.__name__), _functions(namespace, module.__name__)
    saved: dict[str, types.CodeType] = {}
    for name, fn in old.items():
        if name in new and (new[name].__code__.co_code != fn.__code__.co_code
                            or new[name].__code__.co_consts != fn.__code__.co_consts
                            or new[name].__defaults__ != fn.__defaults__):
            saved[name] = fn.__code__
            fn.__code__ = new[name].__code__
            fn.__defaults__ = new[name].__defaults__
    return saved


def _restore(module: types.ModuleType, saved: dict[str, types.CodeType], defaults: dict[str, tuple | None]) -> None:
    functions = _functions(vars(module), module.__name__)
    for name, code in saved.items():
        functions[name].__code__ = code
        functions[name].__defaults__ = defaults[name]


def _run_tests(tests: list[str], timeout: int) -> str:
    def alarm(*_):
        raise TimeoutError("mutant ran past the timeout")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(timeout)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            code = pytest.main(["-x", "-q", "-p", "no:cacheprovider", "--no-header", "-W", "ignore", *tests])
    except TimeoutError:
        return "timeout"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return "survived" if code == 0 else "killed"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("module", type=Path, help="the module's file, e.g. medseg/evaluation/metrics.py")
    parser.add_argument("tests", nargs="+", help="the targeted test files (pytest arguments)")
    parser.add_argument("--source", type=Path, default=None, help="mutate this version of the file instead")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per mutant")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    name = ".".join(args.module.with_suffix("").parts)
    module = importlib.import_module(name)
    source_path = args.source or args.module
    tree = ast.parse(source_path.read_text())
    if args.source is not None:  # the other version becomes the baseline everyone runs against
        _apply(module, copy.deepcopy(tree), source_path)
    baseline = _run_tests(args.tests, args.timeout * 3)
    if baseline != "survived":
        raise SystemExit(f"the tests fail without any mutation ({baseline}): fix them first")
    mutants = []
    for i in range(len(_sites(tree))):
        mutated, line, desc = _mutate(tree, i)
        mutant = Mutant(i, line, desc)
        defaults = {k: f.__defaults__ for k, f in _functions(vars(module), module.__name__).items()}
        try:
            saved = _apply(module, mutated, source_path)
        except Exception as exc:  # e.g. a constant mutation that no longer compiles
            mutant.status = f"not applied ({type(exc).__name__})"
            mutants.append(mutant)
            continue
        if not saved:
            mutant.status = "not applied (no function changed)"
        else:
            mutant.status = _run_tests(args.tests, args.timeout)
            _restore(module, saved, defaults)
        mutants.append(mutant)
        print(f"{i + 1:3d} line {line:4d} {desc:32s} {mutant.status}", flush=True)
    ran = [m for m in mutants if m.status in ("killed", "survived", "timeout")]
    killed = [m for m in ran if m.status != "survived"]
    score = len(killed) / len(ran) if ran else 0.0
    print(f"\n{args.module}: {len(killed)} of {len(ran)} mutants killed (score {score:.1%}); "
          f"{len(mutants) - len(ran)} not applied")
    for m in ran:
        if m.status == "survived":
            print(f"  survived: line {m.line}: {m.description}")
    if args.json:
        args.json.write_text(json.dumps({"module": str(args.module), "source": str(source_path), "tests": args.tests,
                                         "score": score, "mutants": [asdict(m) for m in mutants]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
