"""The Hugging Face and Lightning callbacks, through their examples: two peers each, over real sockets."""

import pathlib
import re
import subprocess
import sys

import pytest

from gossiptrain.params import AGREEMENT
from gossiptrain.testing import LOOPBACK, LocalSwarm

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
DONE = re.compile(r"done: (\d+) rounds averaged in (\d+) steps.* parameter checksum (\S+) norm (\S+)")


def two_peers_of(example: str, *args: str) -> list[tuple[int, int, float, float]]:
    """Run ``examples/<example>`` as two peers of one run; each one's rounds averaged, steps, checksum and norm."""
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        common = ["--initial-peers", *swarm.initial_peers, "--host-maddrs", LOOPBACK, "--wait-for-peers", "2"]
        outputs = [swarm.start([sys.executable, str(EXAMPLES / example), *common, *args])[1] for _ in range(2)]
        lines = [output.wait_for(DONE.match, timeout=240) for output in outputs]
    return [(int(m[1]), int(m[2]), float(m[3]), float(m[4])) for m in map(DONE.match, lines)]


def assert_one_model(peers: list[tuple[int, int, float, float]], steps: int) -> None:
    """Both peers averaged, their optimizer's hooks counted every step (a joiner may start at the other's
    step), and they finished with one model."""
    (rounds_a, steps_a, checksum_a, norm), (rounds_b, steps_b, checksum_b, _) = peers
    assert rounds_a > 0 and rounds_b > 0, peers
    assert steps_a >= steps and steps_b >= steps, peers
    assert abs(checksum_a - checksum_b) <= AGREEMENT * norm, peers


@pytest.mark.timeout(300)
def test_two_hugging_face_trainers_with_the_callback_average_and_finish_with_one_model():
    pytest.importorskip("transformers")
    peers = two_peers_of("hf_trainer.py", "--steps", "40", "--average-every", "0.5", "--run-id", "hf")
    assert_one_model(peers, steps=40)


@pytest.mark.timeout(300)
def test_two_lightning_trainers_with_the_callback_average_and_finish_with_one_model():
    pytest.importorskip("lightning")
    assert_one_model(two_peers_of("lightning_trainer.py", "--steps", "100", "--average-every", "0.5"), steps=100)


def test_the_core_package_imports_no_framework():
    code = (
        "import sys, gossiptrain, gossiptrain.attachment, gossiptrain.optimizer, gossiptrain.cli; gossiptrain.attach; "
        "print(sorted({'transformers', 'accelerate', 'lightning', 'pytorch_lightning'} & set(sys.modules)))"
    )
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert process.stdout.strip() == "[]", process.stdout + process.stderr
