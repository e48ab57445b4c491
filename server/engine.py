"""EngineCore: schedule -> run -> sample -> update, plus detokenization and stop strings.

`step()` is synchronous and single-threaded; the offline `LLM` calls it directly and the
server runs it on its own thread (server/async_engine.py). Requests arrive through
`add_request`/`abort`, which may be called from any thread: they are queued and applied
at the start of the next step, so the scheduler is only ever touched by the step thread.
"""

from __future__ import annotations

import logging
import queue
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import torch

from attention.base import AttentionConfig
from attention.registry import build_attention_backend
from attention.triton.compile_watch import KernelInstanceWatch
from attention.variants import parse_variant
from kvcache.allocator import PageAllocator
from kvcache.layout import KVLayout
from kvcache.pool import KVPool, KVPoolConfig, pages_for_memory_fraction, pages_for_tokens
from kvcache.radix import RadixPrefixCache
from model.loader import LoadedModel, load_model, load_tokenizer
from model.runner import ModelRunner, StepInput
from model.sampler import make_generator
from model.tokenizer import IncrementalDetokenizer
from scheduler.plan import ScheduledSeq, StepPlan
from scheduler.request import FinishReason, Request, SamplingParams
from scheduler.scheduler import Scheduler, SchedulerConfig
from server.config import EngineConfig
from server.outputs import EngineObserver, NullObserver, RequestOutput, TokenLogprob

logger = logging.getLogger(__name__)

OutputSink = Callable[[RequestOutput], None]
DEFAULT_CPU_KV_TOKENS = 16384
MAX_DEFAULT_MODEL_LEN = 8192


def default_model_name(spec: str | None) -> str:
    """The name the API reports: the embedded model's, or the spec's last path component."""
    if spec is None or spec.lower() in ("smollm2", "smollm2-135m-instruct"):
        return "SmolLM2-135M-Instruct"
    return spec.rstrip("/").split("/")[-1].removeprefix("synthetic:")


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that could begin a stop string: that much text is
    held back from the stream until the stop string completes or cannot."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class RequestRejected(ValueError):
    """A request that can never be served (too long, bad parameters): a 400 for the client."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class _Tracked:
    request: Request
    sink: OutputSink | None
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    text: str = ""
    emitted_text_len: int = 0
    emitted_tokens: int = 0
    wall_offset: float = 0.0  # time.time() - time.monotonic() at arrival


class EngineCore:
    def __init__(
        self, config: EngineConfig, observer: EngineObserver | None = None,
        loaded: LoadedModel | None = None,
    ) -> None:
        self.config = config
        self.device = config.resolved_device()
        self.dtype = config.resolved_dtype()
        self.observer: EngineObserver = observer or NullObserver()
        self.loaded = loaded or load_model(config.model, self.dtype, self.device, seed=config.seed,
                                           with_tokenizer=config.tokenizer is None)
        if config.tokenizer is not None:
            self.loaded.tokenizer = load_tokenizer(config.tokenizer)
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        mc = self.loaded.config
        self.model_name = config.served_model_name or default_model_name(config.model)
        self.max_model_len = min(
            config.max_model_len or min(mc.max_position_embeddings, MAX_DEFAULT_MODEL_LEN),
            mc.max_position_embeddings,
        )
        self.layout = KVLayout.create(
            config.kv_layout, config.page_size, mc.num_kv_heads, mc.head_dim, str(self.dtype)
        )
        num_pages = self._num_pages(mc.num_layers)
        self.pool = KVPool(KVPoolConfig(self.layout, mc.num_layers, num_pages, self.dtype, self.device))
        attn_config = AttentionConfig(
            num_q_heads=mc.num_heads, num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim,
            scale=mc.head_dim**-0.5, variant=parse_variant(config.attention_variant),
        )
        self.backend_name = config.resolved_backend()
        self.backend = build_attention_backend(
            attn_config, self.pool, self.backend_name, config.prefill_backend, config.decode_backend
        )
        self.allocator = PageAllocator(num_pages)
        self.prefix_cache = (
            RadixPrefixCache(self.allocator, self.layout.page_size) if config.enable_prefix_cache else None
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                page_size=self.layout.page_size,
                enable_prefix_cache=config.enable_prefix_cache,
                schedule_policy=config.schedule_policy,
            ),
            self.allocator,
            self.prefix_cache,
        )
        self.runner = ModelRunner(self.model, self.backend, self.device, self.layout.page_size)
        if self.device.type == "cuda":
            try:
                self.runner.warm_up()
            except Exception:  # costs the first requests some compile time, nothing more
                logger.warning("warm-up step failed; kernels build on first use", exc_info=True)
        self._setup_cuda_graphs(config)
        self._tracked: dict[str, _Tracked] = {}
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self.step_count = 0
        self.prefill_tokens_computed = 0  # new tokens of non-decode sequences, all steps
        # Kernels built during start-up are expected (warm-up, graph capture); any built
        # later stalls a step, so it is logged and counted in /metrics.
        watch = KernelInstanceWatch()
        self.kernel_watch: KernelInstanceWatch | None = watch
        self.serving_compiles = 0
        logger.info(
            "engine ready: model=%s backend=%s layout=%s page_size=%d dtype=%s device=%s "
            "max_model_len=%d kv_tokens=%d kernel_instances=%d",
            self.model_name, self.backend.name, self.layout.name, self.layout.page_size,
            self.dtype, self.device, self.max_model_len, self.pool.num_tokens,
            watch.total(),
        )

    # ---- set-up -------------------------------------------------------------------------
    def _num_pages(self, num_layers: int) -> int:
        if self.config.kv_cache_tokens is not None:
            return pages_for_tokens(self.layout, self.config.kv_cache_tokens)
        if self.device.type == "cuda":
            return pages_for_memory_fraction(
                self.layout, num_layers, self.dtype, self.device, self.config.gpu_memory_utilization
            )
        return pages_for_tokens(self.layout, DEFAULT_CPU_KV_TOKENS)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset(self.tokenizer.eos_token_ids)

    # ---- requests (any thread) -------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestRejected for a request that can never run."""
        try:
            params.validate()
        except ValueError as e:
            raise RequestRejected(str(e)) from None
        n = len(prompt_token_ids)
        if n == 0:
            raise RequestRejected("the prompt is empty", "prompt")
        vocab = self.loaded.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise RequestRejected(f"prompt token ids must be in [0, {vocab})", "prompt")
        if n + params.max_tokens > self.max_model_len:
            raise RequestRejected(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} "
                "for the completion). Please reduce the length of the prompt or max_tokens.",
                "max_tokens",
            )
        if n + params.max_tokens > self.pool.num_tokens:
            raise RequestRejected(
                f"the request needs {n + params.max_tokens} tokens of KV cache but the whole pool "
                f"holds {self.pool.num_tokens}", "max_tokens",
            )

    def _check_kernel_builds(self, step_s: float) -> None:
        """Log and count the kernel instances the last step had to build. A diagnostic: if
        reading Triton's caches ever fails (its internals change), the watch turns off
        instead of failing steps."""
        if self.kernel_watch is None:
            return
        try:
            grown = self.kernel_watch.new_instances()
        except Exception:
            logger.warning("cannot read Triton's kernel caches; kernel builds are no longer "
                           "counted", exc_info=True)
            self.kernel_watch = None
            return
        if not grown:
            return
        count = sum(grown.values())
        self.serving_compiles += count
        logger.warning("a %.2f s step built %d Triton kernel instance(s) not covered by the "
                       "start-up warm-up: %s", step_s, count,
                       ", ".join(f"{name} x{n}" for name, n in grown.items()))
        self.observer.on_kernel_compile(count, step_s)

    def _setup_cuda_graphs(self, config: EngineConfig) -> None:
        if not config.cuda_graphs or self.device.type != "cuda":
            return
        if not self.backend.capabilities.cuda_graphs:
            logger.info("CUDA graphs off: attention backend %s cannot be captured",
                        self.backend.name)
            return
        max_batch = min(config.cuda_graph_max_batch or min(config.max_num_seqs, 256),
                        config.max_num_seqs)
        try:
            self.runner.enable_cuda_graphs(max_batch, self.max_model_len)
        except Exception:  # serving eagerly beats not serving
            logger.exception("CUDA graph capture failed; decode steps run eagerly")
            self.runner.graphs = None

    def add_request(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
        sink: OutputSink | None = None, arrival_time: float | None = None,
    ) -> str:
        self.validate(prompt_token_ids, params)
        request_id = request_id or uuid.uuid4().hex
        req = Request(
            request_id=request_id, prompt_token_ids=list(prompt_token_ids), sampling=params,
            eos_token_ids=self.eos_token_ids,
            arrival_time=arrival_time if arrival_time is not None else time.monotonic(),
        )
        self._inbox.put(("add", (req, sink)))
        return request_id

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                req, sink = item  # type: ignore[misc]
                self._admit(req, sink)
            elif kind == "abort":
                self._abort_now(str(item))

    def _admit(self, req: Request, sink: OutputSink | None) -> None:
        gen = make_generator(req.sampling.seed, self.device) if req.sampling.seed is not None else None
        tracked = _Tracked(
            request=req, sink=sink, detok=IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids),
            generator=gen, wall_offset=time.time() - time.monotonic(),
        )
        try:
            self.scheduler.add_request(req)
        except ValueError as e:
            self._emit_failure(tracked, str(e))
            return
        self._tracked[req.request_id] = tracked

    def _abort_now(self, request_id: str) -> None:
        tracked = self._tracked.pop(request_id, None)
        if tracked is None:
            return
        self.scheduler.abort_request(request_id)
        tracked.request.finished_time = time.monotonic()
        self.observer.on_request_finished(tracked.request, tracked.request.finished_time)
        self._emit(tracked, [], [], finished=True, reason=FinishReason.ABORT.value)

    # ---- the step ---------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return bool(self._tracked) or not self._inbox.empty()

    def step(self) -> list[RequestOutput]:
        """One engine iteration. Returns the outputs it produced (also sent to sinks)."""
        self._drain_inbox()
        outputs: list[RequestOutput] = []
        plan = self.scheduler.schedule()
        if plan.preempted:
            self.observer.on_preemption(len(plan.preempted))
        if plan.is_empty:
            self._report_gauges()
            return outputs
        self.step_count += 1
        self.prefill_tokens_computed += sum(s.num_tokens for s in plan.seqs[plan.num_decodes :])
        t0 = time.perf_counter()
        try:
            step_in = self._step_input(plan)
            result = self.runner.execute(step_in)
        except Exception as e:  # an internal error fails this step's requests, not the engine
            logger.exception("engine step failed; failing the requests in it")
            for seq in plan.seqs:
                rid = seq.request.request_id
                tracked = self._tracked.pop(rid, None)
                self.scheduler.abort_request(rid)
                if tracked is not None:
                    outputs.append(self._emit_failure(tracked, f"internal error: {e}"))
            self._check_kernel_builds(time.perf_counter() - t0)
            return outputs
        # which sequences were sampled must be read before update() advances the requests
        sampled_seqs = [seq for seq in plan.seqs if seq.needs_sample]
        finished = self.scheduler.update(plan, result.token_ids)
        now = time.monotonic()
        step_s = time.perf_counter() - t0
        self.observer.on_step(result.phase, plan.num_tokens, step_s, result.attention_s)
        self._check_kernel_builds(step_s)
        outputs.extend(
            self._process_tokens(sampled_seqs, result.token_ids, result.logprobs, finished, now)
        )
        self._report_gauges()
        return outputs

    def _step_input(self, plan: StepPlan) -> StepInput:
        token_ids: list[int] = []
        q_lens, prefix_lens, tables, sample_seqs, sampling, gens = [], [], [], [], [], []
        for i, seq in enumerate(plan.seqs):
            req = seq.request
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
            token_ids.extend(req.all_token_ids[seq.start : seq.start + seq.num_tokens])
            q_lens.append(seq.num_tokens)
            prefix_lens.append(seq.start)
            tables.append(req.pages)
            if seq.needs_sample:
                sample_seqs.append(i)
                sampling.append(req.sampling)
                gens.append(self._tracked[req.request_id].generator)
        every = max(1, self.config.attention_timing_every)
        return StepInput(
            token_ids=token_ids, q_lens=q_lens, prefix_lens=prefix_lens, page_tables=tables,
            num_decodes=plan.num_decodes, sample_seqs=sample_seqs, sampling=sampling,
            generators=gens, time_attention=self.step_count % every == 0,
        )

    def _process_tokens(
        self, sampled_seqs: list[ScheduledSeq], sampled: list[int],
        logprobs: list[tuple[float, list[tuple[int, float]]] | None],
        finished: list[Request], now: float,
    ) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        finished_ids = {r.request_id for r in finished}
        for k, seq in enumerate(sampled_seqs):
            token, lp = sampled[k], (logprobs[k] if k < len(logprobs) else None)
            req = seq.request
            tracked = self._tracked.get(req.request_id)
            if tracked is None:
                continue
            self.observer.on_tokens(req, 1, now)
            stop_hit = self._append_text(tracked, token)
            done = req.request_id in finished_ids
            if stop_hit and not done:
                self.scheduler.finish_request(req.request_id, FinishReason.STOP)
                done = True
            new_lps = [TokenLogprob(token, lp[0], lp[1])] if lp is not None else []
            if done:
                reason = FinishReason.STOP if stop_hit else (req.finish_reason or FinishReason.STOP)
                req.finished_time = now
                self.observer.on_request_finished(req, now)
                del self._tracked[req.request_id]
                outputs.append(self._emit(tracked, [token], new_lps, True, reason.value))
            else:
                outputs.append(self._emit(tracked, [token], new_lps, False, None))
        return outputs

    def _append_text(self, tracked: _Tracked, token: int) -> bool:
        """Detokenize one token; True when a stop string completed (text cut before it)."""
        req = tracked.request
        is_eos = token in req.eos_token_ids and not req.sampling.ignore_eos
        if is_eos or token in req.sampling.stop_token_ids:
            return False  # stop tokens are not part of the text
        prev_len = len(tracked.text)
        tracked.text += tracked.detok.add(token)
        for stop in req.sampling.stop:
            pos = tracked.text.find(stop, max(0, prev_len - len(stop) + 1))
            if pos != -1:
                tracked.text = tracked.text[:pos]
                return True
        return False

    def _emit(
        self, tracked: _Tracked, tokens: list[int], lps: list[TokenLogprob], finished: bool,
        reason: str | None, error: str | None = None,
    ) -> RequestOutput:
        req = tracked.request
        end = len(tracked.text) if finished else len(tracked.text) - _stop_prefix_len(
            tracked.text, req.sampling.stop)
        end = max(end, tracked.emitted_text_len)
        new_text = tracked.text[tracked.emitted_text_len : end]
        if finished and reason != "stop":
            new_text += tracked.detok.flush()
        tracked.emitted_text_len = end
        tracked.emitted_tokens += len(tokens)
        off = tracked.wall_offset
        out = RequestOutput(
            request_id=req.request_id, new_token_ids=tokens, new_text=new_text, finished=finished,
            finish_reason=reason, num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=len(req.output_token_ids), num_cached_tokens=req.num_cached_tokens,
            new_logprobs=lps, arrival_time=req.arrival_time + off,
            first_token_time=req.first_token_time + off if req.first_token_time else None,
            finish_time=time.monotonic() + off if finished else None, error=error,
        )
        if tracked.sink is not None:
            tracked.sink(out)
        return out

    def _emit_failure(self, tracked: _Tracked, message: str) -> RequestOutput:
        self.observer.on_request_failed("error")
        return self._emit(tracked, [], [], True, FinishReason.ABORT.value, error=message)

    def _report_gauges(self) -> None:
        self.observer.on_gauges(
            self.scheduler.num_running, self.scheduler.num_waiting, self.scheduler.stats
        )

    # ---- introspection ----------------------------------------------------------------------
    def stats(self) -> dict[str, object]:
        s = self.scheduler.stats
        d = dict(vars(s)) if not isinstance(s, dict) else dict(s)
        d.update(num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
                 num_tracked=len(self._tracked))
        return d
