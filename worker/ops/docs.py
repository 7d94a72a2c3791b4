"""``docs/metrics.md``'s generated parts: the metric table and the reason lists, from the code.

The document keeps its prose; the parts between ``<!-- generated:NAME -->`` and
``<!-- /generated:NAME -->`` are rendered here from ``worker.ops.metrics.METRICS`` and
``worker.telemetry``'s closed reason sets. ``tests/ops/test_metrics_doc.py`` fails when they differ::

    python -m worker.ops.docs --write      # regenerate docs/metrics.md in place
    python -m worker.ops.docs              # exit 1 (and say which part) if it is out of date
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from worker.ops.metrics import METRICS
from worker.telemetry import DROP_REASONS, ERROR_REASONS, LOSS_REASONS, REASON_HELP, SKIP_REASONS

__all__ = ["DOC_PATH", "main", "render_parts", "update"]

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
_PART = re.compile(
    r"(<!-- generated:(?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- /generated:(?P=name) -->)", re.S
)


def _metrics_table() -> str:
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for spec in METRICS:
        labels = ", ".join(f"`{label}`" for label in spec.labels) or "–"
        rows.append(f"| `{spec.exported}` | {spec.kind} | {labels} | {spec.help} |")
    return "\n".join(rows) + "\n"


def _reasons(reasons: tuple[str, ...]) -> str:
    return "".join(f"- `{reason}`: {REASON_HELP[reason]}\n" for reason in reasons)


def render_parts() -> dict[str, str]:
    """Each generated part's text, by name."""
    return {
        "metrics": _metrics_table(),
        "drop_reasons": _reasons(DROP_REASONS),
        "skip_reasons": _reasons(SKIP_REASONS),
        "loss_reasons": _reasons(LOSS_REASONS),
        "error_reasons": _reasons(ERROR_REASONS),
    }


def update(text: str) -> tuple[str, list[str]]:
    """``text`` with every generated part re-rendered, and the names of the parts that changed.

    Raises:
        ValueError: a part is missing from ``text`` (each must appear exactly once).
    """
    parts = render_parts()
    found = [m.group("name") for m in _PART.finditer(text)]
    for name in parts:
        if found.count(name) != 1:
            raise ValueError(
                f"docs/metrics.md needs exactly one generated:{name} block, found {found.count(name)}"
            )
    changed = [m.group("name") for m in _PART.finditer(text) if parts.get(m.group("name")) != m.group("body")]
    new = _PART.sub(lambda m: m.group(1) + parts.get(m.group("name"), m.group("body")) + m.group(4), text)
    return new, changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.ops.docs", description="check or regenerate docs/metrics.md"
    )
    parser.add_argument("--write", action="store_true", help="rewrite the file instead of checking it")
    parser.add_argument("path", nargs="?", type=Path, default=DOC_PATH)
    args = parser.parse_args(argv)
    text = args.path.read_text(encoding="utf-8")
    new, changed = update(text)
    if args.write:
        if changed:
            args.path.write_text(new, encoding="utf-8")
        print(f"{args.path}: {'updated ' + ', '.join(changed) if changed else 'up to date'}")
        return 0
    if changed:
        print(f"{args.path} is out of date ({', '.join(changed)}): python -m worker.ops.docs --write")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
