"""GossipCallback: a Lightning ``Trainer`` trains as a peer of a gossiptrain swarm."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl

from gossiptrain.attachment import Attachment, attach


class GossipCallback(pl.Callback):
    """Attaches the ``LightningModule``'s optimizer to the swarm when training starts
    (``gossiptrain.attach``), reports each batch's loss, and at the end of training averages until the
    live peers hold one model (``Attachment.finish``) before it leaves; an exception closes the peer.

    Lightning keeps its own optimizer, schedulers, gradient accumulation, precision plugin and
    checkpoints: only optimizer steps are counted and averaged.  With automatic optimization the
    optimizer's step runs the training step's closure (forward and backward) inside it, so a
    snapshot for a round waits for that step to end.  One optimizer, one peer per process.

    Args:
        run_id: name of the training run.
        initial_peers: multiaddrs of any live peers (empty for the first peer of a run).
        samples_per_step: samples behind one optimizer step (the batch size times accumulated batches).
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
        samples_per_step: int = 1,
        wait_for_peers: int = 1,
        peers_timeout: float = 120.0,
        finish: bool = True,
        finish_timeout: float = 60.0,
        **attach_options: Any,
    ):
        self.run_id, self.initial_peers, self.samples_per_step = run_id, list(initial_peers), samples_per_step
        self.min_peers, self.peers_timeout = wait_for_peers, peers_timeout
        self.finish, self.finish_timeout = finish, finish_timeout
        self.attach_options = attach_options
        self.attachment: Attachment | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"GossipCallback averages the parameters of one optimizer, got {len(trainer.optimizers)}")
        options = {"samples_per_step": self.samples_per_step, "model": pl_module, **self.attach_options}
        self.attachment = attach(trainer.optimizers[0], run_id=self.run_id, initial_peers=self.initial_peers, **options)
        if self.min_peers > 1:
            self.attachment.wait_for_peers(self.min_peers, timeout=self.peers_timeout)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.attachment is None or batch_idx % max(1, trainer.log_every_n_steps):
            return  # reading the loss waits for the device: only as often as Lightning logs
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.attachment.report(loss=float(loss))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.attachment is None or self.attachment.closed:
            return
        try:
            if self.finish:
                self.attachment.finish(timeout=self.finish_timeout)
        finally:
            self.attachment.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.attachment is not None:
            self.attachment.close()
