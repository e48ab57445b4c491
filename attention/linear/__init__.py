"""Lightning attention (MiniMax-Text-01's linear attention with a per-head decay) over a
pool of float32 recurrent states: the torch oracle (`reference.py`), the Triton kernels
(`extend.py`, `decode.py`) and the per-layer decay rates (`slopes.py`).

Contract shared by the reference and the kernels:

lightning_extend(q, k, v, qo_indptr, qo_indptr_host, prefix_lens_host, slopes, states,
                 state_slots, snapshot_every=0, snapshot_slots=None) -> out [T, H, D]
    q, k, v [T, H, D] (last dim contiguous), sequence b owns rows qo_indptr[b]:qo_indptr[b+1]
    and starts at absolute position prefix_lens_host[b]; states [num_slots, H, D, D] is one
    layer's pool, states[state_slots[b]] is b's initial state and receives its final one.
    With snapshot_every = N > 0 (a multiple of SNAPSHOT_ALIGN), the state after each absolute
    token count j*N inside b's new tokens goes to states[snapshot_slots[b, i]], i = 0, 1, ...
    in increasing order; -1 skips one.
lightning_decode(q, k, v, slopes, states, state_slots) -> out [B, H, D]
    one token per sequence, states updated in place; no host sync, CUDA-graph safe (padded
    rows may all point at a scratch slot).
"""

from attention.linear.args import SNAPSHOT_ALIGN, snapshot_positions
from attention.linear.decode import DEFAULT_DECODE_CONFIG, DecodeConfig, lightning_decode
from attention.linear.extend import DEFAULT_EXTEND_CONFIG, ExtendConfig, lightning_extend
from attention.linear.reference import lightning_decode_reference, lightning_extend_reference
from attention.linear.slopes import slopes_for_layer

__all__ = [
    "DEFAULT_DECODE_CONFIG",
    "DEFAULT_EXTEND_CONFIG",
    "SNAPSHOT_ALIGN",
    "DecodeConfig",
    "ExtendConfig",
    "lightning_decode",
    "lightning_extend",
    "lightning_decode_reference",
    "lightning_extend_reference",
    "slopes_for_layer",
    "snapshot_positions",
]
