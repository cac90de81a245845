"""gossiptrain: decentralized training of PyTorch models with dynamic groups and asynchronous averaging."""

from gossiptrain.exchange import RoundResult, Timeouts
from gossiptrain.metrics import RoundRecord
from gossiptrain.optimizer import GossipOptimizer
from gossiptrain.peer import InitialPeersError, ModelMismatchError, Peer
from gossiptrain.state import StateDownloadError

__all__ = [
    "GossipOptimizer",
    "InitialPeersError",
    "ModelMismatchError",
    "Peer",
    "RoundRecord",
    "RoundResult",
    "StateDownloadError",
    "Timeouts",
]
