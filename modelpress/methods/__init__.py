"""One file per method: its Config and its registered handler. Importing this package registers them all."""
from .rtn import RTNConfig

__all__ = ["RTNConfig"]
