"""JSON-level checks of a query's `samples` object before it reaches the model: the one
structure validator, run by the API before it hashes or stores a query and by
`loading.samples` before it builds a batch.

`samples` is one of `{"x": [...], "y": [...]}` (numbers nested to the model's input
shape; `y` optional), `{"text": ["..."]}` (`y` optional), `{"prompt": ["..."], "completion": ["..."]}`
(causal LMs: only the completion's tokens count in the query loss) or
`{"refs": [{"dataset_id": "...", "index": 17}]}`.
These checks need no model: numbers that fit the tensors they become (integers within
int64, floats finite and within float32 range: Python's JSON parser accepts `NaN`,
`Infinity` and integers of any size; they are refused here), rectangular (non-ragged) arrays, storable text, sample
counts within the server's limit. Whether the samples fit the model is checked afterwards
by `loading.check_samples_against_model`. Errors are `SamplesError`s naming the field (the API answers
422 `invalid_samples`).
"""

from __future__ import annotations

from typing import Any

from loading.errors import SamplesError

_FORMS = ({"x"}, {"x", "y"}, {"text"}, {"text", "y"}, {"prompt", "completion"}, {"refs"})
_MAX_DEPTH = 8
# Sample values become float32 (inputs, regression targets) or int64 (class labels, token
# ids) tensors: a number must fit both ranges it may be cast to.
FLOAT32_MAX = 3.4028234663852886e38
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _invalid(field: str, message: str) -> SamplesError:
    return SamplesError(field, message)


def check_samples(samples: Any, *, max_samples: int | None = None) -> int:
    """Validate the samples object's structure; returns the number of query samples
    (`max_samples`: the most allowed, None: no limit)."""
    if not isinstance(samples, dict):
        raise _invalid("samples", "must be an object with x (and y), text, prompt with completion, or refs")
    keys = set(samples)
    if keys not in _FORMS:
        unknown = sorted(keys - {"x", "y", "text", "prompt", "completion", "refs"})
        if unknown:
            raise _invalid(f"samples.{unknown[0]}", "unknown field; use x or text (each with optional y), "
                                                     "prompt with completion, or refs")
        raise _invalid("samples", "give exactly one of x or text (each with optional y), prompt with completion, or refs")
    if "refs" in keys:
        return _check_refs(samples["refs"], max_samples)
    if "prompt" in keys:
        count = _check_text(samples["prompt"], "samples.prompt", max_samples)
        if _check_text(samples["completion"], "samples.completion", max_samples) != count:
            raise _invalid("samples.completion", f"has {len(samples['completion'])} entries but samples.prompt has {count}")
        if not all(samples["completion"]):
            raise _invalid("samples.completion", "every completion needs at least one character (its tokens are the loss)")
        return count
    inputs = "x" if "x" in keys else "text"
    count = _check_rows(samples["x"], "samples.x", max_samples) if inputs == "x" \
        else _check_text(samples["text"], "samples.text", max_samples)
    if "y" in samples:
        labels = _check_rows(samples["y"], "samples.y", max_samples)
        if labels != count:
            raise _invalid("samples.y", f"has {labels} entries but samples.{inputs} has {count}")
    return count


def _check_rows(value: Any, field: str, max_samples: int | None) -> int:
    if not isinstance(value, list) or not value:
        raise _invalid(field, "must be a non-empty list with one entry per query sample")
    if max_samples is not None and len(value) > max_samples:
        raise _invalid(field, f"at most {max_samples} query samples are allowed, got {len(value)}")
    _array_shape(value, field, 1)
    return len(value)


def _array_shape(value: Any, field: str, depth: int) -> tuple[int, ...]:
    """Shape of a nested list of finite numbers; raises naming the first offending entry."""
    if depth > _MAX_DEPTH:
        raise _invalid(field, f"nested deeper than {_MAX_DEPTH} levels")
    if not any(isinstance(v, list) for v in value):  # innermost level: numbers only
        for i, v in enumerate(value):
            if type(v) is int:
                if not INT64_MIN <= v <= INT64_MAX:
                    raise _invalid(f"{field}[{i}]", f"integer {_short(v)} does not fit a 64-bit integer "
                                                    "(|value| < 2^63)")
                continue
            if type(v) is not float:  # bools are not numbers
                raise _invalid(f"{field}[{i}]", "must be a number")
            if not -FLOAT32_MAX <= v <= FLOAT32_MAX:  # False for NaN
                raise _invalid(f"{field}[{i}]", "must be a finite number within float32 range (|value| ≤ 3.4e38; "
                                                "NaN and Infinity are refused)")
        return (len(value),)
    inner: tuple[int, ...] | None = None
    for i, item in enumerate(value):
        if not isinstance(item, list):
            if isinstance(item, bool) or not isinstance(item, int | float):
                raise _invalid(f"{field}[{i}]", "must be a number or a list of numbers")
            raise _invalid(f"{field}[{i}]", "ragged array: mixes numbers and lists")
        shape = _array_shape(item, f"{field}[{i}]", depth + 1)
        if inner is None:
            inner = shape
        elif shape != inner:
            raise _invalid(f"{field}[{i}]", f"ragged array: shape {list(shape)} differs from {list(inner)}")
    return (len(value), *(inner or ()))


def _short(value: int) -> str:
    text = str(value)
    return text if len(text) <= 40 else f"{text[:20]}…({len(text)} digits)"


def _check_text(value: Any, field: str, max_samples: int | None) -> int:
    if not isinstance(value, list) or not value:
        raise _invalid(field, "must be a non-empty list of strings")
    if max_samples is not None and len(value) > max_samples:
        raise _invalid(field, f"at most {max_samples} query samples are allowed, got {len(value)}")
    for i, text in enumerate(value):
        if not isinstance(text, str):
            raise _invalid(f"{field}[{i}]", "must be a string")
        if "\x00" in text:
            raise _invalid(f"{field}[{i}]", "must not contain NUL characters")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise _invalid(f"{field}[{i}]", "must be valid Unicode text") from None
    return len(value)


def _check_refs(value: Any, max_samples: int | None) -> int:
    if not isinstance(value, list) or not value:
        raise _invalid("samples.refs", "must be a non-empty list of {dataset_id, index}")
    if max_samples is not None and len(value) > max_samples:
        raise _invalid("samples.refs", f"at most {max_samples} query samples are allowed, got {len(value)}")
    for i, ref in enumerate(value):
        field = f"samples.refs[{i}]"
        if not isinstance(ref, dict) or set(ref) != {"dataset_id", "index"}:
            raise _invalid(field, "must be an object with exactly dataset_id and index")
        if not isinstance(ref["dataset_id"], str) or not ref["dataset_id"].isascii() or "\x00" in ref["dataset_id"]:
            raise _invalid(f"{field}.dataset_id", "must be a dataset id string")
        index = ref["index"]
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 2**62:
            raise _invalid(f"{field}.index", "must be a non-negative integer row index")
    return len(value)

