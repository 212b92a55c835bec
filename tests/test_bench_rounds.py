"""The verdict the serving and speculative benchmarks give a goal from ratios measured round by round."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))

from common import rounds_verdict  # noqa: E402


def at_least_4(x: float) -> bool:
    return x >= 4


def test_the_median_decides_and_robust_means_no_one_round_does():
    steady = rounds_verdict([4.3, 4.5, 4.1, 4.4, 3.2], at_least_4)
    assert steady["median"] == 4.3 and steady["goal_met"] and steady["rounds_meeting_goal"] == 4
    assert steady["robust"]  # leaving out any one round keeps the median >= 4
    edge = rounds_verdict([4.3, 4.1, 3.9, 3.2], at_least_4)  # median 4.0: met, but dropping 4.3 or 4.1 fails it
    assert edge["goal_met"] and not edge["robust"]
    missed = rounds_verdict([3.0, 3.1, 5.0, 2.9, 3.3], at_least_4)
    assert not missed["goal_met"] and missed["robust"] and (missed["min"], missed["max"]) == (2.9, 5.0)


def test_two_rounds_are_never_robust():
    assert not rounds_verdict([5.0, 6.0], at_least_4)["robust"]
