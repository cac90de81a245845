"""Train a tiny GPT-2-shaped model on the standard library's source with a Hugging Face Trainer and a swarm.

python examples/hf_trainer.py                                  # the first peer of a run
python examples/hf_trainer.py --initial-peers /ip4/.../p2p/... # any further peer (the first prints its address)

Nothing is downloaded: the model is a GPT2Config built here (random initialisation, a byte-level
vocabulary of 256), the text is this Python's own standard library.  Needs ``pip install 'gossiptrain[hf]'``.
"""

import argparse
import logging
import pathlib
import random
import sysconfig
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from gossiptrain.integrations.hf import GossipCallback

parser = argparse.ArgumentParser()
parser.add_argument("--initial-peers", nargs="*", default=[])
parser.add_argument("--run-id", default="hf-example")
parser.add_argument("--steps", type=int, default=500)
parser.add_argument("--average-every", type=float, default=1.0, help="seconds between averaging rounds")
parser.add_argument("--wait-for-peers", type=int, default=1, help="start training once this many peers are live")
parser.add_argument("--host-maddrs", nargs="*", default=["/ip4/0.0.0.0/tcp/0"])
args = parser.parse_args()
logging.basicConfig(level=logging.WARNING, format="%(message)s")
logging.getLogger("gossiptrain").setLevel(logging.INFO)


def stdlib_bytes(limit: int = 2_000_000) -> torch.Tensor:
    """The first ``limit`` bytes of the standard library's .py files, as byte ids."""
    data = bytearray()
    for path in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        data += path.read_bytes()
        if len(data) >= limit:
            break
    return torch.frombuffer(data[:limit], dtype=torch.uint8).long()


class Blocks(torch.utils.data.Dataset):
    """Blocks of ``block`` bytes at seeded random places of ``data``; labels are the inputs (GPT-2 shifts them)."""

    def __init__(self, data: torch.Tensor, block: int, length: int):
        self.data, self.block, self.length = data, block, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = random.Random(index).randrange(len(self.data) - self.block)
        ids = self.data[start : start + self.block]
        return {"input_ids": ids, "labels": ids}


torch.manual_seed(0)  # every peer starts from the same model
config = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
model = GPT2LMHeadModel(config)
batch_size = 8
swarm = GossipCallback(
    args.run_id,
    initial_peers=args.initial_peers,
    wait_for_peers=args.wait_for_peers,
    average_every=args.average_every,
    host_maddrs=args.host_maddrs,
)
training = TrainingArguments(
    output_dir=tempfile.mkdtemp(prefix="hf-example-"),
    max_steps=args.steps,
    per_device_train_batch_size=batch_size,
    learning_rate=1e-3,
    lr_scheduler_type="cosine",
    warmup_steps=20,
    logging_steps=50,
    save_strategy="no",
    report_to="none",
    use_cpu=True,
    disable_tqdm=True,
    data_seed=random.randrange(2**31),  # each peer reads its own batches
)
trainer = Trainer(
    model=model,
    args=training,
    train_dataset=Blocks(stdlib_bytes(), block=64, length=args.steps * batch_size),
    callbacks=[swarm],
)
result = trainer.train()

flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
print(
    f"done: {swarm.attachment.rounds_done} rounds averaged in {swarm.attachment.local_step} steps, "
    f"train loss {result.training_loss:.3f}, "
    f"parameter checksum {flat.sum().item()!r} norm {flat.norm().item()!r}",
    flush=True,
)
