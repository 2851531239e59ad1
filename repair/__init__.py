"""intruder-repair: detect and repair intruder dimensions in LoRA fine-tuned models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("intruder-repair")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
