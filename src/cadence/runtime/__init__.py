"""Runtime pieces every layer uses: the callback protocol and the torch.distributed world.

They sit at the bottom of the package (they import nothing of cadence) so that workloads,
the trainer, the tuners and the loggers can all speak them without importing each other.
"""

from cadence.runtime.distributed import SINGLE, World
from cadence.runtime.events import EVENTS, Callback, TrainerView

__all__ = ["EVENTS", "SINGLE", "Callback", "TrainerView", "World"]
