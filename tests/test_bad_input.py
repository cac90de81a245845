"""Bad input from the network is refused, counted, and leaves the receiver's values bit-identical."""

import asyncio
import logging

import pytest
import torch

from gossiptrain.peer import Peer
from gossiptrain.rejections import Rejections
from gossiptrain.rounds import Timeouts
from gossiptrain.testing import LOOPBACK, FaultyExchange, FaultyPeer

FAST = Timeouts(matchmaking=2.0, join=1.5, part=1.0, result=3.0)
EXPECTED_KIND = {
    "nan": "non_finite",
    "wrong_shape": "wrong_shape",
    "wrong_dtype": "wrong_dtype",
    "truncated": "truncated",
    "oversized": "oversized",
    "garbage": "garbage",
    "stale_round": "stale_round",
    "wrong_run": "wrong_run",
    "not_in_group": "not_in_group",
    "stall": "timeout",
}


@pytest.mark.timeout(180)
async def test_every_kind_of_bad_input_is_refused_counted_and_harmless():
    elsewhere = {"die", "die_before", "slow_reader", "slow_uploader"}  # test_churn
    elsewhere |= {"huge", "heavy", "shifted_mean"}  # test_hostile: well-formed, not refused but bounded
    assert set(EXPECTED_KIND) == set(FaultyExchange.FAULTS) - elsewhere
    options = dict(host_maddrs=[LOOPBACK], round_interval=0.5, timeouts=FAST)
    async with Peer("bad-input", **options) as honest:
        values = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
        for fault, kind in EXPECTED_KIND.items():
            async with FaultyPeer("bad-input", initial_peers=await honest.maddrs(), fault=fault, **options) as faulty:
                round_id = honest.next_round_id(lead=0.5)
                before = honest.rejections[kind]
                result, _ = await asyncio.gather(
                    honest.average(values, 1.0, round_id), faulty.average(values + 1, 1.0, round_id)
                )
                assert result.group_size == 2, (fault, result)
                assert result.status == "failed", (fault, result)
                assert torch.equal(result.averaged, values), fault
                assert honest.rejections[kind] == before + 1, (fault, dict(honest.rejections))


def test_rejections_log_is_rate_limited_per_sender_but_counts_are_exact(caplog):
    now = [1000.0]
    rejections = Rejections(log_every=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="gossiptrain.exchange"):
        for _ in range(1000):  # an outsider sending garbage in a loop
            rejections.record("garbage", "outsider", 7, "undecodable")
        rejections.record("garbage", "honest", 7, "undecodable")  # another sender's first is still logged
        rejections.record("truncated", "outsider", 7, "cut short")  # and another kind's
        now[0] += 61.0
        rejections.record("garbage", "outsider", 8, "undecodable")
    assert rejections == {"garbage": 1002, "truncated": 1}
    lines = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(lines) == 4, lines
    assert "outsider" in lines[-1] and "999 more" in lines[-1], lines[-1]
    for sender in range(5 * Rejections.MAX_SENDERS):  # what the log keeps per sender is bounded too
        rejections.record("garbage", f"sybil{sender}", 9, "undecodable")
    assert len(rejections._logged) <= Rejections.MAX_SENDERS
    assert rejections["garbage"] == 1002 + 5 * Rejections.MAX_SENDERS


NOT_ALLOWED_PEER = [  # Peer(...) keyword, a value it must refuse, and the words of what is allowed
    ("round_interval", 0, "round_interval must be a positive number of seconds"),
    ("round_interval", -1.0, "round_interval must be a positive number of seconds"),
    ("round_interval", float("nan"), "round_interval must be a positive number of seconds"),
    ("target_group_size", 0, "target_group_size must be a whole number >= 1"),
    ("target_group_size", -2, "target_group_size must be a whole number >= 1"),
    ("heartbeat_ttl", 0, "heartbeat_ttl must be a positive number of seconds"),
]


@pytest.mark.parametrize("name, value, allowed", NOT_ALLOWED_PEER, ids=[f"{n}={v}" for n, v, _ in NOT_ALLOWED_PEER])
def test_a_peer_refuses_a_slot_or_group_size_out_of_range_saying_what_is_allowed(name, value, allowed):
    with pytest.raises(ValueError, match=allowed):
        Peer("bad-settings", **{name: value})


@pytest.mark.parametrize("name", ["matchmaking", "join", "part", "result", "straggler_min"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_timeouts_refuse_a_wait_that_is_not_a_positive_number_of_seconds(name, value):
    with pytest.raises(ValueError, match=f"Timeouts.{name} must be a positive number of seconds"):
        Timeouts(**{name: value})


def test_timeouts_refuse_a_negative_straggler_grace_and_keep_none_for_no_deadline():
    with pytest.raises(ValueError, match="straggler_grace must be None .* or a number >= 0"):
        Timeouts(straggler_grace=-0.5)
    assert Timeouts(straggler_grace=None).straggler_deadline(0.0, 1.0) is None


NOT_ALLOWED_ATTACH = [  # attach(...) keyword, a value it must refuse, and the words of what is allowed
    ("average_every", 0, "average_every must be a positive number of seconds"),
    ("average_every", -1, "average_every must be a positive number of seconds"),
    ("average_every_steps", 0, "average_every_steps must be a whole number >= 1"),
    ("inner_steps", -1, "inner_steps must be a whole number >= 1"),
    ("startup_timeout", 0, "startup_timeout must be a positive number of seconds"),
    ("state_timeout", -5.0, "state_timeout must be a positive number of seconds"),
    ("target_group_size", 0, "target_group_size must be a whole number >= 1"),
]


@pytest.mark.parametrize("name, value, allowed", NOT_ALLOWED_ATTACH, ids=[f"{n}={v}" for n, v, _ in NOT_ALLOWED_ATTACH])
def test_attach_refuses_a_slot_step_count_group_size_or_timeout_out_of_range_before_it_starts_anything(
    name, value, allowed
):
    from gossiptrain import attach

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    options = {"outer_optimizer": lambda params: torch.optim.SGD(params, lr=1.0)} if name == "inner_steps" else {}
    with pytest.raises(ValueError, match=allowed):
        attach(optimizer, run_id="bad-settings", **options, **{name: value})
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks  # nothing attached
