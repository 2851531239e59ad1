"""intruder-repair: detect and repair intruder dimensions in LoRA fine-tuned models.

The Python API (see the README): ``detect``, ``patch``, ``detect_model``, ``patch_model`` and
``IntruderMonitor``; ``resolve`` (a model reference to its local folder) and ``demo_dir`` (the
bundled demo adapter); ``evals`` has ``sweep`` and ``compare``. They are imported on first use, so
importing the package (and ``repair --help``) stays instant.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("intruder-repair")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

_EXPORTS = {  # public name -> module that defines it
    "detect": "repair.api", "patch": "repair.api", "detect_model": "repair.api", "patch_model": "repair.api",
    "IntruderMonitor": "repair.train.monitor", "DetectOptions": "repair.detection.detector", "DetectionReport": "repair.detection.report",
    "PatchReport": "repair.detection.report", "LivePatchReport": "repair.detection.report", "RepairError": "repair.errors",
    "resolve": "repair.io.sources", "demo_dir": "repair.io.sources",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'repair' has no attribute {name!r}")
