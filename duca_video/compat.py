"""What differs between the two supported environments, in one place.

- Open-Sora 1.2's: Python 3.9/3.10, torch 2.3, colossalai 0.3.7, transformers 4.36.
- Modern: Python 3.11+, the newest torch, colossalai 0.5, transformers 5.

Everything else in the package is written once for both; each helper here says which difference it hides.
"""

from __future__ import annotations

import ast
import pickle
import sys
import types
import typing
from typing import Any


class _UnionFromBar(ast.NodeTransformer):
    """`A | B` -> `typing.Union[A, B]` (PEP 604 unions evaluate only from Python 3.10)."""

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        if not isinstance(node.op, ast.BitOr):
            return node
        union = ast.Attribute(value=ast.Name(id="typing", ctx=ast.Load()), attr="Union", ctx=ast.Load())
        pair = ast.Tuple(elts=[node.left, node.right], ctx=ast.Load())
        return ast.Subscript(value=union, slice=pair, ctx=ast.Load())


def _eval_annotation(text: str, namespace: dict[str, Any]) -> Any:
    tree = ast.fix_missing_locations(_UnionFromBar().visit(ast.parse(text, mode="eval")))
    return eval(compile(tree, "<annotation>", "eval"), {**namespace, "typing": typing})  # noqa: S307 - our own source


def type_hints(cls: type) -> dict[str, Any]:
    """`typing.get_type_hints(cls)`, also for `int | None` annotations on Python 3.9 (under
    `from __future__ import annotations` they are strings that 3.9's evaluator cannot read)."""
    if sys.version_info >= (3, 10):
        return typing.get_type_hints(cls)
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        namespace = vars(sys.modules[klass.__module__])
        for name, value in vars(klass).get("__annotations__", {}).items():
            hints[name] = _eval_annotation(value, namespace) if isinstance(value, str) else value
    return hints


# torch.load of a truncated file: newer torch raises EOFError / RuntimeError; torch 2.3 with weights_only=True
# wraps the end of data in pickle.UnpicklingError ("WeightsUnpickler error: unexpected EOF", "pickle data was
# truncated"), the type it also uses for a file that holds pickled objects.
def is_truncated_pickle(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, EOFError) or (
        isinstance(exc, pickle.UnpicklingError) and ("truncated" in text or "unexpected eof" in text)
    )


# What `typing.get_origin` returns for a union: typing.Union, and types.UnionType for `A | B` from Python 3.10.
UNION_TYPES: tuple[Any, ...] = (typing.Union, getattr(types, "UnionType", typing.Union))
