"""The package's face: top-level names, and no Lightning import for the math layers."""

import subprocess
import sys


def test_import_does_not_import_lightning():
    code = (
        "import sys, lightning_ttp, lightning_ttp.kernel, lightning_ttp.dynamics, lightning_ttp.spectral\n"
        "bad = [m for m in sys.modules if m.startswith(('pytorch_lightning', 'lightning.', 'lightning_fabric'))]\n"
        "print(bad); assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_callbacks_are_reachable_from_the_top_level():
    import lightning_ttp
    from lightning_ttp import callbacks

    for name in ("TrainingTimePredictor", "ETAProgressBar", "RichETAProgressBar", "EarlyGiveUp"):
        assert getattr(lightning_ttp, name) is getattr(callbacks, name)
        assert name in dir(lightning_ttp)


def test_unknown_attribute_raises():
    import pytest

    import lightning_ttp

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lightning_ttp.nope  # noqa: B018
