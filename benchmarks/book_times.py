"""Chapter execution times of a book build, read from its log (`make book` writes _build/book.log).

Sphinx announces each page as it reads it ("reading sources... [ 40%] CH05/CH05_width_pruning") and
myst-nb says how long a notebook took to execute ("Executed notebook in 512.34 seconds") or that it came
from the execution cache. This prints one line per chapter and the total, so a learner sees where the
build's time went:

    python benchmarks/book_times.py _build/book.log
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.book import book_log_times  # noqa: E402


def main(path: str) -> None:
    rows = book_log_times(Path(path).read_text(errors="replace"))
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
