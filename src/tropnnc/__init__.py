"""tropnnc: data-free structured compression of ReLU networks with tropical geometry."""

from .api import BlockReport, CompressionResult, compress
from .budget import Budget
from .io import load, save
from .methods import methods

__version__ = "0.1.0"

__all__ = [
    "BlockReport",
    "Budget",
    "CompressionResult",
    "__version__",
    "compress",
    "load",
    "methods",
    "save",
]
