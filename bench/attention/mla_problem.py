"""MLA benchmark problems: random DeepSeek-style attention inputs in both forms.

One problem holds the latent form the Triton kernel reads (absorbed queries
q = (q_nope W_UK | q_pe) [T, H, rank + rope] and latent rows c | k_pe on shuffled pages) and
can expand the same inputs into the per-head K/V a standard kernel reads
(K = (c W_UK^T | k_pe) [B, H, L, nope + rope], V = c W_UV^T [B, H, L, v]), so the peer
computes the same attention and the two outputs are compared (after W_UV for the latent
one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MLAShape:
    batch: int
    context: int  # KV tokens per sequence (cached + new)
    new_tokens: int  # queries per sequence (decode: 1)

    @classmethod
    def parse(cls, text: str, decode: bool) -> MLAShape:
        """'BxL' (decode: one query; prefill: L new tokens) or 'BxLxN' (extend: N new)."""
        parts = [int(p) for p in text.split("x")]
        if len(parts) == 2:
            b, ctx = parts
            return cls(b, ctx, 1 if decode else ctx)
        b, ctx, n = parts
        if n > ctx:
            raise ValueError(f"shape {text}: more new tokens than context")
        return cls(b, ctx, n)

    def visible_keys(self) -> int:
        """Keys summed over the queries of one sequence (causal)."""
        n, prefix = self.new_tokens, self.context - self.new_tokens
        return n * prefix + n * (n + 1) // 2


@dataclass
class MLAProblem:
    shape: MLAShape
    num_heads: int
    rank: int
    rope: int
    nope: int
    v_dim: int
    q: torch.Tensor  # [B * N, H, rank + rope] absorbed, rotated
    q_nope: torch.Tensor  # [B * N, H, nope]
    rows: torch.Tensor  # [B, L, rank + rope]
    w_uk: torch.Tensor  # [H, nope, rank]
    w_uv: torch.Tensor  # [H, v, rank]

    @property
    def scale(self) -> float:
        return (self.nope + self.rope) ** -0.5

    def latent_bytes(self) -> int:
        """Latent rows read once, q read, latent output written."""
        B, L, N = self.shape.batch, self.shape.context, self.shape.new_tokens
        e = self.rows.element_size()
        return e * (B * L * (self.rank + self.rope)
                    + B * N * self.num_heads * (2 * self.rank + self.rope))

    def latent_flops(self) -> int:
        keys = self.shape.batch * self.shape.visible_keys()
        return 2 * self.num_heads * keys * (2 * self.rank + self.rope)

    def expanded_bytes(self) -> int:
        B, L, N = self.shape.batch, self.shape.context, self.shape.new_tokens
        e, H = self.rows.element_size(), self.num_heads
        qk = self.nope + self.rope
        return e * (B * L * H * (qk + self.v_dim) + B * N * H * (qk + self.v_dim))

    def expanded_flops(self) -> int:
        keys = self.shape.batch * self.shape.visible_keys()
        return 2 * self.num_heads * keys * (self.nope + self.rope + self.v_dim)

    def expand(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q [B, H, N, nope + rope], K [B, H, L, nope + rope], V [B, H, L, v]), one
        sequence at a time (the expanded K/V of 128 heads are 100x the latent)."""
        B, L, N = self.shape.batch, self.shape.context, self.shape.new_tokens
        H, r = self.num_heads, self.rank
        dev, dt = self.rows.device, self.rows.dtype
        k = torch.empty(B, H, L, self.nope + self.rope, device=dev, dtype=dt)
        v = torch.empty(B, H, L, self.v_dim, device=dev, dtype=dt)
        for b in range(B):
            c = self.rows[b, :, :r]
            k[b, :, :, : self.nope] = torch.einsum("lr,hdr->hld", c, self.w_uk)
            k[b, :, :, self.nope :] = self.rows[b, None, :, r:]
            v[b] = torch.einsum("lr,hdr->hld", c, self.w_uv)
        q = torch.cat([self.q_nope, self.q[..., r:]], dim=-1)
        q = q.view(B, N, H, -1).transpose(1, 2).contiguous()
        return q, k, v

    def project_out(self, out_latent: torch.Tensor) -> torch.Tensor:
        """[B * N, H, rank] -> [B, H, N, v] through W_UV (what the model does next)."""
        B, N = self.shape.batch, self.shape.new_tokens
        o = torch.einsum("thr,hdr->thd", out_latent.float(), self.w_uv.float())
        return o.view(B, N, self.num_heads, self.v_dim).transpose(1, 2)


def make_mla_problem(shape: MLAShape, num_heads: int, rank: int, rope: int, nope: int,
                     v_dim: int, device: torch.device, gen: torch.Generator,
                     dtype: torch.dtype = torch.bfloat16) -> MLAProblem:
    def rnd(*size: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=gen, device=device) * std).to(dtype)

    B, L, N = shape.batch, shape.context, shape.new_tokens
    # weights ~ 1/sqrt(fan_in) so expanded keys have unit scale, as in a trained model
    w_uk = rnd(num_heads, nope, rank, std=rank**-0.5)
    w_uv = rnd(num_heads, v_dim, rank, std=rank**-0.5)
    q_nope = rnd(B * N, num_heads, nope)
    q = torch.empty(B * N, num_heads, rank + rope, device=device, dtype=dtype)
    q[..., :rank] = torch.einsum("thd,hdr->thr", q_nope.float(), w_uk.float()).to(dtype)
    q[..., rank:] = rnd(B * N, num_heads, rope)
    rows = rnd(B, L, rank + rope)
    return MLAProblem(shape, num_heads, rank, rope, nope, v_dim, q, q_nope, rows, w_uk, w_uv)


def paged_rows(rows: torch.Tensor, page_size: int,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(cache [pages, page_size, width], block table [B, pages_per_seq] int32): the rows
    of every sequence on shuffled pages; page 0 is scratch."""
    B, L, W = rows.shape
    per_seq = -(-L // page_size)
    num_pages = B * per_seq + 1
    perm = torch.randperm(num_pages - 1, generator=gen, device=gen.device) + 1
    table = perm.to(rows.device).view(B, per_seq).to(torch.int32)
    cache = torch.zeros(num_pages, page_size, W, device=rows.device, dtype=rows.dtype)
    flat = cache.view(-1, W)
    pos = torch.arange(L, device=rows.device)
    for b in range(B):
        slots = table[b, pos // page_size].long() * page_size + pos % page_size
        flat[slots] = rows[b]
    return cache, table
