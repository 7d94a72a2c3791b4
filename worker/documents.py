"""The one loader of pipeline and workflow documents, and the one way a ``ValidationError`` becomes text.

Loading (:func:`read_document`, :func:`parse_document`), the same for a pipeline file and a workflow
file, YAML or JSON:

1. **Size limit**: a file over :data:`MAX_DOCUMENT_BYTES` (1 MiB) is refused before it is parsed.
2. **Environment**: ``${VAR}`` and ``${VAR:-default}`` are replaced from the environment before parsing
   (so ``port: ${MQTT_PORT:-1883}`` is a number); an unset variable without a default is an error
   naming it. ``${SEGSTREAM_ASSETS}`` is the package's bundled assets folder unless the environment
   sets it.
3. **Duplicate keys are refused**, naming the key and its lines: YAML would keep the last one silently
   (``max_batch_size: 2`` then ``8`` loads as 8), JSON too.
4. The top level must be a mapping.

Every problem is a :class:`~worker.errors.ConfigError` whose message starts with the file's path.

Describing (:func:`problems`, :func:`describe`, :func:`config_error`): every ``ValidationError`` of a
pipeline, a workflow, a step or a parameter value is turned into text here, in one format::

    step 'seg' field 'iou_threshold': Input should be less than or equal to 1 (got 1.5)
    field 'sources[0].url': Field required

An error whose context carries ``step`` / ``field`` (the workflow's own checks, a step's fields; see
:func:`problem_details`) is named by them; any other by its location in the document, without
pydantic's union tags (``sources[0].url``, not ``sources.0.video.url``). The rejected value is shown,
cut to 80 characters, except for a missing field and for secrets (a location naming a password,
secret or token).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

from worker.errors import ConfigError

__all__ = [
    "BUILTIN_VARIABLES",
    "MAX_DOCUMENT_BYTES",
    "MAX_PROBLEMS_LISTED",
    "DuplicateKeyError",
    "Problem",
    "Syntax",
    "UniqueKeyLoader",
    "config_error",
    "describe",
    "expand_env",
    "parse_document",
    "problem_details",
    "problems",
    "read_document",
    "syntax_of",
]

#: the largest pipeline or workflow file read
MAX_DOCUMENT_BYTES: Final = 1 << 20
#: variables the worker defines itself (unless the environment sets them)
BUILTIN_VARIABLES: Final[Mapping[str, str]] = {
    "SEGSTREAM_ASSETS": str(Path(__file__).resolve().parent / "assets")
}
_ENV_REF: Final = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SECRET_PARTS: Final = ("password", "secret", "token")
_MAX_VALUE_CHARS: Final = 80

Syntax = Literal["yaml", "json"]


# ---------------------------------------------------------------------------------------------- loading


class DuplicateKeyError(ValueError):
    """A mapping with the same key twice.

    Attributes:
        key: the key.
        line: the 1-based line of its second occurrence (``None`` when unknown).
        first_line: the 1-based line of its first occurrence (``None`` when unknown).
    """

    def __init__(self, key: object, line: int | None = None, first_line: int | None = None) -> None:
        where = f" at line {line} (first at line {first_line})" if line is not None else ""
        super().__init__(f"duplicate key {key!r}{where}")
        self.key = key
        self.line = line
        self.first_line = first_line


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (merge keys ``<<`` still merge)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader refuses it below with its own error
                continue
            line = key_node.start_mark.line + 1
            if first is not None:
                raise DuplicateKeyError(key, line, first)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateKeyError(key)
        result[key] = value
    return result


def _duplicate_lines(text: str, key: object) -> tuple[int, int] | None:
    """The lines of a JSON duplicate key, found by reading the text as YAML (JSON is nearly a subset)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError):
        return None
    stack = [root] if root is not None else []
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            lines = [k.start_mark.line + 1 for k, _ in node.value if getattr(k, "value", None) == key]
            if len(lines) > 1:
                return lines[1], lines[0]
            stack.extend(v for _, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return None


def expand_env(text: str, environ: Mapping[str, str] | None = None) -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}`` from ``environ`` (default ``os.environ``).

    Raises:
        ConfigError: a variable without a default is not set.

    Example:
        >>> expand_env("port: ${PORT:-1883}", {})
        'port: 1883'
    """
    env = os.environ if environ is None else environ

    def repl(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        value = env.get(name, BUILTIN_VARIABLES.get(name))
        if value is None:
            if default is None:
                raise ConfigError(f"environment variable {name} is not set (referenced as ${{{name}}})")
            return default
        return value

    return _ENV_REF.sub(repl, text)


def parse_document(
    text: str,
    *,
    syntax: Syntax,
    origin: str,
    expand: bool = True,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Parse one document (a mapping) from text.

    Args:
        text: the document.
        syntax: ``yaml`` or ``json``.
        origin: where it came from, first in every error message (a path, "workflow JSON").
        expand: replace ``${VAR}`` references first.
        environ: the environment for ``expand`` (default ``os.environ``).

    Raises:
        ConfigError: a missing variable, bad syntax, a duplicate key, or not a mapping.
    """
    if expand:
        try:
            text = expand_env(text, environ)
        except ConfigError as exc:
            raise ConfigError(f"{origin}: {exc}") from None
    try:
        if syntax == "yaml":
            doc = yaml.load(text, Loader=UniqueKeyLoader)
        else:
            doc = json.loads(text, object_pairs_hook=_unique_pairs)
    except DuplicateKeyError as exc:
        if exc.line is None and (lines := _duplicate_lines(text, exc.key)) is not None:
            exc = DuplicateKeyError(exc.key, *lines)
        raise ConfigError(f"{origin}: {exc}") from None
    except (ValueError, yaml.YAMLError) as exc:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"{origin}: invalid {syntax.upper()}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{origin}: invalid {syntax.upper()}: nested too deeply") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{origin}: must be a mapping at the top level, got {type(doc).__name__}")
    return doc


def syntax_of(path: Path) -> Syntax:
    """``json`` for a ``.json`` file, else ``yaml``."""
    return "json" if path.suffix.lower() == ".json" else "yaml"


def read_document(
    path: str | os.PathLike[str],
    *,
    syntax: Syntax | None = None,
    expand: bool = True,
    max_bytes: int = MAX_DOCUMENT_BYTES,
) -> dict[str, Any]:
    """Read one pipeline or workflow file (blocking: call it off the event loop in async code).

    Args:
        path: the file.
        syntax: default: JSON for ``.json``, else YAML.
        expand: replace ``${VAR}`` references.
        max_bytes: the size limit.

    Raises:
        ConfigError: unreadable, too large, not UTF-8, or any problem of :func:`parse_document`;
            the message starts with the path.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > max_bytes:
            raise ConfigError(f"{p} is {size} bytes; the limit is {max_bytes}")
        with p.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:  # it grew since stat()
        raise ConfigError(f"{p} is over {max_bytes} bytes; the limit is {max_bytes}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read {p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_document(text, syntax=syntax or syntax_of(p), origin=str(p), expand=expand)


# ---------------------------------------------------------------------------------------------- describing


@dataclass(frozen=True, slots=True)
class Problem:
    """One validation problem: the step (``None`` outside the steps), the field and what is wrong."""

    step: str | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"step {self.step!r} " if self.step is not None else ""
        if self.field:
            where += f"field {self.field!r}: "
        return f"{where}{self.message}"


def problem_details(
    step: str | None, field: str, message: str, *, loc: tuple[str | int, ...] = (), value: Any = None
) -> InitErrorDetails:
    """One line of a ``ValidationError`` that :func:`problems` names by ``step`` and ``field``.

    Raise ``ValidationError.from_exception_data(title, [problem_details(...), ...])`` from a validator
    to report several named problems at once (pydantic keeps them, under the validator's location).
    """
    error = PydanticCustomError(
        "segstream_problem", "{message}", {"step": step, "field": field, "message": message}
    )
    return InitErrorDetails(type=error, loc=loc, input=value)


def _format_value(value: Any) -> str:
    text = repr(value)
    return text[: _MAX_VALUE_CHARS - 3] + "..." if len(text) > _MAX_VALUE_CHARS else text


def _field(loc: Sequence[str | int], raw: Any) -> str:
    """``a.b[0].c`` from a pydantic location, dropping the parts that are not in the document.

    pydantic adds a tag for each union member it tried (``sources.0.video.url``) and labels such as
    ``function-wrap[...]``; walking the raw document along the location tells them apart from keys.
    """
    parts: list[str | int] = []
    node = raw
    for index, part in enumerate(loc):
        last = index == len(loc) - 1
        if isinstance(part, int):
            if isinstance(node, Sequence) and not isinstance(node, str) and -len(node) <= part < len(node):
                node = node[part]
            else:
                node = None
            parts.append(part)
        elif isinstance(node, Mapping) and part in node:
            node = node[part]
            parts.append(part)
        elif "[" in part or (node is not None and not last):
            continue  # a union tag or a validator label, not a key of the document
        else:
            parts.append(part)  # e.g. a required field that is missing
            node = None
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")


def _problem(error: ErrorDetails, raw: Any) -> Problem:
    ctx = error.get("ctx") or {}
    if "field" in ctx:
        step = ctx.get("step")
        return Problem(
            step if isinstance(step, str) or step is None else str(step), str(ctx["field"]), error["msg"]
        )
    field = _field(error["loc"], raw)
    message = error["msg"]
    secret = any(s in str(part).lower() for part in error["loc"] for s in _SECRET_PARTS)
    if error["type"] != "missing" and not secret:
        message = f"{message} (got {_format_value(error['input'])})"
    return Problem(None, field, message)


def problems(exc: ValidationError, raw: Any = None) -> list[Problem]:
    """Each error of ``exc`` as a :class:`Problem`.

    Args:
        exc: the error.
        raw: the data that was validated (to tell keys from pydantic's union tags in locations).
    """
    return [_problem(error, raw) for error in exc.errors()]


def describe(exc: ValidationError, raw: Any = None, *, limit: int | None = None) -> str:
    """One line: the problems of ``exc`` joined by ``"; "`` (at most ``limit``, the rest counted).

    Example:
        >>> from pydantic import TypeAdapter
        >>> from typing import Annotated
        >>> from pydantic import Field
        >>> try:
        ...     TypeAdapter(Annotated[int, Field(gt=0)]).validate_python(0)
        ... except ValidationError as exc:
        ...     describe(exc)
        'Input should be greater than 0 (got 0)'
    """
    found = problems(exc, raw)
    shown = found if limit is None else found[:limit]
    text = "; ".join(map(str, shown))
    if len(found) > len(shown):
        text += f"; and {len(found) - len(shown)} more"
    return text


#: at most this many problems are listed in one ConfigError (the rest are counted)
MAX_PROBLEMS_LISTED: Final = 20


def config_error(exc: ValidationError, raw: Any, what: str) -> ConfigError:
    """``ConfigError("invalid <what>: <problems>")`` with ``.step`` / ``.field`` of the first problem.

    At most :data:`MAX_PROBLEMS_LISTED` problems are listed; the rest are counted.
    """
    found = problems(exc, raw)
    first = found[0] if found else Problem(None, "", str(exc))
    return ConfigError(
        f"invalid {what}: {describe(exc, raw, limit=MAX_PROBLEMS_LISTED)}", step=first.step, field=first.field
    )
