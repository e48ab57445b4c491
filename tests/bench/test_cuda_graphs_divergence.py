"""The graphs-vs-eager divergence report: the first differing token of each stream, its
top-2 gaps, and the near-tie verdict against the bf16 spacing and the cross-mode noise."""

from __future__ import annotations

import torch

from bench.cuda_graphs import bf16_spacing, divergences
from server.engine.outputs import TokenLogprob


def _row(token: int, other: int, lp: float, gap: float) -> TokenLogprob:
    return TokenLogprob(token, lp, [(token, lp), (other, lp - gap)])


def test_bf16_spacing_is_the_distance_to_the_next_bfloat16() -> None:
    for value in (0.3, 1.0, 7.5, 23.0, 100.0):
        x = torch.tensor(value, dtype=torch.bfloat16)
        nxt = torch.nextafter(x, torch.tensor(1e9, dtype=torch.bfloat16))
        assert bf16_spacing(value) == float(nxt - x)


def test_a_swapped_near_tie_and_a_real_divergence_are_told_apart() -> None:
    same = [_row(5, 6, -0.1, 3.0), _row(7, 8, -0.2, 2.0)]
    eager = [same[:], same + [_row(10, 11, -0.70, 0.004)], same + [_row(20, 21, -0.1, 2.5)]]
    graph = [same[:],
             [_row(5, 6, -0.1005, 3.0), same[1], _row(11, 10, -0.69, 0.003)],
             same + [_row(22, 20, -0.1, 1.0)]]
    found = divergences(eager, graph, max_abs_logit=12.0)  # spacing 2**(3-7) = 0.0625
    assert [d["sequence"] for d in found] == [1, 2]
    tie, real = found
    assert tie["first_differing_token"] == 2 and tie["swapped_pair"] and tie["near_tie"]
    assert abs(tie["cross_mode_logprob_diff_before"] - 5e-4) < 1e-9
    assert not real["swapped_pair"] and not real["near_tie"]
    assert real["eager_gap"] == 2.5 and real["graph_gap"] == 1.0
