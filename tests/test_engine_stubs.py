"""upg_batch/_native.pyi against the built extension, by introspection: the same public names,
the same classes and methods with the same parameters (names, kinds, defaults), the same
exception bases; and the annotated types hold for real calls (arguments of the annotated types
are accepted, results are of the annotated types)."""

from __future__ import annotations

import __future__
import ast
import collections.abc
import inspect
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable

import pytest

import upg_batch
from upg_batch import _native

STUB = Path(upg_batch.__file__).parent / "_native.pyi"
LLAMA = Path(__file__).resolve().parent / "fixtures" / "models" / "llama-tiny"


def stub_namespace() -> dict[str, Any]:
    """The stub executed as Python (annotations left unevaluated until asked for)."""
    ns: dict[str, Any] = {"__name__": "_native_stub"}
    code = compile(STUB.read_text(), str(STUB), "exec", flags=__future__.annotations.compiler_flag, dont_inherit=True)
    exec(code, ns)
    return ns


NS = stub_namespace()
TREE = ast.parse(STUB.read_text())


def stub_public_names() -> set[str]:
    names = set()
    for node in TREE.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if not n.startswith("_")}


def runtime_public_names() -> set[str]:
    return {n for n in dir(_native) if not n.startswith("_") and not isinstance(getattr(_native, n), types.ModuleType)}


def stub_classes() -> dict[str, ast.ClassDef]:
    return {n.name: n for n in TREE.body if isinstance(n, ast.ClassDef)}


def stub_methods(cls: ast.ClassDef) -> set[str]:
    return {n.name for n in cls.body if isinstance(n, ast.FunctionDef) and (not n.name.startswith("_") or n.name in ("__new__", "__init__"))}


def runtime_methods(cls: type) -> set[str]:
    own = vars(cls)
    return {n for n, v in own.items() if callable(v) and (not n.startswith("_") or n in ("__new__", "__init__"))} | {
        n for n, v in own.items() if isinstance(v, (staticmethod, classmethod)) and not n.startswith("_")
    }


def params(sig: inspect.Signature, drop_first: bool) -> list[inspect.Parameter]:
    ps = list(sig.parameters.values())
    return ps[1:] if drop_first else ps


def compare_signatures(where: str, runtime: inspect.Signature, stub: inspect.Signature, drop_first: bool) -> None:
    rp, sp = params(runtime, drop_first), params(stub, drop_first)
    assert [p.name for p in rp] == [p.name for p in sp], f"{where}: parameters {[p.name for p in rp]} at runtime, {[p.name for p in sp]} in the stub"
    for r, s in zip(rp, sp):
        assert r.kind == s.kind, f"{where}({r.name}): {r.kind.name} at runtime, {s.kind.name} in the stub"
        assert (r.default is inspect.Parameter.empty) == (s.default is inspect.Parameter.empty), f"{where}({r.name}): default differs"
        if s.default is not inspect.Parameter.empty and s.default is not Ellipsis:
            assert r.default == s.default, f"{where}({r.name}): default {r.default!r} at runtime, {s.default!r} in the stub"
        if r.default is Ellipsis:  # not representable in the text signature
            assert s.default is Ellipsis, f"{where}({r.name}): the runtime default is opaque; the stub should say `...`"


# ---------------------------------------------------------------- names and signatures


def test_stub_is_shipped_with_the_package() -> None:
    assert STUB.is_file() and (STUB.parent / "py.typed").is_file()


def test_public_names_match() -> None:
    stub, runtime = stub_public_names(), runtime_public_names()
    assert stub == runtime, f"only in the stub: {sorted(stub - runtime)}; only in the module: {sorted(runtime - stub)}"
    if hasattr(_native, "__all__") or "__all__" in NS:
        assert sorted(getattr(_native, "__all__", [])) == sorted(NS.get("__all__", [])), "__all__ differs"


def test_classes_and_methods_match() -> None:
    for name, node in stub_classes().items():
        runtime_cls = getattr(_native, name)
        assert isinstance(runtime_cls, type), f"{name} is not a class at runtime"
        assert stub_methods(node) == runtime_methods(runtime_cls), f"{name}: methods differ"


def test_method_signatures_match() -> None:
    for name, node in stub_classes().items():
        runtime_cls, stub_cls = getattr(_native, name), NS[name]
        for meth in sorted(stub_methods(node)):
            if meth in ("__new__", "__init__"):
                runtime_sig = inspect.signature(runtime_cls)
                stub_sig = inspect.signature(getattr(stub_cls, meth))
                stub_sig = stub_sig.replace(parameters=list(stub_sig.parameters.values())[1:])  # cls / self
                compare_signatures(f"{name}()", runtime_sig, stub_sig, drop_first=False)
                continue
            compare_signatures(f"{name}.{meth}", inspect.signature(getattr(runtime_cls, meth)), inspect.signature(getattr(stub_cls, meth)), drop_first=True)


def test_function_signatures_match() -> None:
    functions = [n.name for n in TREE.body if isinstance(n, ast.FunctionDef)]
    assert functions, "the stub should declare the module's functions"
    for name in functions:
        compare_signatures(name, inspect.signature(getattr(_native, name)), inspect.signature(NS[name]), drop_first=False)


def test_exceptions_match() -> None:
    for name, node in stub_classes().items():
        runtime_cls, stub_cls = getattr(_native, name), NS[name]
        if issubclass(stub_cls, BaseException) or issubclass(runtime_cls, BaseException):
            assert [b.__name__ for b in runtime_cls.__bases__] == [b.__name__ for b in stub_cls.__bases__], name
    assert upg_batch.EngineError is _native.EngineError


def test_stub_drops_the_first_parameter_correctly() -> None:
    """A self-check of the comparison: a stub method with a renamed or extra parameter fails."""
    good = inspect.signature(getattr(NS["NativeEngine"], "tokenize"))
    runtime = inspect.signature(_native.NativeEngine.tokenize)
    compare_signatures("ok", runtime, good, drop_first=True)
    for bad in (lambda self, txt: None, lambda self, text, extra=1: None, lambda self, *, text: None):
        with pytest.raises(AssertionError):
            compare_signatures("bad", runtime, inspect.signature(bad), drop_first=True)


# ---------------------------------------------------------------- the annotated types, for real


def conforms(value: Any, tp: Any, strict: bool) -> bool:
    """Whether `value` is of type `tp`. strict: results (a float is a float); otherwise
    arguments (an int passes where a float is expected, as the type system allows)."""
    if tp is Any:
        return True
    if tp is None or tp is type(None):
        return value is None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a, strict) for a in args)
    if origin is None:
        if isinstance(tp, type) and tp.__module__ == NS["__name__"]:
            tp = getattr(_native, tp.__name__)  # a class of the stub stands for the module's class
        if tp is float:
            return isinstance(value, float) or (not strict and isinstance(value, int) and not isinstance(value, bool))
        if tp is int:
            return isinstance(value, int) and not isinstance(value, bool)
        return isinstance(value, tp)
    if origin is list:
        return isinstance(value, list) and all(conforms(v, args[0], strict) for v in value)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(conforms(v, args[0], strict) for v in value)
        return len(value) == len(args) and all(conforms(v, a, strict) for v, a in zip(value, args))
    if origin is dict:
        return isinstance(value, dict) and all(conforms(k, args[0], strict) and conforms(v, args[1], strict) for k, v in value.items())
    if origin is collections.abc.Sequence:
        return isinstance(value, collections.abc.Sequence) and all(conforms(v, args[0], strict) for v in value)
    if origin is os.PathLike:
        return isinstance(value, os.PathLike)
    raise NotImplementedError(f"no check for {tp!r}")


def hints(fn: Callable[..., Any]) -> dict[str, Any]:
    return typing.get_type_hints(fn, globalns=NS)


def call_checked(stub_fn: Callable[..., Any], runtime_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Checks the arguments against the stub's parameter types, calls the runtime, checks the
    result against the stub's return type."""
    h = hints(stub_fn)
    bound = inspect.signature(stub_fn).bind(None, *args, **kwargs) if "self" in inspect.signature(stub_fn).parameters else inspect.signature(stub_fn).bind(*args, **kwargs)
    for name, value in bound.arguments.items():
        if name in h and name not in ("self", "cls"):
            assert conforms(value, h[name], strict=False), f"{stub_fn.__qualname__}: argument {name}={value!r} is not {h[name]}"
    result = runtime_fn(*args, **kwargs)
    assert conforms(result, h["return"], strict=True), f"{stub_fn.__qualname__} returned {type(result).__name__} {result!r:.200}, not {h['return']}"
    return result


def test_annotations_resolve() -> None:
    for name, node in stub_classes().items():
        for meth in stub_methods(node):
            hints(getattr(NS[name], meth))
    for node in TREE.body:
        if isinstance(node, ast.FunctionDef):
            hints(NS[node.name])


def test_annotated_types_hold_for_real_calls() -> None:
    stub, real = NS["NativeEngine"], _native.NativeEngine
    h = hints(stub.__new__)
    args = (LLAMA, "cpu", "f32", None, 4, 64)  # a PathLike model_dir
    for name, value in zip(list(inspect.signature(stub.__new__).parameters)[1:], args):
        assert conforms(value, h[name], strict=False), name
    eng = real(*args)
    assert conforms(eng, h["return"], strict=True)
    eng = real(str(LLAMA), "cpu", "f16", 1, 2, None)  # a str model_dir, threads given, context None

    ids = call_checked(stub.tokenize, eng.tokenize, "The quick brown fox")
    assert ids
    assert call_checked(stub.detokenize, eng.detokenize, tuple(ids)) == "The quick brown fox"
    raw, rows, vocab = call_checked(stub.logits, eng.logits, ids)
    assert (rows, vocab) == (len(ids), 512) and len(raw) == 4 * rows * vocab
    call_checked(stub.logits, eng.logits, tuple(ids))
    params = [
        (3, 0.0, 0, 1.0, 0.0, None, [], [], True, None),
        (2, 1, 5, 0.9, 0.05, 7, ("x", "y"), (1, 2), False, 3),  # ints for floats, tuples for lists
    ]
    outs = call_checked(stub.generate, eng.generate, ["hello", tuple(ids)], params)
    assert [o[2] for o in outs] and all(o[2] in ("stop", "length") for o in outs)
    assert outs[0][6] is None and len(outs[1][6]) == len(outs[1][0]) and len(outs[1][6][0][1]) == 3
    info = call_checked(stub.info, eng.info)
    assert info["weights"] == "f16"
    stats = call_checked(stub.stats, eng.stats)
    assert stats["generation_tokens_total"] >= 1
    bw = call_checked(NS["measure_read_bandwidth"], _native.measure_read_bandwidth, bytes=1 << 20, threads=1, repeats=1)
    assert bw > 0


def test_engine_error_is_raised_as_declared() -> None:
    with pytest.raises(NS["EngineError"].__base__):
        _native.NativeEngine(str(LLAMA), "cpu", "nope", None, 1, None)
    with pytest.raises(_native.EngineError):
        _native.NativeEngine(str(LLAMA), "cpu", "nope", None, 1, None)
