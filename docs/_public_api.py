"""The modules with a page in the API reference: read by ``docs/conf.py`` when it builds the
site and by ``tests/test_docs.py`` when it checks that every public name has an entry (a module
of its own, so the test need not import ``conf.py``, which clears the generated pages)."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

import lightning_ttp


def public_modules() -> list[ModuleType]:
    """The package's public modules and sub-packages, and the public modules of a sub-package
    without an ``__all__`` of its own (``lightning_ttp.pipeline``, ``lightning_ttp.report``)."""
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
