"""taskbound: short-lived, task-bound credentials for AI agents, checked at the tool boundary.

The public API is deliberately small; everything else is internal and may change.
"""

from taskbound.config import Settings, load_settings
from taskbound.errors import TaskboundError

__version__ = "0.1.0"

__all__ = ["Settings", "TaskboundError", "__version__", "load_settings"]
