"""Error text a user can act on: the first line, the real cause at the end, and a plain hint.

TorchScript and torch.export put their own framing first and the actual reason last
("The following operation failed in the TorchScript interpreter... RuntimeError: Expected
tensor for argument #1 'indices' to have one of the following scalar types: Long, Int"), so
cutting a long message at its head loses the one line that matters. `summarize_error`
keeps the first line and the last lines, and puts a hint in front when the cause is one we
recognise. Pure string handling: no torch, no service imports, so both the sandboxed child
and the worker parent can use it.
"""

from __future__ import annotations

import re

MAX_DETAIL_CHARS = 2000
TAIL_CHARS = 1500
ELISION = "\n…\n"

# (pattern in the error text, what the user should change), first match wins
HINTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(
            r"'indices' to have one of the following scalar types: Long, Int|"
            r"scalar type Long.*but got .*Float|expected scalar type (Long|Int) but found Float",
            re.S,
        ),
        "the model takes integer token ids, but it was fed random floats: declare the inputs' dtype "
        "(int64 ids with a value range) instead of a float example_input_shape, or upload a dataset of token ids",
    ),
    (
        re.compile(
            r"forward\(\) is missing value for argument '(\w+)'|missing \d+ required positional "
            r"arguments?: '(\w+)'"
        ),
        "the model's forward takes more than one input (it is missing {0!r}): describe every input the "
        "model takes, not only example_input_shape",
    ),
    (
        re.compile(r"mat1 and mat2 shapes cannot be multiplied|size mismatch|shape '\[.*\]' is invalid for input"),
        "the example input's shape does not fit the model: check example_input_shape (batch first) against "
        "what the model's first layer expects",
    ),
    (
        re.compile(r"Expected \d+D \(unbatched\) or \d+D \(batched\) input"),
        "the example input has the wrong number of dimensions for the model's first layer: check example_input_shape",
    ),
)


def hint_for(text: str) -> str | None:
    """A plain-words hint for a recognised cause in `text`, else None."""
    for pattern, hint in HINTS:
        match = pattern.search(text)
        if match:
            named = next((group for group in match.groups() if group), "") if match.groups() else ""
            return hint.format(named)
    return None


def shorten(text: str, limit: int = MAX_DETAIL_CHARS, tail: int = TAIL_CHARS) -> str:
    """`text` unchanged when it fits in `limit`, else its first line, "…" and its last `tail` characters.

    The tail starts at a line boundary where one is near, so the last lines are whole.

    Example:
        >>> shorten("head\\n" + "x" * 3000 + "\\nthe reason", limit=100, tail=20).splitlines()[-1]
        'the reason'
    """
    if len(text) <= limit:
        return text
    first = text.split("\n", 1)[0][: max(0, limit - tail - len(ELISION))]
    end = text[-tail:]
    newline = end.find("\n")
    if 0 <= newline < tail // 4:
        end = end[newline + 1 :]
    return first + ELISION + end


def summarize_error(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """The job's error detail for a failure whose full text is `text`: hint first, then `shorten`.

    Example:
        >>> summarize_error("... got torch.FloatTensor ... 'indices' to have one of the following "
        ...                 "scalar types: Long, Int").startswith("the model takes integer token ids")
        True
    """
    text = text.strip()
    hint = hint_for(text)
    if hint is None:
        return shorten(text, limit)
    return f"{hint}. Cause: " + shorten(text, max(200, limit - len(hint) - 9))


# The job's events keep the whole log of a failure, up to this much (its head and its end).
MAX_LOG_CHARS = 20000
LOG_TAIL_CHARS = 18000


def failure(name: str, text: str) -> dict[str, str]:
    """The job's `error` object: {"error": name, "detail": summary} plus the whole `log` when
    the summary left something out (the failed-state event carries it)."""
    text = text.strip() or name
    payload = {"error": name, "detail": summarize_error(text)}
    if payload["detail"] != text:
        payload["log"] = shorten(text, MAX_LOG_CHARS, LOG_TAIL_CHARS)
    return payload
