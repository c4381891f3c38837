"""Both peers answer every question exactly as the numpy reference does, on small data."""

import datetime as dt
import itertools

import pytest

from bench import generate as g
from bench import questions as qs
from bench import reference, render

ANCHOR = dt.date(2026, 11, 24)  # the window holds the New York fall-back (2026-11-01)


@pytest.fixture(scope="module")
def data() -> tuple[g.Events, int]:
    return g.all_events(1, 50_000), g.window_start_ms(ANCHOR)


def _questions() -> list[qs.Question]:
    return qs.question_set(ANCHOR, 0, "heavy") + qs.question_set(ANCHOR, 30, "typical")


def test_boundaries_follow_the_zone() -> None:
    q = qs.question_set(ANCHOR, 0, "heavy")[1]  # New York, days
    starts = reference.boundaries(q)
    assert len(starts) == 90
    lengths = {int(b - a) // 3_600_000 for a, b in itertools.pairwise(starts)}
    assert lengths == {24, 25}  # 2026-11-01 is 25 hours long
    kolkata = next(x for x in _questions() if x.tz == "Asia/Kolkata")
    first = reference.boundaries(kolkata)
    assert len(first) == 7 * 24 and all(s % 3_600_000 == 1_800_000 for s in first)


@pytest.mark.parametrize("peer_name", ["postgres", "chdb"])
def test_peer_equals_reference(peer_name: str, data: tuple[g.Events, int]) -> None:
    events, start_ms = data
    if peer_name == "postgres":
        from bench.peers.postgres import PostgresPeer as Peer
    else:
        from bench.peers.chdb_peer import ChdbPeer as Peer
    peer = Peer()
    try:
        peer.load(render.tsv(events, start_ms))
        assert peer.count() == len(events)
        for q in _questions():
            truth = reference.answer(events, q, start_ms)
            assert qs.differences(peer.answer(q, peer.run(q)), truth) == [], q.name
    finally:
        peer.close()
