"""Helpers for comparing our model with Hugging Face transformers.

`hf_model_from_gguf` builds the transformers model from a GGUF file through transformers' own
GGUF reader (its own dequantization and q/k un-permutation), without the `accelerate`
package that `from_pretrained(..., gguf_file=...)` insists on.
"""

from __future__ import annotations

from pathlib import Path

import torch

from attention.backends.lightning import HybridStateBackend, LightningBackend
from attention.batch import ForwardBatch
from attention.registry import create_backend
from kvcache.cache_spec import split_layer_specs
from kvcache.state_pool import StatePool
from model.families import attention_config_for


def hf_model_from_gguf(path: Path) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    loaded = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    result = model.load_state_dict(loaded["tensors"], strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert set(result.missing_keys) <= {"lm_head.weight"}, result.missing_keys
    model.tie_weights()
    return model.eval()


@torch.no_grad()
def hf_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()


class PagedRunner:
    """Runs our model step by step over a fresh cache pool (the one its layers' cache spec
    asks for: K/V or MLA latent rows, plus state slots for linear layers) with the reference
    backends. Sequence s of a hybrid model keeps its state in slot s + 1."""

    def __init__(self, model: torch.nn.Module, layout: str = "nhd", page_size: int = 16,
                 capacity_tokens: int = 160, max_seqs: int = 8) -> None:
        cfg = model.config
        self.model = model
        self.page_size = 1 if layout == "token" else page_size
        caches = split_layer_specs(cfg.layer_cache_specs())
        spec = caches.paged
        cache_layout = spec.make_layout(layout, self.page_size, str(model.dtype))
        self.pool = spec.build_pool(cache_layout, len(caches.paged_layers),
                                    capacity_tokens // self.page_size + 8, model.dtype,
                                    model.device)
        self.backend = create_backend("reference", attention_config_for(cfg), self.pool)
        self.state_pool: StatePool | None = None
        if caches.state is not None:
            self.state_pool = StatePool(caches.state, len(caches.state_layers), max_seqs + 1,
                                        model.device)
            linear = LightningBackend("reference", self.state_pool)
            self.backend = HybridStateBackend(self.backend, linear, caches.paged_layers,
                                              caches.state_layers)
        self.next_page = 1  # page 0 is the scratch page
        self.pages: dict[int, list[int]] = {}
        self.cached: dict[int, int] = {}

    def _ensure_pages(self, seq: int, length: int) -> list[int]:
        pages = self.pages.setdefault(seq, [])
        while len(pages) * self.page_size < length:
            if self.next_page >= self.pool.num_pages:
                raise RuntimeError("test pool too small")
            pages.append(self.next_page)
            self.next_page += 1
        return pages

    @torch.no_grad()
    def step(self, chunks: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Feed each sequence's next tokens (decodes, i.e. 1-token chunks, first);
        return each sequence's logits [len(chunk), V]."""
        order = sorted(chunks, key=lambda s: len(chunks[s]) != 1)
        q_lens = [len(chunks[s]) for s in order]
        prefix = [self.cached.get(s, 0) for s in order]
        tables = [
            self._ensure_pages(s, p + n) for s, p, n in zip(order, prefix, q_lens, strict=True)
        ]
        slots = [s + 1 for s in order] if self.state_pool is not None else None
        batch = ForwardBatch.build(q_lens, prefix, tables, self.page_size, self.model.device,
                                   state_slots=slots)
        self.backend.plan(batch)
        ids = torch.tensor([t for s in order for t in chunks[s]], device=self.model.device)
        logits = self.model.compute_logits(self.model(ids, batch.positions, self.backend))
        out = {}
        for i, s in enumerate(order):
            a, b = batch.qo_indptr_host[i], batch.qo_indptr_host[i + 1]
            out[s] = logits[a:b]
            self.cached[s] = prefix[i] + q_lens[i]
        return out
