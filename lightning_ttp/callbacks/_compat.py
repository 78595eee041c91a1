"""Both Lightning namespaces, one set of classes.

Lightning ships the same Trainer under two import names: ``pytorch_lightning`` (the
``pytorch-lightning`` package) and ``lightning.pytorch`` (the ``lightning`` package). A
Trainer of one accepts only callbacks that are instances of *its* ``Callback`` class.
Our callbacks therefore inherit from the class of every namespace that is installed, so a
single ``TrainingTimePredictor`` works with either Trainer. The two base classes define
the same hooks, so the method resolution order is unambiguous.
"""

from __future__ import annotations

import importlib
from types import ModuleType

NAMESPACES = ("pytorch_lightning", "lightning.pytorch")


def installed_namespaces() -> list[ModuleType]:
    """The Lightning namespaces that import here, ``pytorch_lightning`` first."""
    found = []
    for name in NAMESPACES:
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            continue
    if not found:
        raise ImportError(
            "lightning_ttp's callbacks need PyTorch Lightning: `pip install pytorch-lightning` "
            "(or `pip install lightning`)."
        )
    return found


def bases(attribute: str) -> tuple[type, ...]:
    """The class named ``attribute`` (e.g. ``"Callback"``, ``"callbacks.TQDMProgressBar"``)
    from every installed namespace, de-duplicated, for use as base classes."""
    classes: list[type] = []
    for namespace in installed_namespaces():
        obj: object = namespace
        for part in attribute.split("."):
            obj = getattr(obj, part)
        assert isinstance(obj, type)
        if obj not in classes:
            classes.append(obj)
    return tuple(classes)


def is_instance(obj: object, *attributes: str) -> bool:
    """``isinstance(obj, C)`` for the class ``C`` named by any of ``attributes`` (e.g.
    ``"loggers.TensorBoardLogger"``) in any installed namespace; names a namespace lacks are
    skipped."""
    for namespace in installed_namespaces():
        for attribute in attributes:
            cls: object = namespace
            for part in attribute.split("."):
                cls = getattr(cls, part, None)
                if cls is None:
                    break
            if isinstance(cls, type) and isinstance(obj, cls):
                return True
    return False
