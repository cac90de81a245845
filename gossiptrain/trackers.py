"""Experiment trackers for per-round records: TensorBoard and Weights & Biases, behind one small interface.

``attach(..., log_to=...)`` (and ``gossiptrain peer --tensorboard DIR --wandb-project NAME``) turns each
round's ``RoundRecord`` and the attachment's counters into scalars (``round_scalars``) and gives them to
every tracker, at the peer's local step.  Both backends are optional: ``pip install gossiptrain[tensorboard]``
for TensorBoard, ``pip install wandb`` for W&B (``WANDB_MODE=offline`` writes the run without a network).

Failure semantics: a tracker that raises loses that round's scalars only; training and averaging go on
(a warning is logged, with the traceback the first time).  Scalars are the peer's own view: there is no
swarm-wide aggregate here, each peer logs its own run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from gossiptrain.metrics import RoundRecord

logger = logging.getLogger(__name__)


class Tracker:
    """Where one peer's scalars go: ``log`` is called once per round from the training thread."""

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release what the tracker holds; called once, on the attachment's ``close()``."""


class TensorBoardTracker(Tracker):
    """Event files in ``log_dir`` through ``torch.utils.tensorboard.SummaryWriter`` (needs ``tensorboard``).

    Args:
        log_dir: the run's directory; give each peer its own (TensorBoard shows each directory as a run).
        flush_secs: how often the writer's thread flushes pending events to disk.
    """

    def __init__(self, log_dir: str | os.PathLike, flush_secs: int = 10):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(
                f"logging to TensorBoard needs the tensorboard package ({e}): pip install 'gossiptrain[tensorboard]'"
            ) from e
        self.writer = SummaryWriter(log_dir=os.fspath(log_dir), flush_secs=flush_secs)

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A Weights & Biases run (needs ``wandb``; ``WANDB_MODE=offline`` writes it locally, ``wandb sync`` uploads it).

    Args:
        project: the W&B project.
        name: the run's name (e.g. the peer id); W&B picks one if None.
        init_options: passed to ``wandb.init`` (``dir``, ``group``, ``config``, ``mode``, ...).
    """

    def __init__(self, project: str, name: str | None = None, **init_options: Any):
        try:
            import wandb
        except ImportError as e:
            raise ImportError(f"logging to Weights & Biases needs the wandb package ({e}): pip install wandb") from e
        self.run = wandb.init(project=project, name=name, **init_options)

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        self.run.log(dict(scalars), step=step)

    def close(self) -> None:
        self.run.finish()


LogTo = Tracker | str | os.PathLike | Sequence[Tracker | str | os.PathLike] | None


def round_scalars(record: RoundRecord, counters: Mapping[str, float]) -> dict[str, float]:
    """The scalars of one round: the record's own values (``round/...``, ``train/loss``, ``rejected/...``)
    and the attachment's cumulative counters (``rounds/...``, ``bytes/..._total``, ``outer/step_norm``)."""
    scalars: dict[str, float] = {}
    if record.loss is not None:
        scalars["train/loss"] = record.loss
    scalars.update(
        {
            "round/group_size": record.group_size,
            "round/participants": record.participants,
            "round/seconds": record.round_seconds,
            "round/bytes_sent": record.bytes_sent,
            "round/bytes_received": record.bytes_received,
            "round/param_norm": record.param_norm,
            "round/refused": record.refused,
            "round/clipped": record.clipped,
            "round/dropped": record.dropped,
            "rejected/total": sum(record.rejected.values()),
        }
    )
    scalars.update({f"rejected/{kind}": count for kind, count in sorted(record.rejected.items())})
    scalars.update({name: float(value) for name, value in counters.items() if value is not None})
    return scalars


class Trackers:
    """The trackers of one attachment: each round's scalars go to every one of them.

    Adds ``train/steps_per_second`` (local steps over wall time since the previous round's record), a
    measure of how fast this peer computes while it averages, to what ``round_scalars`` gives.  The
    attachment's counters add ``train/utilization``: the share of the training thread's time since the
    previous record not spent in the attachment's step hooks (1.0: averaging never held a step up).
    """

    def __init__(self, trackers: Sequence[Tracker] = ()):
        self.trackers = list(trackers)
        self.errors = 0  # calls of a tracker's log that raised
        self._last: tuple[int, float] | None = None  # (step, time) of the previous record

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log_round(self, record: RoundRecord, counters: Mapping[str, float]) -> None:
        """Give the round's scalars to every tracker; one that raises loses this round only (logged)."""
        scalars = round_scalars(record, counters)
        if self._last is not None and record.time > self._last[1]:
            scalars["train/steps_per_second"] = (record.step - self._last[0]) / (record.time - self._last[1])
        self._last = (record.step, record.time)
        self.log(record.step, scalars)

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        """Give ``scalars`` (e.g. an evaluation's) to every tracker; one that raises loses them only (logged)."""
        for tracker in self.trackers:
            try:
                tracker.log(step, scalars)
            except Exception as e:
                self.errors += 1
                logger.warning(
                    "%s.log raised %r (%d times so far); training and averaging go on",
                    type(tracker).__name__,
                    e,
                    self.errors,
                    exc_info=e if self.errors == 1 else None,
                )

    def close(self) -> None:
        """Close every tracker once; one that raises is logged and the others are still closed."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            try:
                tracker.close()
            except Exception as e:
                logger.warning("could not close %s: %r", type(tracker).__name__, e)


def open_trackers(log_to: LogTo) -> Trackers:
    """``attach``'s ``log_to``: None, a ``Tracker``, a directory (TensorBoard event files there), or a list of them."""
    if log_to is None:
        items: list[Any] = []
    elif isinstance(log_to, (Tracker, str, os.PathLike)):
        items = [log_to]
    else:
        items = list(log_to)
    opened: list[Tracker] = []
    try:
        for item in items:
            if isinstance(item, Tracker):
                opened.append(item)
            elif isinstance(item, (str, os.PathLike)):
                opened.append(TensorBoardTracker(item))
            else:
                raise TypeError(f"log_to takes Trackers and TensorBoard directories, got {type(item).__name__}")
    except BaseException:
        Trackers(opened).close()
        raise
    return Trackers(opened)
