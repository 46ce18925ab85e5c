"""Chapter parameters given on the command line: ``-p NAME VALUE`` for ``headlab run`` and ``headlab book``.

A VALUE is read as YAML, with the YAML 1.2 core schema (the current YAML; PyYAML's default is 1.1)::

    -p n_prompts 8            -> 8                  -p noise_levels "[1e-3, 0.1]" -> [0.001, 0.1]
    -p scale 0.5              -> 0.5                -p layers "[4, 8]"            -> [4, 8]
    -p bootstrap true         -> True               -p extra "{k: 3, mode: zero}" -> {'k': 3, 'mode': 'zero'}
    -p seed null              -> None (also None)   -p model smollm2-135m         -> 'smollm2-135m'

What the 1.2 core schema changes against PyYAML's 1.1 default, on purpose: ``1e-3`` is a float (1.1: the
string ``'1e-3'``), ``010`` is 10 (1.1: octal 8), ``12:30`` is text (1.1: 750), ``yes``/``no``/``on``/
``off`` are text (1.1: booleans), dates are text (1.1: ``datetime.date``, which papermill cannot inject).
``None`` also reads as null, as papermill's own ``-p`` does. An empty VALUE is the empty string; quote a
value to keep it text (``-p seed "'42'"``). A value that is not valid YAML, or that holds a YAML comment
(`` # ...``, which YAML would drop silently), is a :class:`ValueError` naming the parameter and the value.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import yaml

if TYPE_CHECKING:  # pragma: no cover
    from headlab.schema import Field

__all__ = ["add_parameter_option", "annotation_field", "check_parameters", "parse_parameters", "parse_value"]

_EXAMPLES = "8, 0.5, 1e-3, true, null, [4, 8], {k: 3} or plain text"

# YAML 1.2 core schema (https://yaml.org/spec/1.2.2/#1032-tag-resolution), plus Python's ``None``.
_NULL = re.compile(r"^(?:~|null|Null|NULL|None)$")
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)


class _CoreLoader(yaml.SafeLoader):
    """A safe YAML loader that resolves plain scalars by the YAML 1.2 core schema only."""

    yaml_implicit_resolvers: ClassVar[dict[str | None, list[tuple[str, re.Pattern[str]]]]] = {}


def _construct_int(loader: _CoreLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    return int(text, 0) if text.startswith(("0o", "0x")) else int(text, 10)  # 010 is ten


def _construct_float(loader: _CoreLoader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node).lower()
    return float(text.replace(".inf", "inf").replace(".nan", "nan"))


for _tag, _pattern, _first, _construct in [
    ("null", _NULL, list("~nN"), lambda loader, node: None),
    ("bool", _BOOL, list("tTfF"), lambda loader, node: loader.construct_scalar(node).lower() == "true"),
    ("int", _INT, list("-+0123456789"), _construct_int),
    ("float", _FLOAT, list("-+.0123456789"), _construct_float),
]:
    _CoreLoader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", _pattern, _first)
    _CoreLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _construct)


def _check_plain(value: Any, name: str, text: str) -> None:
    """Reject what an explicit YAML tag can build but papermill cannot inject (sets, bytes, dates)."""
    if isinstance(value, list):
        for item in value:
            _check_plain(item, name, text)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, name, text)
            _check_plain(item, name, text)
    elif value is not None and not isinstance(value, (bool, int, float, str)):
        raise ValueError(
            f"-p {name} {text!r}: a {type(value).__name__} is not a parameter value; use {_EXAMPLES}."
        )


def parse_value(text: str, name: str = "VALUE") -> Any:
    """Read one ``-p NAME VALUE`` value as YAML (1.2 core schema; see the module docstring).

    Args:
        text: The value as typed on the command line, e.g. ``"[4, 8]"``.
        name: The parameter's name, only used in the error message.

    Returns:
        ``None``, a bool, int, float or str, or a list / dict of these.

    Raises:
        ValueError: ``text`` is not valid YAML (or is a YAML type papermill cannot inject); the message
            names the parameter and the value and shows what is allowed.
    """
    if not text.strip():
        return text
    try:
        value = yaml.load(text, Loader=_CoreLoader)  # a SafeLoader subclass: no Python objects
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(
            f"-p {name} {text!r} is not valid YAML ({problem}); give {_EXAMPLES}. {_quote_hint(name, text)}"
        ) from None
    comment = _comment_at(text)
    if comment is not None:
        raise ValueError(
            f"-p {name} {text!r}: {text[comment:]!r} is a YAML comment and would be dropped; give "
            f"{_EXAMPLES}. {_quote_hint(name, text)}"
        )
    _check_plain(value, name, text)
    return value


def _quote_hint(name: str, text: str) -> str:
    """How to pass ``text`` as a string: in YAML single quotes, inside the shell's double quotes."""
    quoted = "'" + text.replace("'", "''") + "'"
    return f'To pass it as text, quote it for YAML too: -p {name} "{quoted}".'


def _comment_at(text: str) -> int | None:
    """Index of a ``#`` that starts a YAML comment in ``text`` (one outside every token), else None."""
    tokens = [(t.start_mark.index, t.end_mark.index) for t in yaml.scan(text, Loader=_CoreLoader)]
    for match in re.finditer(r"(?:^|(?<=\s))#", text):
        if not any(start <= match.start() < end for start, end in tokens):
            return match.start()
    return None


def parse_parameters(pairs: Iterable[Sequence[str]]) -> dict[str, Any]:
    """Turn ``-p NAME VALUE`` pairs into papermill parameters; a later NAME overrides an earlier one.

    Args:
        pairs: ``(name, value text)`` pairs, as argparse collects them.

    Returns:
        ``{name: parse_value(text, name)}``.

    Raises:
        ValueError: a name that is not a Python identifier, or a value :func:`parse_value` rejects.
    """
    parameters = {}
    for name, text in pairs:
        if not name.isidentifier():
            raise ValueError(f"-p {name!r}: a parameter name is a Python identifier such as n_prompts.")
        parameters[name] = parse_value(text, name)
    return parameters


class _ParameterAction(argparse.Action):
    """argparse action for ``-p NAME VALUE``: collects a dict, and reports a bad value as a usage error."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        try:
            parsed = parse_parameters([tuple(values or ())])
        except ValueError as err:
            parser.error(str(err))
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest, None) or {}), **parsed})


def add_parameter_option(parser: argparse.ArgumentParser, help: str) -> None:
    """Add the ``-p/--parameter NAME VALUE`` option (repeatable) to a command; it fills ``parameters``.

    The parsed values land in ``namespace.parameters`` (a dict, empty when no ``-p`` was given); a bad
    value ends the command with argparse's usage error (exit status 2), not a traceback.

    Args:
        parser: The command's parser.
        help: What the parameters are for; the value syntax is appended.
    """
    parser.add_argument(
        "-p", "--parameter", nargs=2, action=_ParameterAction, dest="parameters", default={},
        metavar=("NAME", "VALUE"), help=f"{help} (repeatable); VALUE is YAML: {_EXAMPLES}".replace("%", "%%"),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Parameters checked against a chapter's declarations
# --------------------------------------------------------------------------------------------------
_SIMPLE = {"int": "int", "float": "float", "str": "str", "bool": "bool", "list": "list", "tuple": "list",
           "dict": "dict", "None": "none", "NoneType": "none", "Any": "any", "object": "any"}


def annotation_field(annotation: str | None) -> Field:
    """The values a parameter annotated ``annotation`` (source text, e.g. ``"int"``, ``"list[int]"``,
    ``"float | None"``, ``"Optional[str]"``, ``"Literal['zero', 'mean']"``) accepts.

    ``float`` accepts integers too; ``list`` accepts a list (items checked for ``list[X]``); unknown
    annotations accept anything.
    """
    import ast

    from headlab.schema import Field

    def kinds(node: ast.AST) -> tuple[tuple[str, ...], Field | None, list | None]:
        if isinstance(node, ast.Constant) and node.value is None:
            return ("none",), None, None
        if isinstance(node, ast.Constant) and isinstance(node.value, str):  # a quoted annotation
            return kinds(ast.parse(node.value, mode="eval").body)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            (a, ia, ca), (b, ib, cb) = kinds(node.left), kinds(node.right)
            return a + b, ia or ib, None if ca is None and cb is None else (ca or []) + (cb or [])
        if isinstance(node, (ast.Name, ast.Attribute)):
            name = node.id if isinstance(node, ast.Name) else node.attr
            return (_SIMPLE.get(name, "any"),), None, None
        if isinstance(node, ast.Subscript):
            outer = node.value.id if isinstance(node.value, ast.Name) else getattr(node.value, "attr", "")
            inner = node.slice
            if outer == "Optional":
                k, i, c = kinds(inner)
                return (*k, "none"), i, c
            if outer == "Union":
                parts = inner.elts if isinstance(inner, ast.Tuple) else [inner]
                out: tuple[str, ...] = ()
                for part in parts:
                    out += kinds(part)[0]
                return out, None, None
            if outer == "Literal":
                values = [ast.literal_eval(e) for e in (inner.elts if isinstance(inner, ast.Tuple) else [inner])]
                return ("any",), None, values
            if outer in ("list", "List", "Sequence", "tuple", "Tuple") and not isinstance(inner, ast.Tuple):
                k, i, c = kinds(inner)
                return ("list",), Field(k if len(k) > 1 else k[0], items=i, choices=c), None
            return (_SIMPLE.get(outer, "any"),), None, None
        return ("any",), None, None

    if not annotation:
        return Field("any")
    try:
        found, items, choices = kinds(ast.parse(annotation, mode="eval").body)
    except (SyntaxError, ValueError):
        return Field("any")
    if "any" in found and choices is None:
        return Field("any")
    found = tuple(dict.fromkeys(found))
    return Field(found if len(found) > 1 else found[0], items=items, choices=choices)


def check_parameters(parameters: dict[str, Any], declared: dict[str, str | None], chapter: str) -> None:
    """Check parameter names and values against a chapter's annotated ``parameters`` cell.

    Args:
        parameters: the values to inject (from ``-p`` or a grid spec).
        declared: ``{name: annotation text}`` of the parameters cell (see
            :func:`headlab.grid.chapter_parameter_types`).
        chapter: the chapter's name, for messages.

    Raises:
        ValueError: a name the cell does not declare (with the closest declared one), or a value that
            does not fit its annotation, naming the parameter, its declared type and the value.
    """
    import difflib

    unknown = [n for n in parameters if n not in declared]
    if unknown:
        hints = [f"{n!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(n, list(declared), 1, 0.7))
                 else repr(n) for n in unknown]
        raise ValueError(f"{chapter} has no parameter {', '.join(hints)}; its parameters cell declares "
                         f"{sorted(declared)}.")
    for name, value in parameters.items():
        field = annotation_field(declared[name])
        try:
            field.check(value, name)
        except ValueError:
            raise ValueError(
                f"parameter {name}={value!r} ({type(value).__name__}) does not fit its declaration "
                f"`{name}: {declared[name]}` in {chapter}; expected {field.describe()}.") from None

