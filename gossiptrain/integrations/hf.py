"""GossipCallback: a Hugging Face ``transformers.Trainer`` trains as a peer of a gossiptrain swarm."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import TrainerCallback

from gossiptrain.attachment import Attachment, attach


class GossipCallback(TrainerCallback):
    """Attaches the ``Trainer``'s optimizer to the swarm when training begins (``gossiptrain.attach``),
    reports the logged loss, and at the end of training averages until the live peers hold one model
    (``Attachment.finish``) before it leaves.

    The ``Trainer`` keeps its own optimizer, scheduler, gradient accumulation, mixed precision and
    checkpoints: only optimizer steps are counted and averaged, each weighted by
    ``per_device_train_batch_size * gradient_accumulation_steps * world_size`` samples.  A joiner
    downloads a live peer's parameters and optimizer state before its first step.  One peer per
    process: under a multi-process ``Trainer`` (DDP) each rank would be a peer of its own.

    Args:
        run_id: name of the training run.
        initial_peers: multiaddrs of any live peers (empty for the first peer of a run).
        wait_for_peers: block at the start of training until this many live peers are in the run.
        peers_timeout: seconds allowed for ``wait_for_peers``.
        finish: at the end of training, average until the peers agree (``Attachment.finish``).
        finish_timeout: seconds allowed for it.
        attach_options: passed to ``attach`` (average_every, codec, outer_optimizer, host_maddrs, ...).

    ``attachment`` is the ``Attachment`` while training runs, and after it ends (closed).
    """

    def __init__(
        self,
        run_id: str,
        *,
        initial_peers: Sequence[str] = (),
        wait_for_peers: int = 1,
        peers_timeout: float = 120.0,
        finish: bool = True,
        finish_timeout: float = 60.0,
        **attach_options: Any,
    ):
        self.run_id, self.initial_peers = run_id, list(initial_peers)
        self.min_peers, self.peers_timeout = wait_for_peers, peers_timeout
        self.finish, self.finish_timeout = finish, finish_timeout
        self.attach_options = attach_options
        self.attachment: Attachment | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if optimizer is None:
            raise RuntimeError("the Trainer gave its callbacks no optimizer at on_train_begin")
        samples = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
        options = {"samples_per_step": samples, "model": model, **self.attach_options}
        self.attachment = attach(optimizer, run_id=self.run_id, initial_peers=self.initial_peers, **options)
        if self.min_peers > 1:
            self.attachment.wait_for_peers(self.min_peers, timeout=self.peers_timeout)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.attachment is not None and not self.attachment.closed and logs and "loss" in logs:
            self.attachment.report(loss=logs["loss"])

    def on_train_end(self, args, state, control, **kwargs):
        if self.attachment is None or self.attachment.closed:
            return
        try:
            if self.finish:
                self.attachment.finish(timeout=self.finish_timeout)
        finally:
            self.attachment.close()
