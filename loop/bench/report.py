"""Shared output of the benchmarks: a printed table, docs/bench/<name>.json, and a section of docs/benchmarks.md."""

from __future__ import annotations

import json
import platform
import re
import time
from pathlib import Path

from loop.workspace import atomic_write


def table(rows: list[dict]) -> str:
    cols = list(rows[0])
    width = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols}
    line = lambda vals: "| " + " | ".join(v.rjust(width[c]) for c, v in zip(cols, vals)) + " |"  # noqa: E731
    out = [line(cols), "|" + "|".join("-" * (width[c] + 2) for c in cols) + "|"]
    out += [line([_fmt(r[c]) for c in cols]) for r in rows]
    return "\n".join(out)


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def write(name: str, figures: dict, section_md: str, out: str = "docs") -> None:
    """Write docs/bench/<name>.json and replace the `<name>` section of docs/benchmarks.md."""
    out_dir = Path(out)
    figures = {**figures, "machine": f"{platform.machine()} {platform.system()}", "date": time.strftime("%Y-%m-%d")}
    atomic_write(out_dir / "bench" / f"{name}.json", json.dumps(figures, indent=2) + "\n")
    write_section(name, section_md, out)


def replace_block(text: str, start: str, end: str, block: str) -> str:
    """text with what lies between the markers start and end (included) replaced by block; appended if absent."""
    if start in text and end in text:
        return re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    return text.rstrip() + "\n\n" + block + "\n"


def write_section(name: str, section_md: str, out: str = "docs") -> None:
    """Replace the `<name>` section of docs/benchmarks.md."""
    md_path = Path(out) / "benchmarks.md"
    md = md_path.read_text() if md_path.exists() else "# Benchmarks\n\nWritten by `python -m loop.bench <name>`.\n"
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{section_md.strip()}\n{end}"
    atomic_write(md_path, replace_block(md, start, end, block))
