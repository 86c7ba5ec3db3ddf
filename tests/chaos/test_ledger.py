"""The fault run's accounting (tests/chaos/harness.py `Ledger`), on made-up histories."""

from __future__ import annotations

from tests.chaos.harness import Ledger


def ledger_of(accepted: list[str], **shown: list[str]) -> Ledger:
    ledger = Ledger(accepted={"u": accepted})
    for tab, ids in shown.items():
        ledger.shown[tab], ledger.user_of[tab], ledger.history[tab] = ids, "u", [f"{tab} ran"]
    return ledger


async def test_a_report_counts_and_names_what_each_tab_lacks_repeats_and_reorders() -> None:
    ledger = ledger_of(["a", "b", "c"], t1=["a", "b", "c"], t2=["a", "c", "a"], t3=["b", "a", "c"])
    report = ledger.report()
    assert (report["lost"], report["shown twice"], report["order violations"]) == (1, 1, 1)
    assert report["lost on t2, turn 1"] == 1
    assert report["order violations of u, turn 0"] == 1  # turn 0 came after turn 1
    assert ledger.lost() == [("t2", 1, "b")]
    assert not ledger.complete()


async def test_a_diagnosis_gives_each_lost_messages_send_the_users_log_and_the_tabs_history() -> (
    None
):
    ledger = ledger_of(["a", "b"], t1=["a"])
    ledger.sends["b"] = "accepted at 1.000 by slot-0-start-1, turn 1"
    log = [{"_id": "a", "seq": 1}, {"_id": "b", "seq": 2}]
    assert ledger.diagnose({"u": log}).splitlines() == [
        "== t1 lacks turn 1: b, accepted at 1.000 by slot-0-start-1, turn 1",
        "   log {'_id': 'a', 'seq': 1}: shown on t1",
        "   log {'_id': 'b', 'seq': 2}: NOT SHOWN on t1",
        "   t1 ran",
    ]
