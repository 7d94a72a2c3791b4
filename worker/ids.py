"""The ids of one worker process: its worker id, the MQTT client ids made from it, and model ids.

Worker id. One per process, made once by the composition root with :func:`make_worker_id` and handed
to everything that makes an MQTT client (sinks, sources, the control listener) and everything that says
who it is (the status topic's ``{worker}``, the status payload, control replies)::

    <prefix>-<pipeline>-<POD_NAME or hostname>-<6 hex digits>      e.g. segstream-line3-node7-4f09c2

``prefix`` is the broker's ``client_id`` (default ``segstream``). The random suffix makes two workers of
one pipeline on one host (or two pods of one name, one being replaced) differ, so they never kick each
other off the broker. A stable id, for a persistent session that must survive a restart (a StatefulSet),
is the user's choice: ``SEGSTREAM_WORKER_ID`` (e.g. ``$(POD_NAME)``) is then used as it is, and an MQTT
source's own ``client_id`` overrides its client id.

Client ids. :func:`client_id_for` appends the role to the worker id: ``<worker>-sink-<name>``,
``<worker>-source-<id>``, ``<worker>-control``; distinct roles of one worker never share an id.

Model ids. :func:`model_id_problem` is the one rule for ``"project/version"`` strings, used when a
workflow is loaded (``worker.step.parameters``) and when a model is looked up (``worker.models.registry``),
so an id accepted at load time is never refused later.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from collections.abc import Mapping
from typing import Final

__all__ = [
    "MAX_WORKER_ID_LENGTH",
    "MODEL_ID_PART_RE",
    "WORKER_ID_ENV",
    "client_id_for",
    "make_worker_id",
    "model_id_problem",
    "split_model_id",
]

#: set it to give the worker a fixed id (used as it is; the user keeps it unique)
WORKER_ID_ENV: Final = "SEGSTREAM_WORKER_ID"
#: worker ids stay this short (client ids add a role; brokers limit client ids, mosquitto to 65535)
MAX_WORKER_ID_LENGTH: Final = 96
_UNSAFE: Final = re.compile(r"[^A-Za-z0-9_.-]+")
_VALID_WORKER_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

#: one part of ``"project/version"``: starts with a letter or digit, so ``..`` can never start a path
MODEL_ID_PART_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _clean(text: str) -> str:
    return _UNSAFE.sub("-", text).strip("-.") or "x"


def make_worker_id(
    pipeline: str,
    *,
    prefix: str | None = None,
    environ: Mapping[str, str] | None = None,
    hostname: str | None = None,
    suffix: str | None = None,
) -> str:
    """This process's worker id (see the module docstring).

    Args:
        pipeline: the pipeline's name.
        prefix: the first part (the broker's ``client_id``); default ``segstream``.
        environ: where ``SEGSTREAM_WORKER_ID`` and ``POD_NAME`` are read (default ``os.environ``).
        hostname: the host part when ``POD_NAME`` is not set (default ``socket.gethostname()``).
        suffix: the random part (default: 6 random hex digits; tests pass a fixed one).

    Returns:
        Letters, digits, ``_``, ``.`` and ``-`` only, at most :data:`MAX_WORKER_ID_LENGTH` long.

    Raises:
        ValueError: ``SEGSTREAM_WORKER_ID`` is set to an id with other characters, or too long.

    Example:
        >>> make_worker_id("line3", environ={"POD_NAME": "seg-0"}, suffix="4f09c2")
        'segstream-line3-seg-0-4f09c2'
    """
    env = os.environ if environ is None else environ
    fixed = env.get(WORKER_ID_ENV)
    if fixed:
        if not _VALID_WORKER_ID.fullmatch(fixed) or len(fixed) > MAX_WORKER_ID_LENGTH:
            raise ValueError(
                f"{WORKER_ID_ENV}={fixed!r}: a worker id is 1..{MAX_WORKER_ID_LENGTH} letters, digits, "
                "'_', '.' or '-', starting with a letter or digit"
            )
        return fixed
    host = env.get("POD_NAME") or hostname or socket.gethostname()
    tail = _clean(suffix if suffix is not None else secrets.token_hex(3))
    head = f"{_clean(prefix or 'segstream')}-{_clean(pipeline)}"
    room = MAX_WORKER_ID_LENGTH - len(head) - len(tail) - 2
    if room < 1:  # a very long prefix/pipeline: keep the suffix, which makes the id unique
        return f"{head[: MAX_WORKER_ID_LENGTH - len(tail) - 1]}-{tail}"
    return f"{head}-{_clean(host)[:room]}-{tail}"


def client_id_for(worker_id: str, *role: str) -> str:
    """The MQTT client id of one role of a worker: ``<worker>-<role...>``.

    Example:
        >>> client_id_for("segstream-line3-seg-0-4f09c2", "sink", "mqtt")
        'segstream-line3-seg-0-4f09c2-sink-mqtt'
    """
    return "-".join((worker_id, *(_clean(part) for part in role)))


def model_id_problem(model_id: object) -> str | None:
    """Why ``model_id`` is not a valid ``"project/version"``, or ``None`` when it is.

    A valid id is a string with exactly one ``/``, whose two parts are 1-100 letters, digits, ``.``,
    ``_`` or ``-`` starting with a letter or digit, with no ``..`` anywhere, and whose version part
    does not end in ``.onnx`` (an id names a package, not a file).

    Example:
        >>> model_id_problem("factory-parts/1") is None, model_id_problem("a/b/c") is not None
        (True, True)
    """
    if not isinstance(model_id, str):
        return f"model_id must be a string, got {type(model_id).__name__}"
    parts = model_id.split("/")
    if len(parts) != 2 or not all(MODEL_ID_PART_RE.fullmatch(part) for part in parts) or ".." in model_id:
        return (
            f"invalid model_id {model_id!r}: expected 'project/version' with parts of letters, digits, "
            "'.', '_', '-' (starting with a letter or digit)"
        )
    if parts[1].lower().endswith(".onnx"):
        return (
            f"invalid model_id {model_id!r}: a model_id names a package 'project/version', not an .onnx "
            "file; put the file in a folder <models_dir>/<project>/<version>/ (any .onnx name) and use "
            "'project/version', or bind an id to the file: model.files {'project/version': PATH} in the "
            "pipeline, --model [ID=]PATH on the CLI"
        )
    return None


def split_model_id(model_id: object) -> tuple[str, str]:
    """``(project, version)`` of a valid model id.

    Raises:
        ValueError: the reason from :func:`model_id_problem`.

    Example:
        >>> split_model_id("factory-parts/1")
        ('factory-parts', '1')
    """
    problem = model_id_problem(model_id)
    if problem is not None:
        raise ValueError(problem)
    project, version = str(model_id).split("/")
    return project, version
