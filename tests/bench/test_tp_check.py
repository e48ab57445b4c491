"""bench/tp_check.py's comparison of a split engine's outputs with the reference's."""

from __future__ import annotations

from bench.tp_check import Outputs, compare


def test_compare_counts_identical_outputs_and_logprobs_up_to_the_divergence() -> None:
    ref = Outputs([[1, 2, 3], [4, 5, 6]], [[-0.1, -0.2, -0.3], [-1.0, -1.0, -1.0]], 1.0)
    out = Outputs([[1, 2, 3], [4, 9, 6]], [[-0.1, -0.25, -0.3], [-1.0, -1.5, -9.0]], 2.0)
    row = compare(2, ref, out)
    assert (row.identical, row.outputs, row.first_divergence) == (1, 2, 1)
    # the first output's 0.05; the second's differences are at and after its divergence
    assert abs(row.max_logprob_diff - 0.05) < 1e-9
    same = compare(1, ref, ref)
    assert (same.identical, same.first_divergence, same.max_logprob_diff) == (2, None, 0.0)
