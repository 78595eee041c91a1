"""The documentation site builds with warnings as errors and documents every public name.

Runs ``python -m sphinx -E -W`` (what ``./run docs`` runs) into a temporary folder; skipped when
the ``docs`` extra is not installed (``./run setup`` installs it).
"""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

for _name in ("sphinx", "myst_parser", "furo"):
    pytest.importorskip(_name)

import lightning_ttp  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"the site does not build without warnings:\n{proc.stderr[-4000:]}"
    return out


def _inventory(site: Path) -> set[str]:
    """Object names in Sphinx's objects.inv (4 header lines, then zlib: 'name domain:role ...')."""
    body = (site / "objects.inv").read_bytes().split(b"\n", 4)[4]
    return {line.split(" ")[0] for line in zlib.decompress(body).decode().splitlines() if line}


def _public_modules() -> list:
    """lightning_ttp's public modules and sub-packages, and the public modules of a sub-package
    that has no ``__all__`` of its own (lightning_ttp.report)."""
    found = []
    for info in pkgutil.iter_modules(lightning_ttp.__path__, "lightning_ttp."):
        if info.name.rsplit(".", 1)[1].startswith("_"):
            continue
        module = importlib.import_module(info.name)
        found.append(module)
        if info.ispkg and not hasattr(module, "__all__"):
            found += [
                importlib.import_module(sub.name)
                for sub in pkgutil.iter_modules(module.__path__, f"{info.name}.")
                if not sub.name.rsplit(".", 1)[1].startswith("_")
            ]
    return found


def test_every_public_name_is_in_the_api_reference(site):
    documented = _inventory(site)
    missing = []
    for module in _public_modules():
        names = [module.__name__] + [f"{module.__name__}.{n}" for n in getattr(module, "__all__", ())]
        missing += [name for name in names if name not in documented]
    for name in lightning_ttp.__all__:  # from lightning_ttp import X: X is documented in its module
        if not name.startswith("_") and not any(entry.endswith(f".{name}") for entry in documented):
            missing.append(f"lightning_ttp.{name}")
    assert len(_public_modules()) >= 8  # api, callbacks, dynamics, kernel, prediction, refine, report(.plots), spectral
    assert not missing, (
        f"public names without an API entry: {missing}. A module-level constant needs a '#: ...' doc "
        "comment on the line above it (autodoc lists module data only then)."
    )


def test_how_it_works_renders_the_papers_equations_offline(site):
    page = (site / "how_it_works.html").read_text()
    for tag in ("\\tag{1}", "\\tag{2}", "\\tag{4, 5}", "\\tag{6}", "\\tag{7}", "\\tag{8}"):
        assert tag in page
    # MathJax refuses \tag inside the split environment Sphinx wraps multi-line $$ blocks in
    for block in page.split("\\begin{split}")[1:]:
        assert "\\tag" not in block.split("\\end{split}")[0]
    assert 'class="eqno"' not in page  # the papers' numbers only, no Sphinx numbering beside them
    # MathJax is served by the site itself (no CDN): the page loads _static/tex-svg.js and it is there
    assert '_static/tex-svg.js' in page and (site / "_static" / "tex-svg.js").stat().st_size > 100_000
    # the detail pages of docs/ are part of the site, and the limits page includes their sections
    limits = (site / "limits.html").read_text()
    assert "The linearisation is the premise" in limits and "Spearman target" in limits
