"""``python -m worker.schemas [--check]``: write (or check) the generated schema files and reference page."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from worker.schemas import generated_files


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.schemas", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is not up to date")
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[2]
    stale = []
    for path, text in generated_files(root).items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    for path in stale:
        print(f"{'stale' if args.check else 'wrote'}: {path.relative_to(root)}", file=sys.stderr)
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
