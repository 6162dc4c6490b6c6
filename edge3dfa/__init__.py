"""edge3dfa: 3DDFA_V2 from a PyTorch checkpoint to phones and small boards.

The core (this package) imports numpy and OpenCV only; torch and the converters' frameworks are imported
lazily inside the functions that need them.
"""

from edge3dfa.errors import Edge3dfaError

__version__ = "0.1.0"
__all__ = ["Edge3dfaError", "__version__"]
