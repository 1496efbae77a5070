"""Chapter execution times of a book build, read from its log (`make book` writes _build/book.log).

Sphinx announces each page as it reads it ("reading sources... [ 40%] CH05/CH05_width_pruning") and
myst-nb says how long a notebook took to execute ("Executed notebook in 512.34 seconds") or that it came
from the execution cache. This prints one line per chapter and the total, so a learner sees where the
build's time went:

    python benchmarks/book_times.py _build/book.log
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;]*m")
READING = re.compile(r"reading sources\.\.\. \[\s*\d+%\] (\S+)")
EXECUTING = re.compile(r"(\S+)\.ipynb: Executing notebook")
EXECUTED = re.compile(r"Executed notebook in ([\d.]+) seconds")
CACHED = re.compile(r"Using cached notebook|Cached executed notebook|retrieved from cache", re.IGNORECASE)


def chapter_times(log: str) -> list[tuple[str, float | None]]:
    """(page, seconds executed, or None when it came from the cache) for every notebook page in the log."""
    times: dict[str, float | None] = {}
    page = None
    for line in log.splitlines():
        line = ANSI.sub("", line)
        reading = READING.search(line) or EXECUTING.search(line)
        if reading:
            page = reading.group(1)
            if "/" in page and not reading.re is READING:
                page = "/".join(page.split("/")[-2:])
            continue
        executed = EXECUTED.search(line)
        if executed and page:
            times[page] = float(executed.group(1))
        elif CACHED.search(line) and page and page not in times:
            times[page] = None
    return list(times.items())


def main(path: str) -> None:
    rows = chapter_times(Path(path).read_text(errors="replace"))
    if not rows:
        print("No notebook was executed in this build (every chapter came from the execution cache).")
        return
    width = max(len(page) for page, _ in rows)
    print("\nChapter execution times of this build:")
    for page, seconds in rows:
        shown = "from cache" if seconds is None else f"{seconds:7.0f} s  ({seconds / 60:4.1f} min)"
        print(f"  {page:<{width}}  {shown}")
    total = sum(seconds for _, seconds in rows if seconds is not None)
    print(f"  {'total':<{width}}  {total:7.0f} s  ({total / 60:4.1f} min)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/book_times.py _build/book.log")
    main(sys.argv[1])
