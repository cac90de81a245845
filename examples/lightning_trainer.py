"""Train a small byte-level language model on the standard library's source with Lightning and a swarm.

python examples/lightning_trainer.py                                  # the first peer of a run
python examples/lightning_trainer.py --initial-peers /ip4/.../p2p/... # any further peer (the first prints its address)

(Not ``examples/lightning.py``: run as a script, that name would shadow the ``lightning`` package.)
Needs ``pip install 'gossiptrain[lightning]'``.
"""

import argparse
import logging
import pathlib
import sysconfig

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F

from gossiptrain.integrations.lightning import GossipCallback

parser = argparse.ArgumentParser()
parser.add_argument("--initial-peers", nargs="*", default=[])
parser.add_argument("--run-id", default="lightning-example")
parser.add_argument("--steps", type=int, default=1000)
parser.add_argument("--average-every", type=float, default=1.0, help="seconds between averaging rounds")
parser.add_argument("--wait-for-peers", type=int, default=1, help="start training once this many peers are live")
parser.add_argument("--host-maddrs", nargs="*", default=["/ip4/0.0.0.0/tcp/0"])
args = parser.parse_args()
logging.basicConfig(level=logging.WARNING, format="%(message)s")
logging.getLogger("gossiptrain").setLevel(logging.INFO)
CONTEXT, BATCH = 16, 32


def stdlib_bytes(limit: int = 2_000_000) -> torch.Tensor:
    """The first ``limit`` bytes of the standard library's .py files, as byte ids."""
    data = bytearray()
    for path in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        data += path.read_bytes()
        if len(data) >= limit:
            break
    return torch.frombuffer(data[:limit], dtype=torch.uint8).long()


class NextByte(torch.utils.data.Dataset):
    """``CONTEXT`` bytes and the byte after them, at every position of ``data``."""

    def __init__(self, data: torch.Tensor):
        self.data = data

    def __len__(self) -> int:
        return len(self.data) - CONTEXT

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[index : index + CONTEXT], self.data[index + CONTEXT]


class ByteLM(pl.LightningModule):
    def __init__(self, width: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Embedding(256, 32), nn.Flatten(), nn.Linear(CONTEXT * 32, width), nn.ReLU(), nn.Linear(width, 256)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=3e-3)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


torch.manual_seed(0)  # every peer starts from the same model
model = ByteLM()
data = torch.utils.data.DataLoader(NextByte(stdlib_bytes()), batch_size=BATCH, shuffle=True)
swarm = GossipCallback(
    args.run_id,
    initial_peers=args.initial_peers,
    samples_per_step=BATCH,
    wait_for_peers=args.wait_for_peers,
    average_every=args.average_every,
    host_maddrs=args.host_maddrs,
)
trainer = pl.Trainer(
    max_steps=args.steps,
    accelerator="cpu",
    devices=1,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    callbacks=[swarm],
)
torch.seed()  # a random seed for the shuffle: each peer reads its own batches
trainer.fit(model, data)

flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
print(
    f"done: {swarm.attachment.rounds_done} rounds averaged in {swarm.attachment.local_step} steps, "
    f"parameter checksum {flat.sum().item()!r} "
    f"norm {flat.norm().item()!r}",
    flush=True,
)
