"""A pydantic validation error as the one-line 422 message the API has always given.

"stages[0].amount must be < 1.0, got 1.5": the field's full path first, then what it must be.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

_KIND = {
    "float_type": "a number",
    "float_parsing": "a number",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "bool_type": "true or false",
    "string_type": "a string of at most 256 characters",
    "string_too_long": "a string of at most 256 characters",
    "list_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "finite_number": "a finite number",
}
_BOUND = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def describe_problem(error: ValidationError, where: str) -> str:
    """The first problem pydantic found, its path after `where`."""
    problem = error.errors(include_url=False)[0]
    # a union names the member it tried ("prune:l1_unstructured", "constrained-str"): not part of the path
    location = [p for p in problem.get("loc", ()) if isinstance(p, int) or p.isidentifier()]
    path = where + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in location)
    kind, given, context = problem.get("type", ""), problem.get("input"), problem.get("ctx") or {}
    if kind in _BOUND:
        bound = next(iter(context.values()), None)
        return f"{path} must be {_BOUND[kind]} {bound}, got {given}"
    if kind in _KIND:
        shown = "" if isinstance(given, (dict, list)) else f", got {_short(given)}"
        return f"{path} must be {_KIND[kind]}{shown}"
    if kind == "literal_error":
        return f"{path} must be {context.get('expected', 'one of the allowed values')}, got {_short(given)}"
    if kind == "extra_forbidden":
        return f"{path}: unknown option"
    shown = "" if isinstance(given, (dict, list)) else f", got {_short(given)}"
    return f"{path}: {problem.get('msg', 'invalid')}{shown}"


def _short(value: Any) -> str:
    return f"{value!r:.80}"
