"""The CPU default: attention that reads long cached contexts in the pool, where they lie.

The reference backend gathers every sequence's whole context into a padded [B, L, H, D] block
on every layer of every step, and pads the queries of a phase group to its longest chunk:
decodes over a long cached prefix spend their time copying it, and a batch mixing a fresh
1,000-token prompt with 64-token extends computes 1,000 x 1,000 scores for each of them.

Here each sequence's keys are split, once per step in `plan`, into
- *runs*: consecutive pages of cached keys (positions below the sequence's prefix length)
  whose keys times the sequences sharing them reach `min_inplace_keys`. In the token and
  nhd layouts such a run is one slice of the pool's [slots, kv_heads, head_dim] view, so
  its scores and values are matmuls over a view, with no copy. Sequences whose run starts
  on the same page with the same length (prompts sharing a cached system prompt) attend it
  in one matmul, their queries stacked.
- the *tail*: every other key (the new tokens, short runs), gathered
  like the reference does, in buckets of sequences with similar query and tail lengths so
  padding stays within `MAX_PADDING_WASTE` of the real work; a bucket that attends no run
goes through torch SDPA's fused kernel.
Each part yields a partial result (running max, normaliser, weighted values) per query row,
and the parts are merged as split-KV kernels merge theirs (online softmax); pointwise
variants (sigmoid, silu) simply add up.

The reference backend stays the oracle; tests compare this one with the float64 oracle for
every layout and variant it supports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attention.base import AttentionBackend, AttentionConfig, BackendCapabilities
from attention.batch import ForwardBatch
from attention.variants import BUILTIN_VARIANTS, alibi_slopes
from kvcache.pool import KVPool

# A run is attended in place when its keys times the sequences sharing it reach this; below,
# gathering it with the tail (one batched op for all sequences) costs less than the dozen
# small ops of a run of its own.
MIN_INPLACE_KEYS = 256
# A tail bucket's padded size (sequences x longest queries x longest tail) may exceed the sum
# of its sequences' own sizes by this factor, plus SMALL_BUCKET_ELEMENTS (decodes batch freely).
MAX_PADDING_WASTE = 1.5
SMALL_BUCKET_ELEMENTS = 1 << 16
# Stands in for -inf as the running max of a row that has seen no visible key yet: exp of a
# difference of two such values is 1, never NaN, and its weights are all 0 anyway.
NO_MAX = -1e30


@dataclass
class _Run:
    """Keys [slot_start, slot_start + num_keys) at positions pos_start.., read in place, and
    the query rows (of every sequence that has this run) that attend them."""

    slot_start: int
    num_keys: int
    rows: torch.Tensor  # [R] int64
    q_pos: torch.Tensor  # [1, 1, R, 1, 1]
    k_pos: torch.Tensor  # [1, 1, 1, 1, num_keys]


@dataclass
class _TailBucket:
    """Padded gathered keys for a few sequences (the reference's scheme, on the tail only)."""

    q_rows: torch.Tensor  # [b, Lq] query row of each padded query (clamped)
    valid_flat: torch.Tensor  # [n] index into the flattened [b * Lq] of the real queries
    rows: torch.Tensor  # [n] their rows in the step's q
    kv_slots: torch.Tensor  # [b, Lk]
    q_pos: torch.Tensor  # [1, b, Lq, 1, 1]  (dims: kv head, sequence, query, group, key)
    k_pos: torch.Tensor  # [1, b, 1, 1, Lk]
    visible: torch.Tensor  # [1, b, Lq, 1, Lk] causal & padding
    # no row of it attends a run: its result is final, and torch SDPA's fused kernel can
    # compute it without materialising the scores (`causal`: one fresh prompt, is_causal)
    final: bool = False
    causal: bool = False


@dataclass
class _SeqKeys:
    row_start: int
    q_len: int
    prefix_len: int
    tail_pos: list[int]  # positions of the keys not in a run
    tail_slots: list[int]  # and their slots
    has_runs: bool = False


def _split_keys(pages: list[int], page_size: int, prefix_len: int,
                seq_len: int) -> tuple[list[tuple[int, int, int]], list[int]]:
    """(runs as (slot_start, num_keys, pos_start), positions of the other keys) of one
    sequence: maximal runs of consecutive page ids, cut at the prefix length (the new keys,
    written this step, are never part of a run)."""
    runs: list[tuple[int, int, int]] = []
    rest: list[int] = []
    num_pages = -(-seq_len // page_size)
    first = 0
    while first < num_pages:
        last = first
        while last + 1 < num_pages and pages[last + 1] == pages[last] + 1:
            last += 1
        start, end = first * page_size, min((last + 1) * page_size, seq_len)
        cached_end = min(end, prefix_len)
        if cached_end > start:
            runs.append((pages[first] * page_size, cached_end - start, start))
        rest.extend(range(max(cached_end, start), end))
        first = last + 1
    return runs, rest


def _buckets(seqs: list[_SeqKeys]) -> list[list[_SeqKeys]]:
    """Sequences grouped so that each group's padded size stays near its real size."""
    order = sorted(seqs, key=lambda s: (s.has_runs, s.q_len, len(s.tail_pos)))  # decodes first
    groups: list[list[_SeqKeys]] = []
    real = max_q = max_k = 0
    for s in order:
        if groups:
            q, k = max(max_q, s.q_len), max(max_k, len(s.tail_pos))
            new_real = real + s.q_len * len(s.tail_pos)
            padded = (len(groups[-1]) + 1) * q * k
            if groups[-1][0].has_runs == s.has_runs \
                    and padded <= MAX_PADDING_WASTE * new_real + SMALL_BUCKET_ELEMENTS:
                groups[-1].append(s)
                real, max_q, max_k = new_real, q, k
                continue
        groups.append([s])
        real, max_q, max_k = s.q_len * len(s.tail_pos), s.q_len, len(s.tail_pos)
    return groups


def _plan_tail(group: list[_SeqKeys], device: torch.device) -> _TailBucket:
    b = len(group)
    Lq = max(s.q_len for s in group)
    Lk = max(len(s.tail_pos) for s in group)
    q_rows, q_pos, q_valid, k_pos, k_slots, k_valid = [], [], [], [], [], []
    valid_flat: list[int] = []
    rows: list[int] = []
    for j, s in enumerate(group):
        q_rows.append([s.row_start + min(i, s.q_len - 1) for i in range(Lq)])
        q_pos.append([s.prefix_len + i for i in range(Lq)])
        q_valid.append([i < s.q_len for i in range(Lq)])
        pad = Lk - len(s.tail_pos)
        # padding keys repeat the first tail key (a written one): finite, masked to weight 0
        k_pos.append(s.tail_pos + [s.tail_pos[0]] * pad)
        k_slots.append(s.tail_slots + [s.tail_slots[0]] * pad)
        k_valid.append([True] * len(s.tail_pos) + [False] * pad)
        valid_flat.extend(range(j * Lq, j * Lq + s.q_len))
        rows.extend(range(s.row_start, s.row_start + s.q_len))

    def t(data: list, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=device)

    qp, kp = t(q_pos), t(k_pos)
    visible = (kp[:, None, :] <= qp[:, :, None]) & t(k_valid, torch.bool)[:, None, :] \
        & t(q_valid, torch.bool)[:, :, None]
    return _TailBucket(
        q_rows=t(q_rows), valid_flat=t(valid_flat), rows=t(rows), kv_slots=t(k_slots),
        q_pos=qp.view(1, b, Lq, 1, 1), k_pos=kp.view(1, b, 1, 1, Lk),
        visible=visible.view(1, b, Lq, 1, Lk),
        final=not any(s.has_runs for s in group),
        causal=b == 1 and group[0].prefix_len == 0 and group[0].tail_pos == list(range(Lq)),
    )


def _rows_first(t: torch.Tensor) -> torch.Tensor:
    """[Hkv, b, Lq, G(, D)] -> [b, Lq, Hkv, G(, D)]: rows then heads, as q is laid out."""
    return t.permute(1, 2, 0, *range(3, t.dim()))


class PagedBackend(AttentionBackend):
    name = "paged"
    capabilities = BackendCapabilities(fused_rope_store=False, cuda_graphs=False)
    # runs are slices of the [slots, kv_heads, head_dim] view: the key-major layouts
    supported_layouts = frozenset({"token", "nhd"})
    supported_variants = frozenset(BUILTIN_VARIANTS)

    def __init__(self, config: AttentionConfig, pool: KVPool,
                 min_inplace_keys: int = MIN_INPLACE_KEYS) -> None:
        super().__init__(config, pool)
        if pool.config.storage.is_fp8:
            raise ValueError("the paged backend reads full-precision K/V rows in place; "
                             "FP8 pages need --attention-backend reference (or triton)")
        self.min_inplace_keys = min_inplace_keys
        self.runs: list[_Run] = []
        self.tails: list[_TailBucket] = []
        self._slopes: torch.Tensor | None = None
        # variants SDPA expresses (a boolean or additive mask on softmax)
        self._fused_ok = config.variant.name in ("softmax", "sliding_window", "alibi")
        if config.variant.needs_slopes:  # head h = kv_head * G + g
            self._slopes = alibi_slopes(config.num_q_heads).view(
                config.num_kv_heads, 1, 1, config.group_size, 1)

    # ------------------------------------------------------------------ once per step

    def plan(self, batch: ForwardBatch, graph_mode: bool = False) -> None:
        super().plan(batch, graph_mode)
        dev = batch.block_table.device
        P = batch.page_size
        tables = batch.block_table.tolist()
        indptr = batch.qo_indptr_host
        split = []
        sharers: dict[tuple[int, int, int], int] = {}  # run -> sequences that have it
        for i, seq_len in enumerate(batch.seq_lens_host):
            prefix = seq_len - (indptr[i + 1] - indptr[i])
            seq_runs, rest = _split_keys(tables[i], P, prefix, seq_len)
            split.append((seq_runs, rest))
            for key in seq_runs:
                sharers[key] = sharers.get(key, 0) + 1
        run_rows: dict[tuple[int, int, int], list[int]] = {}  # (slot, keys, pos) -> rows
        run_qpos: dict[tuple[int, int, int], list[int]] = {}
        seqs: list[_SeqKeys] = []
        for i, (seq_runs, tail) in enumerate(split):
            seq_len = batch.seq_lens_host[i]
            q_len = indptr[i + 1] - indptr[i]
            prefix = seq_len - q_len
            inplace = False
            for key in seq_runs:
                # a run read by few queries is cheaper gathered than attended on its own
                if key[1] * sharers[key] < self.min_inplace_keys:
                    tail = list(range(key[2], key[2] + key[1])) + tail
                    continue
                inplace = True
                run_rows.setdefault(key, []).extend(range(indptr[i], indptr[i + 1]))
                run_qpos.setdefault(key, []).extend(range(prefix, seq_len))
            pages = tables[i]
            slots = [pages[p // P] * P + p % P for p in tail]
            seqs.append(_SeqKeys(indptr[i], q_len, prefix, tail, slots, inplace))
        self.runs = [
            _Run(slot, n, torch.tensor(rows, dtype=torch.int64, device=dev),
                 torch.tensor(run_qpos[(slot, n, pos)], device=dev).view(1, 1, -1, 1, 1),
                 torch.arange(pos, pos + n, device=dev).view(1, 1, 1, 1, n))
            for (slot, n, pos), rows in run_rows.items()
        ]
        self.tails = [_plan_tail(group, dev) for group in _buckets(seqs)]

    # ------------------------------------------------------------------ once per layer

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        assert self.batch is not None, "plan() must run before forward()"
        self.pool.store(layer, k, v, self.batch.slot_mapping)
        cfg = self.config
        T, Hq, D = q.shape
        Hkv = cfg.num_kv_heads
        cd = torch.float64 if q.dtype == torch.float64 else torch.float32
        k_cache, v_cache = self.pool.k_caches[layer], self.pool.v_caches[layer]
        # accumulators per query row and head: running max, normaliser (softmax) or visible
        # key count (pointwise), weighted values
        row_max = torch.full((T, Hq), NO_MAX, dtype=cd, device=q.device)
        row_sum = torch.zeros((T, Hq), dtype=cd, device=q.device)
        acc = torch.zeros((T, Hq, D), dtype=cd, device=q.device)
        G = cfg.group_size
        flat_k, flat_v = k_cache.view(-1, Hkv, D), v_cache.view(-1, Hkv, D)
        scale = cfg.scale
        for tb in self.tails:  # every row is in exactly one tail bucket: plain writes
            b, Lq = tb.q_rows.shape
            Lk = tb.kv_slots.shape[1]
            # one row gather per bucket (index_select: several times faster than indexing)
            keys = flat_k.index_select(0, tb.kv_slots.view(-1)).to(cd).view(b, Lk, Hkv, D)
            vals = flat_v.index_select(0, tb.kv_slots.view(-1)).to(cd).view(b, Lk, Hkv, D)
            if tb.final and self._fused_ok:
                acc[tb.rows] = self._fused_tail(tb, q, keys, vals, cd)
                row_sum[tb.rows] = 1.0
                continue
            qg = (q[tb.q_rows].to(cd) * scale).view(b, Lq, Hkv, G, D)
            # per kv head: a bmm over the sequences, reading the gathered block through
            # strides (a [Hkv, b] batch would need another copy of it)
            scores = torch.empty((Hkv, b, Lq * G, Lk), dtype=cd, device=q.device)
            for h in range(Hkv):
                torch.bmm(qg[:, :, h].reshape(b, Lq * G, D), keys[:, :, h].transpose(1, 2),
                          out=scores[h])
            m, s, w = self._weights(scores.view(Hkv, b, Lq, G, Lk), tb.q_pos, tb.k_pos,
                                    tb.visible)
            o = torch.empty((Hkv, b, Lq * G, D), dtype=cd, device=q.device)
            for h in range(Hkv):
                torch.bmm(w[h].view(b, Lq * G, Lk), vals[:, :, h], out=o[h])
            row_max[tb.rows] = _rows_first(m).reshape(b * Lq, Hq)[tb.valid_flat]
            row_sum[tb.rows] = _rows_first(s).reshape(b * Lq, Hq)[tb.valid_flat]
            acc[tb.rows] = _rows_first(o.view(Hkv, b, Lq, G, D)).reshape(b * Lq, Hq, D)[
                tb.valid_flat]
        # head-major views of the pool, [Hkv, slots, D]: a run is a slice of them
        k_heads, v_heads = flat_k.transpose(0, 1), flat_v.transpose(0, 1)
        for run in self.runs:
            R = run.rows.shape[0]
            qg = (q[run.rows].to(cd) * scale).view(R, Hkv, G, D).transpose(0, 1)
            # slices of the pool's views: [Hkv, D, n] and [Hkv, n, D], no copy (float32/64
            # pools; another dtype is converted, which copies)
            end = run.slot_start + run.num_keys
            keys_t = k_heads[:, run.slot_start : end].to(cd).transpose(1, 2)
            vals = v_heads[:, run.slot_start : end].to(cd)
            scores = torch.matmul(qg.reshape(Hkv, R * G, D), keys_t)
            m, s, w = self._weights(scores.view(Hkv, 1, R, G, -1), run.q_pos, run.k_pos, None)
            o = torch.matmul(w.view(Hkv, R * G, -1), vals).view(Hkv, 1, R, G, D)
            self._merge(row_max, row_sum, acc, run.rows, _rows_first(m).reshape(R, Hq),
                        _rows_first(s).reshape(R, Hq), _rows_first(o).reshape(R, Hq, D))
        if self.config.variant.uses_softmax or self.config.variant.normalize_by_visible:
            acc = acc / row_sum.clamp(min=1e-30 if self.config.variant.uses_softmax else 1.0)[..., None]
        return acc.to(q.dtype)

    def _fused_tail(self, tb: _TailBucket, q: torch.Tensor, keys: torch.Tensor,
                    vals: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
        """A final bucket (keys, vals [b, Lk, Hkv, D] gathered) through torch SDPA's fused
        kernel, which never materialises the scores -> [rows, Hq, D]. Decodes fold the GQA
        group into the query rows (SDPA's own GQA path would copy K and V per group)."""
        b, Lq = tb.q_rows.shape
        Lk = tb.kv_slots.shape[1]
        cfg = self.config
        Hq, Hkv, D = cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim
        decode = Lq == 1
        if decode:
            qg = q[tb.q_rows[:, 0]].to(cd).view(b, Hkv, -1, D)  # [b, Hkv, G, D]
        else:
            qg = q[tb.q_rows].to(cd).transpose(1, 2)  # [b, Hq, Lq, D]
        variant = cfg.variant
        mask: torch.Tensor | None = None
        if decode or not tb.causal or variant.name != "softmax":
            q_pos, k_pos = tb.q_pos.view(b, 1, Lq, 1), tb.k_pos.view(b, 1, 1, Lk)
            visible = tb.visible.view(b, 1, Lq, Lk)
            if variant.window is not None:
                visible = visible & ((q_pos - k_pos) < variant.window)
            mask = visible
            if self._slopes is not None:
                heads = (1, Hkv, cfg.group_size, 1) if decode else (1, Hq, 1, 1)
                slopes = self._slopes.reshape(heads).to(cd)
                mask = (slopes * (k_pos - q_pos).to(cd)).masked_fill(~visible, float("-inf"))
        out = F.scaled_dot_product_attention(
            qg, keys.transpose(1, 2), vals.transpose(1, 2), attn_mask=mask,
            is_causal=mask is None, scale=cfg.scale, enable_gqa=not decode)
        if decode:
            return out.reshape(b, Hq, D)
        # padding queries see no key and come back NaN; valid_flat drops them
        return out.transpose(1, 2).reshape(b * Lq, Hq, D)[tb.valid_flat]

    def _weights(self, scores: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                 visible: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scaled scores [Hkv, b, Lq, G, Lk] (transformed in place: they are this step's
        own, and the one buffer of the keys' size the arithmetic needs) -> (max, sum,
        weights): softmax variants give exp(s - max) and its sum over the keys; pointwise
        ones their weights and the count of visible keys. Positions and `visible`
        broadcast as [1, b, Lq, 1, Lk]."""
        variant = self.config.variant
        if variant.softcap is not None:
            scores = scores.div_(variant.softcap).tanh_().mul_(variant.softcap)
        if self._slopes is not None:
            scores += self._slopes.to(scores.dtype) * (k_pos - q_pos).to(scores.dtype)
        if variant.window is not None:
            in_window = (q_pos - k_pos) < variant.window
            visible = in_window if visible is None else visible & in_window
        if variant.uses_softmax:
            if visible is not None:
                scores.masked_fill_(~visible, float("-inf"))
            m = scores.amax(dim=-1).clamp(min=NO_MAX)
            w = scores.sub_(m[..., None]).exp_()
            return m, w.sum(dim=-1), w
        fn = variant.spec.weight  # type: ignore[union-attr]
        w = fn(scores)
        if visible is not None:
            w.masked_fill_(~visible, 0.0)
            count = visible.sum(dim=-1, dtype=scores.dtype)
        else:
            count = torch.full((), scores.shape[-1], dtype=scores.dtype)
        shape = w.shape[:-1]
        return torch.zeros((), dtype=scores.dtype).expand(shape), count.expand(shape), w

    def _merge(self, row_max: torch.Tensor, row_sum: torch.Tensor, acc: torch.Tensor,
               rows: torch.Tensor, m: torch.Tensor, s: torch.Tensor, o: torch.Tensor) -> None:
        """Fold one partial result for `rows` into the accumulators (online softmax)."""
        if not self.config.variant.uses_softmax:
            row_sum.index_add_(0, rows, s)
            acc.index_add_(0, rows, o)
            return
        old_max = row_max[rows]
        new_max = torch.maximum(old_max, m)
        keep, add = torch.exp(old_max - new_max), torch.exp(m - new_max)
        row_max[rows] = new_max
        row_sum[rows] = row_sum[rows] * keep + s * add
        acc[rows] = acc[rows] * keep[..., None] + o * add[..., None]

