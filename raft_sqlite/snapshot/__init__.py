"""Snapshots (a package; step 1 of the split: everything still lives in :mod:`.manager`)."""

from . import manager as _manager
from .manager import *  # noqa: F403
from .manager import __all__

_SEQ_SPAN = _manager._SEQ_SPAN
