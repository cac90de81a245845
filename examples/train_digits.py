"""Train a small MLP on scikit-learn's digits together with a swarm: the script to copy.

python examples/train_digits.py                                 # the first peer of a run
python examples/train_digits.py --initial-peers /ip4/.../p2p/... # any further peer
"""

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from gossiptrain import GossipOptimizer

parser = argparse.ArgumentParser()
parser.add_argument("--initial-peers", nargs="*", default=[])
parser.add_argument("--run-id", default="digits-example")
parser.add_argument("--steps", type=int, default=3000)
args = parser.parse_args()

digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)
x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]

torch.manual_seed(0)  # every peer starts from the same model
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

with GossipOptimizer(
    torch.optim.Adam(model.parameters(), lr=1e-3),
    run_id=args.run_id,
    initial_peers=args.initial_peers,
    average_every=1.0,  # seconds between averaging rounds
    samples_per_step=32,  # a peer's weight in a round is the samples it saw since the last one
) as optimizer:
    print("other peers can join with: --initial-peers", *optimizer.maddrs(), flush=True)
    for step in range(args.steps):
        index = torch.randint(len(x_train), (32,))
        loss = F.cross_entropy(model(x_train[index]), y_train[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()  # never waits for the network
        optimizer.report(loss=loss.item())
        if step % 500 == 0:
            print(f"step {step} loss {loss.item():.4f} rounds averaged {optimizer.rounds_done}", flush=True)
    optimizer.finish()  # average with the peers still here before leaving
    accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"test accuracy {accuracy:.3f}")
