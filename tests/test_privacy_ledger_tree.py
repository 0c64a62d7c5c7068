"""The privacy ledger with DP-FTRL trees: accounting against dp-accounting used directly,
the neighbouring relation, persistence (old formats included) and the refusals."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant

from biofed.privacy_ledger import PrivacyLedger, make_accountant, round_event, tree_event

DELTA = 1e-5
REPLACE_SPECIAL = dp_accounting.NeighboringRelation.REPLACE_SPECIAL
ADD_OR_REMOVE_ONE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def _mixed_ledger() -> tuple[PrivacyLedger, list[dp_accounting.DpEvent]]:
    """A basis round, Gaussian and Poisson-sampled rounds, and trees of two sizes, with
    every event recorded as dp-accounting sees it."""
    ledger = PrivacyLedger(DELTA, ("rdp",))
    events = []
    ledger.record_round(0, 1.0, 3.0, kind="basis")
    events.append(round_event(1.0, 3.0))
    ledger.record_tree(0, 1.4, 4)  # train rounds 0..3
    ledger.record_tree(4, 1.4, 4)  # 4..7
    events += [dp_accounting.SingleEpochTreeAggregationDpEvent(1.4, 4)] * 2
    ledger.record_round(8, 1.0, 2.5)
    ledger.record_round(9, 0.3, 1.1)
    events += [
        dp_accounting.GaussianDpEvent(2.5),
        dp_accounting.PoissonSampledDpEvent(0.3, dp_accounting.GaussianDpEvent(1.1)),
    ]
    ledger.record_tree(10, 2.0, 7)  # 10..16
    events.append(dp_accounting.SingleEpochTreeAggregationDpEvent(2.0, 7))
    return ledger, events


def test_tree_ledger_epsilon_equals_dp_accounting_on_the_composed_events():
    ledger, events = _mixed_ledger()
    direct = RdpAccountant(neighboring_relation=REPLACE_SPECIAL)
    for event in events:
        direct.compose(event)
    assert ledger.epsilon() == pytest.approx(direct.get_epsilon(DELTA), rel=1e-12)
    assert ledger.neighboring_relation == REPLACE_SPECIAL and ledger.has_trees
    assert len(ledger) == 6 and ledger.count("train") == 5 and ledger.last_round("train") == 16
    # the groups' events in the ledger's own accountant, and the composed dp_event, agree
    fresh = ledger.make_accountant()
    for group in ledger.groups:
        fresh.compose(group.event)
    assert fresh.get_epsilon(DELTA) == pytest.approx(ledger.epsilon(), rel=1e-12)
    again = make_accountant("rdp", tree_aggregation=True)
    assert again.compose(ledger.dp_event).get_epsilon(DELTA) == pytest.approx(ledger.epsilon(), rel=1e-12)


def test_gaussian_rounds_report_the_same_epsilon_under_either_relation():
    """Why a tree may switch the whole history to REPLACE_SPECIAL: dp-accounting's RDP of
    Gaussian and Poisson-sampled Gaussian rounds does not depend on the relation."""
    ledger = PrivacyLedger(DELTA, ("rdp",))
    for r, (q, z) in enumerate([(1.0, 1.3), (0.2, 0.9), (0.2, 0.9), (1.0, 4.0)]):
        ledger.record_round(r, q, z)
    assert ledger.neighboring_relation == ADD_OR_REMOVE_ONE and not ledger.has_trees
    special = RdpAccountant(neighboring_relation=REPLACE_SPECIAL).compose(ledger.dp_event)
    assert ledger.epsilon() == pytest.approx(special.get_epsilon(DELTA), rel=1e-12)
    # and a tree adds exactly its own RDP: epsilon of the whole composition, not a sum of epsilons
    before = ledger.epsilon()
    ledger.record_tree(4, 1.0, 3)
    direct = RdpAccountant(neighboring_relation=REPLACE_SPECIAL).compose(special.ledger).compose(tree_event(1.0, 3))
    assert ledger.epsilon() == pytest.approx(direct.get_epsilon(DELTA), rel=1e-12) and ledger.epsilon() > before


def test_tree_ledger_persists_and_restores():
    ledger, _ = _mixed_ledger()
    text = ledger.to_json()
    data = json.loads(text)
    assert data["format"] == 3
    assert [g["tree_steps"] for g in data["groups"]] == [None, 4, None, None, 7]
    back = PrivacyLedger.from_json(text)
    assert back.groups == ledger.groups and len(back) == len(ledger)
    assert back.epsilon() == ledger.epsilon() and back.neighboring_relation == REPLACE_SPECIAL
    with pytest.raises(ValueError, match="is not after round 16"):
        back.record_round(16, 1.0, 1.0)  # the last tree covers round 16
    back.record_tree(17, 1.4, 4)  # a further tree of an existing size joins its group
    assert [g.count for g in back.groups if g.tree_steps == 4] == [3]
    # extending an empty ledger with the persisted one (as a device restores its own)
    restored = PrivacyLedger(DELTA, ("rdp",))
    restored.extend(ledger)
    assert restored.epsilon() == ledger.epsilon()


def test_ledgers_of_formats_1_and_2_still_load():
    gaussian = PrivacyLedger(DELTA, ("rdp",))
    gaussian.record_round(0, 1.0, 2.0, kind="basis")
    gaussian.record_round(0, 0.5, 1.0)
    gaussian.record_round(1, 0.5, 1.0)
    format_2 = gaussian.to_dict()
    format_2["format"] = 2
    for group in format_2["groups"]:
        del group["tree_steps"]
    format_1 = {
        "format": 1,
        "delta": DELTA,
        "accountants": ["rdp"],
        "epsilon_budget": None,
        "entries": [
            {"round": 0, "kind": "basis", "sampling_rate": 1.0, "noise_multiplier": 2.0},
            {"round": 0, "kind": "train", "sampling_rate": 0.5, "noise_multiplier": 1.0},
            {"round": 1, "kind": "train", "sampling_rate": 0.5, "noise_multiplier": 1.0},
        ],
    }
    for old in (format_2, format_1):
        back = PrivacyLedger.from_json(json.dumps(old))
        assert back.groups == gaussian.groups and back.epsilon() == gaussian.epsilon()


def test_tree_rounds_are_covered_and_budgeted():
    ledger = PrivacyLedger(DELTA, ("rdp",), epsilon_budget=6.0)
    ledger.record_tree(0, 1.0, 4)
    with pytest.raises(ValueError, match="round 3 \\(train\\) is not after round 3"):
        ledger.record_round(3, 1.0, 1.0)
    ledger.record_round(0, 1.0, 5.0, kind="basis")  # other kinds count their own rounds
    after = RdpAccountant(neighboring_relation=REPLACE_SPECIAL).compose(ledger.dp_event).compose(tree_event(1.0, 4))
    assert ledger.epsilon_after(1.0, 1.0, tree_steps=4) == pytest.approx(after.get_epsilon(DELTA), rel=1e-12)
    assert ledger.would_exceed(1.0, 1.0, tree_steps=4) == (after.get_epsilon(DELTA) > 6.0)
    assert ledger.would_exceed(1.0, 0.0, tree_steps=4)
    assert not PrivacyLedger(DELTA, ("rdp",)).would_exceed(1.0, 0.5, tree_steps=64)


def test_a_z_zero_tree_is_non_private():
    ledger = PrivacyLedger(DELTA, ("rdp",))
    ledger.record_tree(0, 0.0, 2)
    assert ledger.epsilon() == math.inf


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: PrivacyLedger(DELTA).record_tree(0, 1.0, 4), "PLD accountant cannot account tree aggregation"),
        (lambda: PrivacyLedger(DELTA, ("pld",)).record_tree(0, 1.0, 4), "PLD accountant cannot"),
        (lambda: make_accountant("pld", tree_aggregation=True), "PLD accountant cannot"),
        (lambda: PrivacyLedger(DELTA, ("rdp",)).record_tree(0, 1.0, 0), "tree steps must be an integer >= 1"),
        (lambda: PrivacyLedger(DELTA, ("rdp",)).record_tree(0, 1.0, True), "tree steps must be an integer >= 1"),
        (lambda: PrivacyLedger(DELTA, ("rdp",)).record_tree(0, -1.0, 4), "noise_multiplier must be a finite"),
        (lambda: PrivacyLedger(DELTA, ("rdp",)).record_tree(-1, 1.0, 4), "round must be an integer >= 0"),
        (lambda: PrivacyLedger(DELTA, ("rdp",)).record_tree(0, 1.0, 4, kind="eval"), "kind must be one of"),
        (lambda: PrivacyLedger(DELTA, ("rdp",)).epsilon_after(0.5, 1.0, tree_steps=4), "sampling_rate must be 1"),
        (lambda: PrivacyLedger(DELTA, ("rdp",)).would_exceed(1.0, 1.0, tree_steps=0), "tree steps must be"),
    ],
)
def test_tree_bad_input_records_nothing(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_pld_and_trees_never_meet():
    ledger, _ = _mixed_ledger()
    both = PrivacyLedger(DELTA)  # reports RDP and PLD
    with pytest.raises(ValueError, match="cannot extend a ledger reporting \\('rdp', 'pld'\\) with trees"):
        both.extend(ledger)
    assert len(both) == 0
    data = ledger.to_dict()
    data["accountants"] = ["rdp", "pld"]
    with pytest.raises(ValueError, match="holds a tree: the PLD accountant cannot"):
        PrivacyLedger.from_dict(data)
    with pytest.raises(ValueError, match="PLD accountant cannot"):
        ledger.epsilon("pld")


@pytest.mark.parametrize(
    ("group", "match"),
    [
        ({"sampling_rate": 0.5, "tree_steps": 4}, "malformed privacy ledger group"),
        ({"tree_steps": 0}, "tree steps must be an integer >= 1"),
        ({"tree_steps": "4"}, "tree steps must be an integer >= 1"),
    ],
)
def test_malformed_tree_groups_do_not_load(group, match):
    base = {
        "kind": "train",
        "sampling_rate": 1.0,
        "noise_multiplier": 1.0,
        "count": 1,
        "first_round": 0,
        "last_round": 3,
        "tree_steps": 4,
    }
    data = {"format": 3, "delta": DELTA, "accountants": ["rdp"], "epsilon_budget": None, "groups": [base | group]}
    with pytest.raises(ValueError, match=match):
        PrivacyLedger.from_dict(data)
    missing = dict(base)
    del missing["tree_steps"]
    with pytest.raises(ValueError, match="missing or invalid field 'tree_steps'"):
        PrivacyLedger.from_dict(data | {"groups": [missing]})
