"""Command lines generated from a component's typed config (a pydantic model).

Each component (actor, learner, dashboard, `fleet up`, `fleet eval`) declares its settings
once, as a model whose fields carry their flag's type, default and help; argparse flags are
derived from it and the parsed namespace is built back into the model. So a flag can no
longer drift from the setting it fills. Imports only argparse and pydantic: the edge uses it.

Field -> flag: `cell_id` -> `--cell-id`; `Literal[...]` -> choices; `X | None` -> optional X;
`list[str]` -> `nargs="*"`; a bool that defaults to False -> a `store_true` flag; a field
without a default -> a required flag. `flag(...)` sets what the name and type cannot say.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, Field, ValidationError
from pydantic.fields import FieldInfo

M = TypeVar("M", bound=BaseModel)

_SCALARS = (str, int, float, Path)


def flag(
    default: Any = ...,
    help: str | None = None,
    *,
    name: str | None = None,
    metavar: str | None = None,
    positional: bool = False,
    hidden: bool = False,
    **field_kwargs: Any,
) -> Any:
    """A model field with its flag's extras: another flag `name` than the field's, a
    `metavar`, a `positional` argument, or `hidden` from --help."""
    extra = {"cli_name": name, "cli_metavar": metavar, "cli_positional": positional}
    extra["cli_hidden"] = hidden
    return Field(default, description=help, json_schema_extra=extra, **field_kwargs)


def _extra(info: FieldInfo, key: str) -> Any:
    extra = info.json_schema_extra
    return extra.get(key) if isinstance(extra, dict) else None


def _flag_name(field: str, info: FieldInfo) -> str:
    return _extra(info, "cli_name") or "--" + field.replace("_", "-")


def _unwrap_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _argparse_kwargs(field: str, info: FieldInfo) -> dict[str, Any]:
    kind = _unwrap_optional(info.annotation)
    kw: dict[str, Any] = {"dest": field}
    help_text = info.description
    if _extra(info, "cli_hidden"):
        help_text = argparse.SUPPRESS
    if help_text is not None:
        kw["help"] = help_text
    if _extra(info, "cli_metavar"):
        kw["metavar"] = _extra(info, "cli_metavar")
    required = info.is_required()
    default = None if required else info.get_default(call_default_factory=True)
    if kind is bool:
        if required or default is not False:
            raise TypeError(f"{field}: a bool flag must default to False (store_true)")
        return {**kw, "action": "store_true", "default": False}
    if get_origin(kind) is Literal:
        choices = list(get_args(kind))
        kw["choices"] = choices
        if not isinstance(choices[0], str):
            kw["type"] = type(choices[0])
    elif get_origin(kind) is list and get_args(kind) == (str,):
        kw["nargs"] = "*"
    elif kind in _SCALARS:
        if kind is not str:
            kw["type"] = kind
    else:
        raise TypeError(f"{field}: no command-line form for {info.annotation!r}")
    if _extra(info, "cli_positional"):
        kw.pop("dest")
        if not required:
            kw["nargs"] = "?"
    elif required:
        kw["required"] = True
    if not required:
        kw["default"] = default
    return kw


def add_model_arguments(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """Add one flag per field of `model`, in the model's field order."""
    for field, info in model.model_fields.items():
        kw = _argparse_kwargs(field, info)
        if _extra(info, "cli_positional"):
            parser.add_argument(field, **kw)
        else:
            parser.add_argument(_flag_name(field, info), **kw)


def model_from_namespace(
    model: type[M], args: argparse.Namespace, parser: argparse.ArgumentParser | None = None
) -> M:
    """Build `model` from parsed flags; a value the model refuses is a usage error naming
    the flag (exit code 2), as argparse gives for a value of the wrong type."""
    values = {f: getattr(args, f) for f in model.model_fields if hasattr(args, f)}
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            info = model.model_fields.get(field)
            where = _flag_name(field, info) if info is not None else field
            problems.append(f"{where}: {err['msg']}")
        message = "; ".join(problems)
        if parser is None:
            raise ValueError(message) from None
        parser.error(message)
        raise  # not reached: parser.error exits


def parse_model(
    parser: argparse.ArgumentParser, model: type[M], argv: Sequence[str] | None = None
) -> M:
    """Parse `argv` with `parser` (whose flags came from `model`) into the model."""
    return model_from_namespace(model, parser.parse_args(argv), parser)
