"""README's configuration reference against the config models (issue: it must not drift).

Every key the models accept is a row of the reference, and every row names a key
the models accept. Rows are table lines whose first cell is a key in backticks:
under `### Top level and listeners` and `### Per upstream` the full dotted path
(`listen.host`, `upstreams.<name>.timeout.connect`); under a heading
`#### type: <name>` the path inside `auth` (`request.basic.username`).
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel

from proxy.config import Config, Upstream

README = Path(__file__).resolve().parents[2] / "README.md"
_ROW = re.compile(r"^\|\s*`([^`]+)`")
_AUTH_HEADING = re.compile(r"^#### type: `?([a-z0-9_]+)`?")


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The models a field's annotation can hold (through Optional, Annotated, list)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, tuple, typing.Annotated):
        return [m for arg in get_args(annotation) for m in _models(arg)]
    return []


def model_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        if model is Upstream and name == "auth":
            keys.add(key)
            continue  # documented per auth type
        if get_origin(field.annotation) is dict and _models(get_args(field.annotation)[1]):
            keys.add(key)
            (value,) = _models(get_args(field.annotation)[1])
            keys |= model_keys(value, f"{key}.<name>.")
            continue
        if name == "type" and prefix == "":
            continue
        keys.add(key)
        for sub in _models(field.annotation):
            keys |= model_keys(sub, f"{key}.")
    return keys


def auth_types() -> dict[str, set[str]]:
    union = Upstream.model_fields["auth"].annotation
    out: dict[str, set[str]] = {}
    for model in _models(union):
        (type_name,) = get_args(model.model_fields["type"].annotation)
        out[type_name] = model_keys(model) - {"type"}
    return out


def readme_rows() -> tuple[set[str], dict[str, set[str]]]:
    text = README.read_text()
    start = text.index("## Configuration reference")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end >= 0 else len(text)]
    general: set[str] = set()
    per_type: dict[str, set[str]] = {}
    current: set[str] | None = None
    for line in section.splitlines():
        heading = _AUTH_HEADING.match(line)
        if heading:
            current = per_type.setdefault(heading.group(1), set())
            continue
        if line.startswith("### "):
            current = None
            continue
        row = _ROW.match(line)
        if row:
            (general if current is None else current).add(row.group(1))
    return general, per_type


def test_every_key_the_models_accept_is_documented_and_nothing_else() -> None:
    general, _ = readme_rows()
    expected = model_keys(Config)
    assert sorted(expected - general) == [], "keys missing from README's reference"
    assert sorted(general - expected) == [], "README documents keys the models refuse"


def test_every_auth_type_and_field_is_documented() -> None:
    _, per_type = readme_rows()
    expected = auth_types()
    assert sorted(expected) == sorted(per_type)
    for type_name, fields in expected.items():
        documented = per_type[type_name]
        assert sorted(fields - documented) == [], f"{type_name}: fields missing from README"
        assert sorted(documented - fields) == [], f"{type_name}: README names unknown fields"


def test_the_walk_sees_nested_keys() -> None:
    keys = model_keys(Config)
    assert {"listen.host", "upstreams.<name>.timeout.connect", "upstreams.<name>.auth"} <= keys
    login = auth_types()["login"]
    assert {"request.basic.username", "refresh.request.url", "inject.header"} <= login
