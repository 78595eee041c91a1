"""Sphinx configuration of the documentation site (``./run docs`` builds it into docs/_build/html).

Why Sphinx + furo: the docstrings are Google style with reST roles (``:func:``, ``:class:``),
which autodoc + napoleon turn into links; Lightning and torchmetrics build their sites the same
way, and MyST renders the Markdown pages of docs/ unchanged (GitHub shows the same files).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import shutil
import sys
from pathlib import Path

from sphinx.pycode import ModuleAnalyzer

import lightning_ttp
from lightning_ttp.callbacks import _compat as callbacks_compat

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _public_api import public_modules  # noqa: E402

project = "lightning_ttp"
author = "lightning_ttp contributors"
release = version = lightning_ttp.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "_templates"]
templates_path = ["_templates"]

# Markdown: $…$ / $$…$$ math, anchors for "page.md#section" links.
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"lightning_ttp {release}"
html_static_path: list[str] = []

# MathJax from the site itself when the ``docs`` extra is installed (django-static-mathjax ships
# MathJax 3 as plain files), so pages render offline; otherwise Sphinx's CDN default.
_mathjax = importlib.util.find_spec("mathjax")
if _mathjax is not None and _mathjax.origin is not None:
    _svg = Path(_mathjax.origin).parent / "static" / "mathjax" / "es5" / "tex-svg.js"
    if _svg.is_file():
        html_static_path.append(str(_svg))
        mathjax_path = "tex-svg.js"

# ---------------------------------------------------------------------------- API reference
# Generated from the package, one page per public module (api.md, _templates/autosummary):
# a new public module gets its page without editing the docs.
autosummary_generate = True
# the generated pages are rewritten on every build: drop those of a previous build first, so that a
# module that has moved or gone (docs/architecture.md) leaves no orphan page behind (a warning)
shutil.rmtree(Path(__file__).resolve().parent / "_autosummary", ignore_errors=True)
autodoc_default_options = {
    "members": True,
    "undoc-members": True,  # every name in __all__, also a constant without a doc comment
    "show-inheritance": True,
    "member-order": "bysource",
}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # "Attributes:" as a field list: undoc-members lists the attributes themselves


def _top_level_targets() -> list[str]:
    """Each name of ``lightning_ttp.__all__`` with the public module that documents it, relative to
    the package (e.g. ``callbacks.EarlyGiveUp``): the package page links there instead of
    documenting the callbacks a second time."""
    modules = public_modules()
    targets = []
    for name in lightning_ttp.__all__:
        if name.startswith("_"):
            continue
        home = next((m.__name__ for m in modules if name in getattr(m, "__all__", ())), None)
        targets.append(name if home is None else f"{home.removeprefix('lightning_ttp.')}.{name}")
    return targets


def _packages_to_expand() -> list[str]:
    """The package itself and every public sub-package without an ``__all__`` of its own (such as
    ``lightning_ttp.report``): their pages list their public modules, each on its own page."""
    return ["lightning_ttp"] + [
        m.__name__ for m in public_modules() if hasattr(m, "__path__") and not hasattr(m, "__all__")
    ]


def _undocumented_constants() -> dict[str, list[str]]:
    """Per public module, the constants of its ``__all__`` without a ``#:`` doc comment: autodoc
    lists module data only with one, so the template adds an ``autodata`` for each."""
    found: dict[str, list[str]] = {}
    for module in public_modules():
        documented = {name for (_, name) in ModuleAnalyzer.for_module(module.__name__).find_attr_docs()}
        found[module.__name__] = [
            name
            for name in getattr(module, "__all__", ())
            if name not in documented and not callable(value := getattr(module, name)) and not inspect.ismodule(value)
        ]
    return found


autosummary_context = {
    "top_level_targets": _top_level_targets(),
    "expand": _packages_to_expand(),
    "undocumented_constants": _undocumented_constants(),
}

# Docstrings write absolute values as plain-text maths, |x|, which reST reads as a substitution.
_ABSOLUTE_VALUE = re.compile(r"(?<![\\|])\|(?=[^\s|])([^|\n]*?[^\s|\\])\|(?!\|)")


def _escape_absolute_values(app, what, name, obj, options, lines: list[str]) -> None:
    lines[:] = [_ABSOLUTE_VALUE.sub(r"\\|\1\\|", line) for line in lines]


_LIGHTNING_HOOKS = {
    name
    for base in callbacks_compat.bases("Callback") + callbacks_compat.bases("callbacks.TQDMProgressBar")
    for name in dir(base)
}


def _skip_lightning_hooks(app, what, name, obj, skip, options):
    """A callback's overrides of Lightning's hooks (``on_fit_start``, ``state_dict``, ...) without a
    docstring of their own are Lightning's API: they are not listed again."""
    if what == "class" and name in _LIGHTNING_HOOKS and getattr(obj, "__doc__", "") is None:
        return True
    return None


def _public_path(cls: type) -> str:
    """The shortest import path of a Lightning class within its namespace, e.g.
    ``lightning.pytorch.callbacks.TQDMProgressBar``."""
    namespace = next(ns for ns in callbacks_compat.NAMESPACES if cls.__module__.startswith(ns + "."))
    parts = cls.__module__.split(".")
    for i in range(namespace.count(".") + 1, len(parts) + 1):
        module = importlib.import_module(".".join(parts[:i]))
        if getattr(module, cls.__qualname__, None) is cls:
            return f"{module.__name__}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


_LIGHTNING = tuple(ns + "." for ns in callbacks_compat.NAMESPACES)


def _qualified_bases(app, name, obj, options, bases: list) -> None:
    """``Bases: pytorch_lightning.Callback, lightning.pytorch.Callback`` rather than ``Callback, Callback``;
    no ``Bases: object`` line."""
    bases[:] = [
        f"``{_public_path(b)}``" if isinstance(b, type) and b.__module__.startswith(_LIGHTNING) else b
        for b in bases
        if b is not object
    ]


def setup(app):
    app.connect("autodoc-process-docstring", _escape_absolute_values)
    app.connect("autodoc-skip-member", _skip_lightning_hooks)
    app.connect("autodoc-process-bases", _qualified_bases)
