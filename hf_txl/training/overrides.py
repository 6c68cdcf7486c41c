"""``--config_overrides`` strings: ``"cutoffs=[20000,40000,200000],div_val=1,pre_lnorm=true,init=normal"``.

Items are ``key=value`` separated by commas; a comma inside brackets (``[...]``, ``{...}``) or a double-quoted
string does not end an item. A value is a JSON literal (integer, float, list, object, ``true``/``false``/
``null``, ``"string"``; ``True``/``False``/``None`` are accepted too), anything else is kept as a plain string.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable
from typing import Any

__all__ = ["parse_config_overrides"]

_CLOSING = {"]": "[", "}": "{"}
_WORDS = {"true": True, "false": False, "null": None, "none": None}


def parse_config_overrides(text: str | None, known_fields: Iterable[str]) -> dict[str, Any]:
    """Parse ``text`` into ``{field: value}``; every field must be one of ``known_fields``.

    None or an empty string gives ``{}``; empty items (a trailing comma) are skipped. Raises ``ValueError``
    naming the item and the fix for an item without ``=``, an unknown field (with close matches), a field
    given twice, unbalanced brackets or quotes, and a bracketed value that is not valid JSON.
    """
    if text is None or not text.strip():
        return {}
    known = set(known_fields)
    overrides: dict[str, Any] = {}
    for item in split_items(text):
        key, value = _key_value(item)
        if key not in known:
            raise ValueError(_unknown_field_message(key, item, known))
        if key in overrides:
            raise ValueError(f"{key!r} is given twice ({item!r} repeats it); keep one {key}=... item")
        overrides[key] = parse_value(value, item)
    return overrides


def split_items(text: str) -> list[str]:
    """The stripped, non-empty items of ``text``, split at the commas outside brackets and double quotes."""
    items, start, stack, in_quotes = [], 0, [], False
    for i, char in enumerate(text):
        if in_quotes:
            in_quotes = char != '"' or _escaped(text, i)
        elif char == '"':
            in_quotes = True
        elif char in "[{":
            stack.append(char)
        elif char in _CLOSING:
            if not stack or stack[-1] != _CLOSING[char]:
                raise ValueError(
                    f"unbalanced {char!r} in {text[start : i + 1].strip()!r}: it closes no open bracket; "
                    "remove it or add the matching opening bracket"
                )
            stack.pop()
        elif char == "," and not stack:
            items.append(text[start:i])
            start = i + 1
    if in_quotes:
        raise ValueError(f"unclosed '\"' in {text[start:].strip()!r}; close the quoted string")
    if stack:
        closing = "".join("]" if s == "[" else "}" for s in reversed(stack))
        raise ValueError(f"unclosed {stack[-1]!r} in {text[start:].strip()!r}; add {closing!r}")
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def parse_value(value: str, item: str = "") -> Any:
    """A JSON literal (``True``/``False``/``None`` accepted in any case), else the string itself."""
    if value.lower() in _WORDS:
        return _WORDS[value.lower()]
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        if value and value[0] in '[{"':
            raise ValueError(
                f"{item or value!r}: {value!r} is not valid JSON ({error.msg}); write lists like [1,2], "
                'objects like {"a":1}, strings like "text" or without quotes'
            ) from None
        return value


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key:
        raise ValueError(f"{item!r} is not key=value; write e.g. dropout=0.2 (items are separated by commas)")
    if not value:
        raise ValueError(f"{item!r} has no value after '='; write e.g. {key}=0.2 (or {key}=null for None)")
    return key, value


def _unknown_field_message(key: str, item: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(map(repr, close))}?" if close else f"known fields: {', '.join(sorted(known))}"
    return f"unknown field {key!r} in {item!r}; {hint}"


def _escaped(text: str, i: int) -> bool:
    """True when the character at ``i`` is preceded by an odd number of backslashes."""
    n = 0
    while i - n - 1 >= 0 and text[i - n - 1] == "\\":
        n += 1
    return n % 2 == 1
