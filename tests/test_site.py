"""The book site, built and opened in a real headless Chromium.

The site is built the way `make book` builds it, but with every chapter executed on the tiny model in
quick mode (the environment set in conftest.py), so the test takes a couple of minutes rather than the
real build's half hour. Chromium (Debian's `chromium` package) renders each page, scripts included, and
the test reads the rendered DOM: the landing page and every chapter of `_toc.yml` render, each chapter
shows executed outputs and at least one figure, the sidebar links every chapter, and no internal link or
image is broken. A screenshot of a chapter page is kept in `_build/test-artifacts/`. No page loads a script or
a stylesheet from another host (the site works offline: no CDN).

Without Chromium the test is skipped, unless REARCH_REQUIRE_BROWSER=1 (set by .ci/run, which installs
Chromium first): then a missing browser is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "_build" / "test-artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--virtual-time-budget=5000"]


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def toc_files() -> list[str]:
    """Every page of the table of contents, the root first, as paths without suffix."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", [{"chapters": toc.get("chapters", [])}]):
        for chapter in part["chapters"]:
            files.append(chapter["file"])
            files.extend(section["file"] for section in chapter.get("sections", []))
    return files


class LinkParser(HTMLParser):
    """Collect hrefs, image sources and the classes of divs from rendered HTML."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.images: list[str] = []
        self.classes: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "a" and values.get("href"):
            self.links.append(values["href"])
        if tag == "img" and values.get("src"):
            self.images.append(values["src"])
        if values.get("class"):
            self.classes.extend(values["class"].split())


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """Build the book into a temporary folder (chapters executed on the tiny model) and return its html/."""
    if chromium() is None:
        if os.environ.get("REARCH_REQUIRE_BROWSER") == "1":
            pytest.fail("Chromium is not installed but REARCH_REQUIRE_BROWSER=1: install Debian's `chromium` "
                        "package (apt-get install chromium).")
        pytest.skip("Chromium is not installed (apt-get install chromium); the site test needs a real browser.")
    output = tmp_path_factory.mktemp("book")
    jupyter_book = Path(sys.executable).with_name("jupyter-book")
    # MPLBACKEND=Agg (conftest) would keep the kernels from showing figures inline: drop it for the build
    env = {key: value for key, value in os.environ.items() if key != "MPLBACKEND"}
    result = subprocess.run([str(jupyter_book), "build", str(ROOT), "--path-output", str(output)],
                            capture_output=True, text=True, env={**env, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    (output / "build.log").write_text(result.stdout + result.stderr)
    return output / "_build" / "html"


def test_the_build_resolves_every_glued_value(site: Path) -> None:
    # a glue role that cannot be resolved or formatted leaves its sentence without the number, and Sphinx only
    # warns ("No key ... found in glue data", "Failed to format text/plain data"): the build log must have none
    log = (site.parents[1] / "build.log").read_text()
    warnings = sorted({re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in log.splitlines() if "[mystnb.glue]" in line})
    assert not warnings, "\n".join(warnings[:20])


class ExternalParser(HTMLParser):
    """Collect every script and stylesheet a page loads from another host (http(s):// or //host/...)."""

    def __init__(self) -> None:
        super().__init__()
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        rel = (values.get("rel") or "").lower().split()
        url = values.get("src") if tag == "script" else values.get("href") if tag == "link" else None
        if tag == "link" and not {"stylesheet", "preload", "modulepreload", "import"} & set(rel):
            url = None
        if url and is_external(url):
            self.external.append(f"<{tag}> {url}")


def is_external(url: str) -> bool:
    """Whether `url` points at another host (a CDN), rather than a file of the site or inline data."""
    return url.strip().startswith("//") or urlparse(url.strip()).scheme in ("http", "https")


def external_references(html: str) -> list[str]:
    """The external scripts and stylesheets one HTML page references (script src, link rel=stylesheet,
    and CSS @import or url() inside inline style blocks)."""
    parser = ExternalParser()
    parser.feed(html)
    inline_css = re.findall(r"@import\s+(?:url\()?['\"]?((?:https?:)?//[^'\")\s;]+)", html)
    return parser.external + [f"@import {url}" for url in inline_css]


def test_external_reference_finder_catches_cdn_scripts_and_stylesheets() -> None:
    page = """<html><head><script src="_static/local.js"></script><link rel="stylesheet" href="_static/a.css">
    <script src="https://cdn.jsdelivr.net/npm/x.js"></script><link rel="stylesheet" href="//unpkg.com/y.css">
    <a href="https://github.com/x">a link is fine</a><script type="application/json">{"u": "https://x"}</script>
    <style>@import url("https://fonts.example.com/f.css");</style></head></html>"""
    assert external_references(page) == ["<script> https://cdn.jsdelivr.net/npm/x.js", "<link> //unpkg.com/y.css",
                                         "@import https://fonts.example.com/f.css"]


def test_no_page_loads_an_external_script_or_stylesheet(site: Path) -> None:
    """The site works offline: no built page (nor the rendered DOM of a chapter, after its scripts ran) and
    no stylesheet of the theme loads anything from a CDN."""
    offenders = {}
    for page in sorted(site.rglob("*.html")):
        found = external_references(page.read_text(encoding="utf-8", errors="replace"))
        if found:
            offenders[str(page.relative_to(site))] = sorted(set(found))
    chapters = [file for file in toc_files() if re.match(r"CH\d\d/", file)]
    for file in chapters:
        found = external_references(render(site / f"{file}.html"))
        if found:
            offenders[f"{file}.html (rendered)"] = sorted(set(found))
    for sheet in sorted(site.rglob("*.css")):
        found = re.findall(r"(?:@import\s+|url\()\s*['\"]?((?:https?:)?//[^'\")\s;]+)", sheet.read_text(errors="replace"))
        if found:
            offenders[str(sheet.relative_to(site))] = sorted(set(found))
    assert not offenders, f"pages load external scripts or stylesheets (the site must work offline): {offenders}"


def render(page: Path, screenshot: Path | None = None) -> str:
    """The DOM of `page` after Chromium ran its scripts (and a screenshot, if asked)."""
    url = page.as_uri()
    if screenshot is not None:
        subprocess.run([chromium(), *CHROMIUM_FLAGS, "--window-size=1280,2000", f"--screenshot={screenshot}", url],
                       capture_output=True, timeout=120, check=True)
    result = subprocess.run([chromium(), *CHROMIUM_FLAGS, "--dump-dom", url], capture_output=True, text=True,
                            timeout=120, check=True)
    return result.stdout


def test_every_page_renders_with_outputs_figures_and_working_links(site: Path) -> None:
    pages = toc_files()
    rendered = {}
    for file in pages:
        path = site / f"{file}.html"
        assert path.exists(), f"{file} was not built"
        dom = render(path)
        assert "<article" in dom and len(dom) > 5000, f"{file}: Chromium rendered no article"
        rendered[file] = dom

    chapters = [file for file in pages if re.match(r"CH\d\d/", file)]
    assert len(chapters) >= 3
    for file in chapters:
        parser = LinkParser()
        parser.feed(rendered[file])
        assert "cell_output" in parser.classes, f"{file}: no executed cell output on the page"
        figures = [src for src in parser.images if "_images/" in src]
        assert figures, f"{file}: no figure on the page"
        assert "Traceback" not in rendered[file], f"{file}: an error traceback is on the page"

    # the table of contents in the sidebar of the landing page links every chapter
    landing = LinkParser()
    landing.feed(rendered[pages[0]])
    linked = {unquote(urlparse(href).path).removesuffix(".html").lstrip("./") for href in landing.links}
    for file in pages[1:]:
        assert file in linked, f"the landing page does not link {file}"

    # no internal link or image points at a missing file, on any page
    for file, dom in rendered.items():
        parser = LinkParser()
        parser.feed(dom)
        base = (site / f"{file}.html").parent
        for href in parser.links + parser.images:
            url = urlparse(href)
            if url.scheme in ("http", "https", "mailto", "data", "javascript") or url.netloc:
                continue
            target_path = unquote(urldefrag(url.path)[0] if url.scheme != "file" else url.path)
            if not target_path:
                continue  # a link to an anchor on the same page
            target = Path(target_path) if url.scheme == "file" else (base / target_path)
            assert target.resolve().exists(), f"{file}: broken link {href}"

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "chapter-page.png"
    render(site / f"{chapters[0]}.html", screenshot=screenshot)
    assert screenshot.exists() and screenshot.stat().st_size > 10_000
