"""models/expert_layout.py: what a malformed layout is told, and the
replica rule (every slot computed by exactly one rank)."""

import numpy as np
import pytest

from exod.models import expert_layout as layout

GOOD = {1: [[0, 3, 6], [1, 4, 7], [2, 5]], 2: [[1, 2, 7], [0, 5, 6], [3, 4]]}


def test_a_good_layout_round_trips_through_the_proto():
    assert layout.validate(layout.to_proto(GOOD), 8, [1, 2], 3) == GOOD
    assert layout.validate(GOOD, 8, [1, 2], 3, shares=[3, 3, 2]) == GOOD
    assert layout.rank_experts(GOOD, 2) == {1: [2, 5], 2: [3, 4]}


@pytest.mark.parametrize("bad,reason", [
    ({**GOOD, 0: GOOD[1]}, "layer 0 is not a MoE layer of the model (MoE layers: [1, 2])"),
    ({1: GOOD[1]}, "MoE layer 2 has no experts listed"),
    ({**GOOD, 2: [[1, 2, 7], [0, 5, 6]]}, "layer 2 lists 2 ranks, not 3"),
    ({**GOOD, 2: [[1, 2, 8], [0, 5, 6], [3, 4]]}, "layer 2, rank 0: expert 8 is outside 0-7"),
    ({**GOOD, 2: [[1, 2, 7], [0, 5, 5], [3, 4]]}, "layer 2, rank 1: an expert is listed twice in [0, 5, 5]"),
    ({**GOOD, 2: [[1, 7, 2], [0, 5, 6], [3, 4]]}, "layer 2, rank 0: experts [1, 7, 2] are not in ascending order"),
    ({**GOOD, 2: [[1, 2, 7], [0, 5, 6], [3, 5]]}, "layer 2: expert 4 is on no rank"),
    ({**GOOD, 2: [[1, 2], [0, 5, 6], [3, 4, 7]]}, "layer 2: ranks hold [2, 3, 3] experts, layer 1 [3, 3, 2]"),
    ({**GOOD, 2: [[1, 2, 7], [0, 5, 6], []]}, "layer 2, rank 2: no experts"),
])
def test_a_malformed_layout_is_refused_with_its_reason(bad, reason):
    with pytest.raises(layout.LayoutError) as refused:
        layout.validate(bad, 8, [1, 2], 3)
    assert reason in str(refused.value), str(refused.value)


def test_counts_other_than_the_shares_are_refused():
    with pytest.raises(layout.LayoutError) as refused:
        layout.validate(GOOD, 8, [1, 2], 3, shares=[4, 2, 2])
    assert "ranks hold [3, 3, 2] experts per layer, not the shares [4, 2, 2]" in str(refused.value)


def test_a_layer_listed_twice_in_the_proto_is_refused():
    proto = layout.to_proto(GOOD)
    proto.layers.append(proto.layers[0])
    with pytest.raises(layout.LayoutError, match="layer 1 is listed twice"):
        layout.validate(proto, 8, [1, 2], 3)


def test_replicas_take_turns_in_token_major_order():
    # Expert 2 on ranks 0 and 1, expert 5 on ranks 0, 1 and 2; the rest on one rank.
    holders = layout.holders([[0, 1, 2, 5], [2, 3, 5], [4, 5, 6, 7]], 8)
    assert holders[2] == (0, 1) and holders[5] == (0, 1, 2) and holders[7] == (2,)
    slots = [[2, 5], [2, 0], [5, 2], [5, 7], [2, 5]]  # 5 tokens, k = 2
    assert layout.slot_ranks(slots, holders).tolist() == [0, 0, 1, 0, 1, 0, 2, 2, 1, 0]


def test_every_slot_is_computed_by_exactly_one_holder():
    rng = np.random.default_rng(0)
    sets = [[0, 1, 2, 3], [2, 3, 4, 5], [5, 6, 7, 0]]
    holders = layout.holders(sets, 8)
    slots = rng.integers(0, 8, size=(7, 3, 4))
    ranks = layout.slot_ranks(slots, holders)
    flat = slots.reshape(-1)
    assert all(ranks[i] in holders[e] for i, e in enumerate(flat))
    for e in range(8):
        # The replicas split an expert's slots as evenly as the turns allow.
        mine = np.bincount(ranks[flat == e], minlength=3)[list(holders[e])]
        assert mine.max() - mine.min() <= 1


def test_the_contiguous_layout_is_the_share_split():
    assert layout.contiguous(8, [(0, 4), (4, 7), (7, 8)], [1, 3]) == {
        1: [[0, 1, 2, 3], [4, 5, 6], [7]], 3: [[0, 1, 2, 3], [4, 5, 6], [7]]}


def test_the_module_imports_without_mlx():
    import subprocess
    import sys

    code = ("import sys, exod.models.expert_layout as l; "
            "l.slot_ranks([1, 1], l.holders([[0, 1], [1]], 2)); assert 'mlx' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
