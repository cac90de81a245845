"""gossiptrain: decentralized training of PyTorch models with dynamic groups and asynchronous averaging."""

from gossiptrain.exchange import RoundResult, Timeouts
from gossiptrain.metrics import RoundRecord
from gossiptrain.optimizer import GossipOptimizer
from gossiptrain.peer import InitialPeersError, ModelMismatchError, Peer

__all__ = [
    "GossipOptimizer",
    "InitialPeersError",
    "ModelMismatchError",
    "Peer",
    "RoundRecord",
    "RoundResult",
    "Timeouts",
]
