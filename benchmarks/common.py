"""What the benchmark scripts share: their sections of RESULTS.md."""

from __future__ import annotations

from pathlib import Path


def write_section(results_md: Path, name: str, body: str) -> None:
    """Replace (or append) the section between this benchmark's markers, keeping the rest of the file."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = results_md.read_text() if results_md.exists() else "# Benchmark results\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    results_md.write_text(text)
