"""Batch decode over the `hnd_x` layout in Gluon: K/V straight from global memory into
tensor-core operand registers, with no shared-memory transpose.

Same contract as `decode.decode_attention` (and the same split-KV partial-result format, so
its merge kernel is reused) for every variant, bf16/fp16, head dim 64 or 128.

Why a second kernel: in hnd_x ([pages, kv_heads, page_size/8, head_dim, 8] for 2-byte
elements) eight consecutive tokens of one dimension are one 16-byte run. Both dots want
the opposite: q.K^T reduces over the head dim, so an mma operand register holds two
consecutive *dimensions* of one token. The portable kernel loads 16-byte runs and lets the
compiler transpose the tile through shared memory, two bytes at a time, and that transpose
capped its bandwidth (docs/kernels.md).

Here the token order inside a 64-token tile is permuted instead of the data. Token
(run r, slot x) (r, x in 0..7) becomes score column n = 8x + r. An mma.m16n8k16 B-operand
thread holds one column of each 8-column block, so a thread that loads the 16-byte run
(r, dim d) owns column r of the eight column blocks x = 0..7: every loaded element is
already in the thread that multiplies it, and a register permutation (byte shuffles)
builds the operand. The scores come out in the permuted order; the softmax does not care,
and the same permutation read along the other axis makes the V runs land in the P.V
B-operand threads too. The load layouts below are written as linear layouts: register,
lane and warp bases of a [run, dim, slot] tile, which are the mma operand layouts with the
token index relabelled.

One warp per program (sequence, KV head, split); splits fill the GPU.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from attention.triton.variants import TritonVariant
from kvcache.layout import HNDX_ID, KVLayout

_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}
BLOCK_N = 64  # tokens per tile: 8 runs x 8 slots (one mma column block per slot)
RUN = 8  # tokens per 16-byte run


@gluon.jit
def _load_runs(cache, table_row, kv_head, d0, start, hi, s_page, s_head, s_xblk,
               LD: gl.constexpr, PAGE_SIZE: gl.constexpr):
    """Dims [d0, d0 + CHUNK) of tokens [start, start + 64) as a [run, dim, slot] tile in
    layout LD; runs that start at or past `hi` read as 0."""
    RUNS: gl.constexpr = LD.shape[0]
    CHUNK: gl.constexpr = LD.shape[1]
    SLOTS: gl.constexpr = LD.shape[2]
    r = gl.arange(0, RUNS, layout=gl.SliceLayout(1, gl.SliceLayout(2, LD)))
    d = gl.arange(0, CHUNK, layout=gl.SliceLayout(0, gl.SliceLayout(2, LD)))
    x = gl.arange(0, SLOTS, layout=gl.SliceLayout(0, gl.SliceLayout(1, LD)))
    tok0 = start + r * SLOTS
    valid = tok0 < hi
    page = gl.load(table_row + tok0 // PAGE_SIZE, mask=valid, other=0).to(gl.int64)
    base = page * s_page + kv_head * s_head + ((tok0 % PAGE_SIZE) // SLOTS) * s_xblk
    offs = (base[:, None, None] + ((d0 + d) * SLOTS)[None, :, None]) + x[None, None, :]
    # runs are 16-byte aligned and contiguous; the page lookup hides that from the compiler
    offs = gl.max_contiguous(gl.multiple_of(offs, [1, 1, SLOTS]), [1, 1, SLOTS])
    return gl.load(cache + offs, mask=valid[:, None, None], other=0.0)


@gluon.jit(do_not_specialize=["max_splits", "stride_bt"])
def _hndx_decode_kernel(
    q_ptr, k_cache, v_cache, block_table, seq_lens, slopes_ptr,
    out_ptr, part_out_ptr, part_stat_ptr, scale, param,
    stride_qb, stride_qh, stride_ob, stride_oh, stride_bt, s_page, s_head, s_xblk,
    max_splits,
    GROUP: gl.constexpr, HEADS_PAD: gl.constexpr, HEAD_DIM: gl.constexpr,
    PAGE_SIZE: gl.constexpr, DIRECT_OUT: gl.constexpr,
    LOGITS_FN: gl.constexpr, WEIGHT_FN: gl.constexpr, USE_SOFTMAX: gl.constexpr,
    NORMALIZE_BY_VISIBLE: gl.constexpr, HAS_SLOPES: gl.constexpr,
):
    gl.static_assert(HEAD_DIM == 64 or HEAD_DIM == 128)
    b = gl.program_id(0)
    kv_head = gl.program_id(1)
    split = gl.program_id(2)
    num_splits = gl.num_programs(2)
    seq_len = gl.load(seq_lens + b)
    per_split = gl.cdiv(gl.cdiv(seq_len, num_splits), 64) * 64
    lo = split * per_split
    hi = gl.minimum(lo + per_split, seq_len)
    table_row = block_table + b.to(gl.int64) * stride_bt
    dtype: gl.constexpr = k_cache.dtype.element_ty

    # Transposed products, so the group's few query heads are the mma's narrow N side:
    # S^T = K.q^T ([64 tokens, heads]) and O^T = V^T.P^T ([dims, heads]).
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1],
                                                  instr_shape=[16, 8])
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_OP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    ROWS: gl.constexpr = gl.SliceLayout(1, MMA)  # along tokens / dims
    HEADS: gl.constexpr = gl.SliceLayout(0, MMA)  # along query heads
    # K as [run, dim, slot]: lane 4g+t holds run g and dims {2t, 2t+1, 2t+8, 2t+9} + 16i;
    # with token m = 8*slot + run that is the A operand of K.q^T ([m, dim]).
    K_LD: gl.constexpr = gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [0, 0, 2], [0, 0, 4], [0, 1, 0], [0, 8, 0], [0, 16, 0], [0, 32, 0]],
        lane_bases=[[0, 2, 0], [0, 4, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        warp_bases=[], block_bases=[], shape=[8, 64, 8])
    # V as [run, dim, slot]: lane 4g+t holds runs {2t, 2t+1} and dims g + 8i: the A operand
    # of V^T.P^T ([dim, m]) under the same token order.
    V_LD: gl.constexpr = gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [0, 0, 2], [0, 0, 4], [1, 0, 0], [0, 8, 0], [0, 16, 0], [0, 32, 0]],
        lane_bases=[[2, 0, 0], [4, 0, 0], [0, 1, 0], [0, 2, 0], [0, 4, 0]],
        warp_bases=[], block_bases=[], shape=[8, 64, 8])

    offs_h = gl.arange(0, HEADS_PAD, layout=HEADS)
    offs_r = gl.arange(0, 64, layout=ROWS)
    head_ok = offs_h < GROUP
    q_cols = (b * stride_qb + (kv_head * GROUP + offs_h) * stride_qh)[None, :]
    q_lo = gl.convert_layout(gl.load(q_ptr + q_cols + offs_r[:, None], mask=head_ok[None, :],
                                     other=0.0), B_OP)  # q^T [dims, heads]
    if HEAD_DIM == 128:
        q_hi = gl.convert_layout(gl.load(q_ptr + q_cols + 64 + offs_r[:, None],
                                         mask=head_ok[None, :], other=0.0), B_OP)
    # score row m is token 8*(m % 8) + m // 8 of the tile
    tok_of_row = (offs_r % 8) * 8 + offs_r // 8
    # the variant's view: s^T is [keys, heads], so positions and slopes are transposed too
    q_pos = gl.zeros([1, HEADS_PAD], gl.int32, layout=MMA) + (seq_len - 1)
    if HAS_SLOPES:
        slope = gl.load(slopes_ptr + kv_head * GROUP + offs_h, mask=head_ok, other=0.0)[None, :]
    else:
        slope = gl.zeros([1, HEADS_PAD], gl.float32, layout=MMA)
    r_v = gl.arange(0, 8, layout=gl.SliceLayout(1, gl.SliceLayout(2, V_LD)))
    x_v = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, V_LD)))
    tok_v = (r_v * 8)[:, None, None] + x_v[None, None, :]

    m_i = gl.full([HEADS_PAD], float("-inf"), gl.float32, layout=HEADS)
    l_i = gl.zeros([HEADS_PAD], gl.float32, layout=HEADS)
    acc_lo = gl.zeros([64, HEADS_PAD], gl.float32, layout=MMA)
    acc_hi = gl.zeros([64, HEADS_PAD], gl.float32, layout=MMA)
    for start in range(lo, hi, 64):
        k3 = _load_runs(k_cache, table_row, kv_head, 0, start, hi, s_page, s_head, s_xblk,
                        K_LD, PAGE_SIZE)
        k_op = gl.convert_layout(gl.reshape(gl.permute(k3, [2, 0, 1]), [64, 64]), A_OP)
        s = mma_v2(k_op, q_lo, gl.zeros([64, HEADS_PAD], gl.float32, layout=MMA))
        if HEAD_DIM == 128:
            k3 = _load_runs(k_cache, table_row, kv_head, 64, start, hi, s_page, s_head, s_xblk,
                            K_LD, PAGE_SIZE)
            k_op = gl.convert_layout(gl.reshape(gl.permute(k3, [2, 0, 1]), [64, 64]), A_OP)
            s = mma_v2(k_op, q_hi, s)
        k_pos = (start + tok_of_row)[:, None]
        s = LOGITS_FN(s * scale, q_pos, k_pos, slope, param)
        s = gl.where(k_pos < hi, s, float("-inf"))
        if USE_SOFTMAX:
            m_new = gl.maximum(m_i, gl.max(s, 0))
            m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
            p = gl.exp2((s - m_safe[None, :]) * 1.4426950408889634)
            alpha = gl.exp2((m_i - m_safe) * 1.4426950408889634)
            l_i = l_i * alpha + gl.sum(p, 0)
            m_i = m_new
        else:
            visible = s != float("-inf")
            p = gl.where(visible, WEIGHT_FN(s, q_pos, k_pos, slope, param), 0.0)
            l_i += gl.sum(visible.to(gl.float32), 0)  # visible-key count
            alpha = gl.full([HEADS_PAD], 1.0, gl.float32, layout=HEADS)
        p_op = gl.convert_layout(p.to(dtype), B_OP)  # P^T [m, heads]
        # V slots past hi inside a loaded run may hold stale values (NaN * 0 is NaN)
        v_ok = (start + tok_v) < hi
        v3 = _load_runs(v_cache, table_row, kv_head, 0, start, hi, s_page, s_head, s_xblk,
                        V_LD, PAGE_SIZE)
        v3 = gl.where(v_ok, v3, gl.zeros_like(v3))
        v_op = gl.convert_layout(gl.reshape(gl.permute(v3, [1, 2, 0]), [64, 64]), A_OP)
        acc_lo = mma_v2(v_op, p_op, acc_lo * alpha[None, :])
        if HEAD_DIM == 128:
            v3 = _load_runs(v_cache, table_row, kv_head, 64, start, hi, s_page, s_head, s_xblk,
                            V_LD, PAGE_SIZE)
            v3 = gl.where(v_ok, v3, gl.zeros_like(v3))
            v_op = gl.convert_layout(gl.reshape(gl.permute(v3, [1, 2, 0]), [64, 64]), A_OP)
            acc_hi = mma_v2(v_op, p_op, acc_hi * alpha[None, :])

    if USE_SOFTMAX:
        inv_l = 1.0 / gl.where(l_i == 0.0, 1.0, l_i)
    elif NORMALIZE_BY_VISIBLE and DIRECT_OUT:
        inv_l = 1.0 / gl.maximum(l_i, 1.0)
    else:
        inv_l = gl.full([HEADS_PAD], 1.0, gl.float32, layout=HEADS)
    heads = kv_head * GROUP + offs_h
    mask = head_ok[None, :]
    if DIRECT_OUT:
        o_cols = (b * stride_ob + heads * stride_oh)[None, :] + offs_r[:, None]
        gl.store(out_ptr + o_cols, (acc_lo * inv_l[None, :]).to(out_ptr.dtype.element_ty),
                 mask=mask)
        if HEAD_DIM == 128:
            gl.store(out_ptr + o_cols + 64,
                     (acc_hi * inv_l[None, :]).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # decode.py's partial format: [B, Hq, max_splits, HEAD_DIM] outputs, log2-sum-exp stats
        row = (b * (gl.num_programs(1) * GROUP) + heads).to(gl.int64) * max_splits + split
        p_cols = (row * HEAD_DIM)[None, :] + offs_r[:, None]
        gl.store(part_out_ptr + p_cols, acc_lo * inv_l[None, :], mask=mask)
        if HEAD_DIM == 128:
            gl.store(part_out_ptr + p_cols + 64, acc_hi * inv_l[None, :], mask=mask)
        if USE_SOFTMAX:
            stat = gl.where(l_i == 0.0, float("-inf"),
                            m_i * 1.4426950408889634 + gl.log2(gl.where(l_i == 0.0, 1.0, l_i)))
        else:
            stat = l_i
        gl.store(part_stat_ptr + row, stat, mask=head_ok)


def supports(q: torch.Tensor, k_cache: torch.Tensor, layout: KVLayout) -> bool:
    """Whether this kernel serves a decode call; every other one takes the portable kernel."""
    return (layout.kernel_id == HNDX_ID and q.is_cuda and layout.x == RUN
            and torch.cuda.get_device_capability(q.device)[0] >= 8  # mma.sync m16n8k16
            and layout.head_dim in (64, 128) and q.shape[1] // layout.num_kv_heads <= 16
            and q.dtype in _GL_DTYPES and k_cache.dtype == q.dtype)


def choose_num_splits(batch_size: int, num_kv_heads: int, max_seq_len: int, num_sms: int,
                      max_splits: int, programs_per_sm: int = 8,
                      min_tokens_per_split: int = 256) -> int:
    """Splits per sequence for one-warp programs: as many as fit one wave of about
    `programs_per_sm` resident programs per SM (188 registers a thread allow 10), rounded
    down, since a second, partial wave costs more than the extra split gains
    (docs/kernels.md, "Launch choices")."""
    programs = max(1, batch_size * num_kv_heads)
    want = num_sms * programs_per_sm // programs
    longest = -(-max_seq_len // max(BLOCK_N, min_tokens_per_split))
    return max(1, min(want, longest, max_splits))


def launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: KVLayout,
           block_table: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor, scale: float,
           variant: TritonVariant, slopes: torch.Tensor, num_splits: int,
           part_out: torch.Tensor, part_stat: torch.Tensor) -> None:
    """The decode kernel alone. With num_splits > 1 it writes the partial rows of
    `decode.decode_attention`'s format, which the caller merges."""
    B, Hq, D = q.shape
    group = Hq // layout.num_kv_heads
    s_page, _, s_head, _, s_xblk = layout.strides()
    _hndx_decode_kernel[(B, layout.num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_table, seq_lens, slopes, out, part_out, part_stat,
        scale, variant.param, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        block_table.stride(0), s_page, s_head, s_xblk, num_splits,
        GROUP=group, HEADS_PAD=8 if group <= 8 else 16, HEAD_DIM=D,
        PAGE_SIZE=layout.page_size, DIRECT_OUT=num_splits == 1, num_warps=1,
        **variant.kernel_args(),
    )


def compile_offline(head_dim: int = 128, page_size: int = 16, group: int = 4,
                    direct: bool = True, variant: str = "softmax", arch: int = 90,
                    maxnreg: int | None = None):
    """Build the kernel for an NVIDIA target on a machine without a GPU (CI, PTX checks).
    Needs TRITON_INTERPRET unset when this module is imported."""
    from triton.backends.compiler import GPUTarget

    from attention.triton.variants import triton_variant
    from attention.variants import Variant

    signature = {
        "q_ptr": "*bf16", "k_cache": "*bf16", "v_cache": "*bf16", "block_table": "*i32",
        "seq_lens": "*i32", "slopes_ptr": "*fp32", "out_ptr": "*bf16", "part_out_ptr": "*fp32",
        "part_stat_ptr": "*fp32", "scale": "fp32", "param": "fp32", "stride_qb": "i32",
        "stride_qh": "i32", "stride_ob": "i32", "stride_oh": "i32", "stride_bt": "i32",
        "s_page": "i32", "s_head": "i32", "s_xblk": "i32", "max_splits": "i32",
    }
    constants = dict(GROUP=group, HEADS_PAD=8 if group <= 8 else 16, HEAD_DIM=head_dim,
                     PAGE_SIZE=page_size, DIRECT_OUT=direct,
                     **triton_variant(Variant(variant, 1.0)).kernel_args())
    signature.update({name: "constexpr" for name in constants})
    # the pointers and strides of a real launch are 16-byte multiples, which Triton
    # specialises on: the same attributes here, so the offline build vectorises like one
    aligned = ["q_ptr", "k_cache", "v_cache", "block_table", "seq_lens", "slopes_ptr", "out_ptr",
               "part_out_ptr", "part_stat_ptr", "stride_qb", "stride_qh", "stride_ob",
               "stride_oh", "s_page", "s_head", "s_xblk"]
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    source = gluon._runtime.GluonASTSource(_hndx_decode_kernel, signature=signature,
                                           constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": 1, "maxnreg": maxnreg})
