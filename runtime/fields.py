"""Checks of the fields a user writes (GenerationRequest, SamplingParams): one wording for both.

A refusal names the class, the field, the value as given and what is allowed, where the value
was written, instead of failing later inside a pass.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import numpy as np

Refuse = Callable[[str, object, str], ValueError]


def is_int(value: object) -> bool:
    """A whole number as Python and numpy write them; bool is refused (True is no token count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def shown(value: object, limit: int = 60) -> str:
    """A value as an error message quotes it: its repr, cut short (a prompt may be 128K tokens), and
    its type where the repr does not say it (a numpy float prints as a plain number)."""
    text = repr(value)
    text = text if len(text) <= limit else f"{text[:limit]}...({len(text)} characters)"
    return text if type(value) in (int, float, str, bool, type(None)) else f"{text} ({type(value).__name__})"


def refuser(owner: str) -> Refuse:
    """refuse(field, value, allowed) -> the ValueError naming `owner`'s field."""
    return lambda field_name, value, allowed: ValueError(f"{owner} {field_name}={shown(value)}: {allowed}")


def check_sampling_fields(refuse: Refuse, max_new_tokens: object, temperature: object, top_k: object,
                          top_p: object) -> None:
    """The fields GenerationRequest and SamplingParams share."""
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise refuse("max_new_tokens", max_new_tokens, "must be an integer >= 1")
    if not is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise refuse("temperature", temperature, "must be a finite number >= 0 (0: greedy)")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise refuse("top_k", top_k, "must be an integer >= 1, or None (no top-k filter)")
    if top_p is not None and (not is_real(top_p) or not 0.0 < top_p <= 1.0):
        raise refuse("top_p", top_p, "must be a number in (0, 1], or None (no nucleus filter)")
