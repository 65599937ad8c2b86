"""Shared by the bench scripts: a run's JSON goes to stdout and, with --out, to a file."""

from __future__ import annotations

import json
import os


def write_report(result: dict, out: str | None, indent: int = 2) -> None:
    text = json.dumps(result, indent=indent)
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            f.write(text)
    print(text)
