"""EngineCore: each step schedules, runs the model, and turns the sampled tokens into outputs.

`step()` is synchronous and single-threaded; the offline `LLM` calls it directly and the
server runs it on its own thread (server/engine/async_engine.py). Requests arrive through
`add_request`/`abort`, which may be called from any thread: a request is validated at once
(scheduler/validation.py, the one check), then queued and applied at the start of the next
step, so the scheduler's state is only ever touched by the step thread. Detokenization,
stop strings and building outputs live in server/engine/output_processor.py.

Overlap scheduling (`EngineConfig.overlap_schedule`, on by default): a step is launched on
the device and its results are read only during the next `step()`, after that step was
launched, so the host's work (scheduling, input staging, detokenization, streaming) runs
while the device computes. The scheduler applies a launched step at once with a placeholder
for each sampled token (`Scheduler.advance`), the next step reads those tokens on the
device, and `Scheduler.resolve` writes their values in when they arrive. A request that the
late token ends (EOS, stop id, stop string) has already been scheduled once more: that step's
work for it is dropped, never its text. A sampled request with penalties needs its tokens'
values to build the next step, so the step after it waits for them first.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import time
import uuid
from collections.abc import Callable

from attention.backends.lightning import HybridStateBackend, LightningBackend
from attention.registry import build_attention_backend
from attention.triton.compile_watch import KernelInstanceWatch
from attention.variants import parse_variant
from kvcache.allocator import PageAllocator
from kvcache.cache_spec import pages_within_bytes, pages_within_memory, split_layer_specs
from kvcache.kv_dtype import KVCacheDtype
from kvcache.pool import pages_for_tokens
from kvcache.radix import RadixPrefixCache
from kvcache.state_pool import StatePool
from kvcache.state_slots import StateSlotAllocator
from model.decode_gemm import check_decode_gemm, use_decode_gemm
from model.families import attention_config_for
from model.loader import LoadedModel, load_model, load_tokenizer
from model.runner import ModelRunner, StepOutput
from model.sampler import make_generator
from scheduler.plan import ScheduledSeq, StepPlan
from scheduler.request import FinishReason, Request, SamplingParams
from scheduler.scheduler import Scheduler, SchedulerConfig
from server.engine.choices import ChoiceGroup
from server.engine.config import EngineConfig
from server.engine.output_processor import OutputProcessor, OutputSink
from server.engine.outputs import EngineObserver, NullObserver, RequestOutput
from server.engine.stats_logger import StatsLogger
from server.engine.step_input import InFlightStep, build_step_input
from server.engine.tensor_parallel import TensorParallel

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(
        self, config: EngineConfig, observer: EngineObserver | None = None,
        loaded: LoadedModel | None = None,
    ) -> None:
        self.config = config
        self.device = config.resolved_device()
        self.dtype = config.resolved_dtype()
        self.observer: EngineObserver = observer or NullObserver()
        check_decode_gemm(config.decode_gemm, self.device, self.dtype)  # before any rank starts
        # --tensor-parallel-size > 1: this process is rank 0 of a group it starts here
        self.tp = TensorParallel(config) if config.tensor_parallel_size > 1 else None
        if self.tp is not None and loaded is not None:
            raise ValueError("a tensor-parallel engine loads its own shards (no `loaded`)")
        self.loaded = loaded or load_model(config.model, self.dtype, self.device, seed=config.seed,
                                           with_tokenizer=config.tokenizer is None,
                                           tp=self.tp.group if self.tp is not None else None)
        if config.tokenizer is not None:
            self.loaded.tokenizer = load_tokenizer(config.tokenizer)
        self.model = self.loaded.model
        use_decode_gemm(self.model, config.decode_gemm)
        self.tokenizer = self.loaded.tokenizer
        template = config.resolved_chat_template()
        if template is not None:
            self.tokenizer = self.tokenizer.with_chat_template(template)
        mc = self.loaded.config
        self.model_name = config.resolved_model_name()
        self.max_model_len = config.resolved_max_model_len(mc.max_position_embeddings)
        # the layers' cache spec decides the pool (K/V heads or MLA latent rows), the KV
        # cache dtype how its rows are stored
        self.kv_dtype = config.resolved_kv_cache_dtype()
        # the model's own config: with tensor parallelism, this rank's heads
        caches = split_layer_specs(self.model.config.layer_cache_specs())
        self.cache_spec = caches.paged
        self.layout = self.cache_spec.make_layout(config.kv_layout, config.page_size,
                                                  self.kv_dtype.storage_name)
        # hybrid models: the linear layers' state slots, allocated before the KV pages are
        # sized from what memory is left
        self.state_pool: StatePool | None = None
        self.state_slots: StateSlotAllocator | None = None
        if caches.state is not None:
            self.state_pool = StatePool(caches.state, len(caches.state_layers),
                                        config.resolved_state_slots() + 1, self.device)
            self.state_slots = StateSlotAllocator(self.state_pool.num_slots)
        num_paged = len(caches.paged_layers)
        num_pages = self._num_pages(num_paged)
        if self.tp is not None:  # every rank holds the same pages: the fewest any can
            num_pages = self.tp.agree_on_pages(num_pages)
        self.pool = self.cache_spec.build_pool(self.layout, num_paged, num_pages, self.dtype,
                                               self.device, self.kv_dtype)
        attn_config = attention_config_for(self.model.config,
                                           parse_variant(config.attention_variant))
        self.backend = build_attention_backend(
            attn_config, self.pool, config.resolved_backend(self.cache_spec.kind), config.prefill_backend,
            config.decode_backend,
        )
        snapshot_every = config.state_snapshot_interval if config.enable_prefix_cache else 0
        if self.state_pool is not None:
            linear = LightningBackend(config.resolved_linear_backend(), self.state_pool,
                                      snapshot_every, self.dtype)
            self.backend = HybridStateBackend(self.backend, linear, caches.paged_layers,
                                              caches.state_layers)
        self.allocator = PageAllocator(num_pages)
        self.prefix_cache = (
            RadixPrefixCache(self.allocator, self.layout.page_size, self.state_slots)
            if config.enable_prefix_cache else None
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                page_size=self.layout.page_size,
                enable_prefix_cache=config.enable_prefix_cache,
                schedule_policy=config.schedule_policy,
                vocab_size=mc.vocab_size,
                max_prefill_tokens_with_decode=config.max_prefill_tokens_with_decode,
                state_snapshot_interval=snapshot_every if self.state_slots is not None else 0,
            ),
            self.allocator,
            self.prefix_cache,
            self.state_slots,
        )
        if self.tp is None:
            self.runner = ModelRunner(self.model, self.backend, self.device, self.layout.page_size)
        else:  # sends each step to the other ranks before running it
            self.runner = self.tp.make_runner(self.model, self.backend, self.device,
                                              self.layout.page_size)
        self.runner.state_pool = self.state_pool
        self.runner.sampler.generator = make_generator(config.seed, self.device)  # --seed
        if self.device.type == "cuda":
            try:
                self.runner.warm_up()
            except Exception:  # costs the first requests some compile time, nothing more
                logger.warning("warm-up step failed; kernels build on first use", exc_info=True)
        self._setup_cuda_graphs(config)
        self.outputs = OutputProcessor(self.tokenizer)
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self.step_count = 0
        self._inflight: InFlightStep | None = None  # overlap scheduling: the step on the device
        self.prefill_tokens_computed = 0  # new tokens of non-decode sequences, all steps
        self.generated_tokens = 0  # sampled tokens, all steps
        self.stats_logger = StatsLogger() if config.log_stats else None
        # Kernels built during start-up are expected (warm-up, graph capture); any built
        # later stalls a step, so it is logged and counted in /metrics.
        watch = KernelInstanceWatch()
        self.kernel_watch: KernelInstanceWatch | None = watch
        self.serving_compiles = 0
        logger.info(
            "engine ready: model=%s backend=%s layout=%s page_size=%d dtype=%s device=%s "
            "max_model_len=%d kv_cache_dtype=%s kv_cache_scale=%s kv_tokens=%d "
            "kernel_instances=%d",
            self.model_name, self.backend.name, self.layout.name, self.layout.page_size,
            self.dtype, self.device, self.max_model_len, self.kv_dtype.name,
            self.kv_dtype.scale_mode or "none", self.pool.num_tokens, watch.total(),
        )

    # ---- set-up -------------------------------------------------------------------------
    def _num_pages(self, num_layers: int) -> int:
        size = self.config.kv_pool_size()
        if size.tokens is not None:
            return pages_for_tokens(self.layout, size.tokens)

        def page_bytes(kv_dtype: KVCacheDtype) -> int:
            return (self.cache_spec.stored_bytes_per_token(kv_dtype) * num_layers
                    * self.layout.page_size)

        if size.gpu_fraction is not None:
            return pages_within_memory(page_bytes(self.kv_dtype), self.device, size.gpu_fraction)
        memory = size.memory_bytes
        if size.model_dtype_tokens is not None:  # the pages these tokens take unquantized
            memory = pages_for_tokens(self.layout, size.model_dtype_tokens) \
                * page_bytes(KVCacheDtype(self.dtype))
        assert memory is not None
        return pages_within_bytes(page_bytes(self.kv_dtype), memory)

    def _setup_cuda_graphs(self, config: EngineConfig) -> None:
        if not config.cuda_graphs or self.device.type != "cuda":
            return
        if not self.backend.capabilities.cuda_graphs:
            logger.info("CUDA graphs off: attention backend %s cannot be captured",
                        self.backend.name)
            return
        try:
            self.runner.enable_cuda_graphs(config.resolved_cuda_graph_max_batch(), self.max_model_len)
        except Exception:  # serving eagerly beats not serving
            logger.exception("CUDA graph capture failed; decode steps run eagerly")
            self.runner.graphs = None

    def set_failure_handler(self, handler: Callable[[str], None]) -> None:
        """`handler(reason)`, from another thread, when the engine can no longer run steps
        (a tensor-parallel rank died): the caller stops using it."""
        if self.tp is not None:
            self.tp.set_failure_handler(handler)

    def shutdown(self) -> None:
        """Release what the engine started outside this process (tensor-parallel ranks)."""
        if self.tp is not None:
            self.tp.shutdown()

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset(self.tokenizer.eos_token_ids)

    # ---- requests (any thread) -------------------------------------------------------------
    def add_request(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
        sink: OutputSink | None = None,
    ) -> str:
        """Validate and queue one request; returns its id. Raises RequestRejected."""
        request_id = request_id or uuid.uuid4().hex
        self.add_requests([prompt_token_ids], params, [request_id], [sink])
        return request_id

    def add_requests(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
        request_ids: list[str], sinks: list[OutputSink | None],
    ) -> None:
        """Validate every prompt (Scheduler.validate, the one check), then queue them all: one
        that cannot run (RequestRejected) stops the others from being queued. `params` is
        one for all, or one per prompt (the samples of server/engine/choices.py)."""
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        for ids, p in zip(prompts, per_prompt, strict=True):
            self.scheduler.validate(ids, p)
        for ids, p, rid, sink in zip(prompts, per_prompt, request_ids, sinks, strict=True):
            req = Request(request_id=rid, prompt_token_ids=list(ids), sampling=p,
                          eos_token_ids=self.eos_token_ids)
            self._inbox.put(("add", (req, sink)))

    def add_choice_group(
        self, prompts: list[list[int]], params: SamplingParams, request_id: str | None = None,
        sink_for: Callable[[str], OutputSink | None] | None = None,
    ) -> ChoiceGroup:
        """Queue the engine requests of `params.n` samples (or `best_of` candidates) of every
        prompt; the group's `add` turns their outputs into choices. Raises RequestRejected
        before anything is queued."""
        for ids in prompts:  # n and best_of are checked here, before the fan-out
            self.scheduler.validate(ids, params)
        group = ChoiceGroup(request_id or uuid.uuid4().hex, len(prompts), params)
        sinks = [sink_for(rid) if sink_for else None for rid in group.request_ids]
        self.add_requests(group.expand_prompts(prompts), group.engine_params(),
                          group.request_ids, sinks)
        return group

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def reset_prefix_cache(self) -> int:
        """Drop every cached page no running request uses; returns how many. Call it on the
        step thread (the offline LLM's); other threads use `request_reset_prefix_cache`."""
        if self.prefix_cache is None:
            return 0
        dropped = self.prefix_cache.clear()
        logger.info("prefix cache reset: %d pages dropped, %d still used by running requests",
                    dropped, self.prefix_cache.num_cached_pages)
        return dropped

    def request_reset_prefix_cache(self) -> concurrent.futures.Future[int]:
        """`reset_prefix_cache` from any thread: applied at the start of the next step (the
        caller wakes the step loop); the future holds the number of pages dropped."""
        done: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._inbox.put(("reset_prefix_cache", done))
        return done

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
            elif kind == "reset_prefix_cache":
                item.set_result(self.reset_prefix_cache())  # type: ignore[attr-defined]

    def _admit(self, req: Request, sink: OutputSink | None) -> None:
        try:
            self.scheduler.add_request(req)
        except ValueError as e:  # its request id is in use
            self.outputs.reject(req, sink, str(e), self.observer)
            return
        gen = make_generator(req.sampling.seed, self.device) if req.sampling.seed is not None else None
        self.outputs.add(req, sink, gen)

    def _abort_now(self, request_id: str) -> None:
        if request_id not in self.outputs:
            return
        self.scheduler.abort_request(request_id)
        self.outputs.abort(request_id, self.observer)

    # ---- the step ---------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return bool(self.outputs) or not self._inbox.empty() or self._inflight is not None

    def step(self) -> list[RequestOutput]:
        """One engine iteration. Returns the outputs it produced (also sent to sinks): with
        overlap scheduling, those of the step launched by the previous call."""
        if self.config.overlap_schedule:
            return self._step_overlapped()
        return self._step_sequential()

    def _step_overlapped(self) -> list[RequestOutput]:
        self._drain_inbox()
        outputs: list[RequestOutput] = []
        if self._inflight is not None and self._inflight.values_needed_next:
            outputs += self._complete_inflight()
        plan = self.scheduler.schedule()
        if plan.preempted:
            self.observer.on_preemption(len(plan.preempted))
        if plan.is_empty:
            outputs += self._complete_inflight()
            self._report_gauges()
            return outputs
        try:
            launched = self._launch(plan)
        except Exception as e:  # an internal error fails this step's requests, not the engine
            logger.exception("engine step failed; failing the requests in it")
            outputs += self._complete_inflight()
            return outputs + self._fail_step(plan, f"internal error: {e}")
        outputs += self._complete_inflight()  # the previous step, while this one runs
        launched.tokens = self.scheduler.advance(plan)
        self._inflight = launched
        self._report_gauges()
        return outputs

    def _launch(self, plan: StepPlan) -> InFlightStep:
        self.step_count += 1
        self.prefill_tokens_computed += sum(s.num_tokens for s in plan.seqs[plan.num_decodes :])
        previous = self._inflight.previous_samples() if self._inflight is not None else None
        sampled = [seq for seq in plan.seqs if seq.needs_sample]
        pending = self.runner.launch(build_step_input(plan, self.outputs.generator, previous))
        penalties = any(seq.request.sampling.has_penalties for seq in sampled)
        return InFlightStep(plan, pending, sampled, penalties)

    def _complete_inflight(self) -> list[RequestOutput]:
        """Wait for the step in flight and turn its tokens into outputs."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return []
        plan = inflight.plan
        try:
            result = inflight.pending.result()
        except Exception as e:
            logger.exception("engine step failed; failing the requests in it")
            return self._fail_step(plan, f"internal error: {e}")
        for i, rows in result.prompt_logprobs.items():
            seq = plan.seqs[i]
            self.outputs.add_prompt_logprobs(seq.request.request_id, seq.start + 1, rows)
        finished = self.scheduler.resolve(inflight.tokens, result.token_ids)
        # Its wall time overlaps the neighbours' steps: its device time is the step's time.
        return self._emit_step(plan, inflight.sampled_seqs, result, finished, result.device_s)

    def _step_sequential(self) -> list[RequestOutput]:
        """The step without overlap (--no-overlap-schedule): launch, wait, apply."""
        done = self._complete_inflight()  # one left by the overlapped schedule, if switched
        self._drain_inbox()
        plan = self.scheduler.schedule()
        if plan.preempted:
            self.observer.on_preemption(len(plan.preempted))
        if plan.is_empty:
            self._report_gauges()
            return done
        self.step_count += 1
        self.prefill_tokens_computed += sum(s.num_tokens for s in plan.seqs[plan.num_decodes :])
        t0 = time.perf_counter()
        try:
            result = self.runner.execute(build_step_input(plan, self.outputs.generator))
        except Exception as e:  # an internal error fails this step's requests, not the engine
            logger.exception("engine step failed; failing the requests in it")
            outputs = self._fail_step(plan, f"internal error: {e}")
            self._check_kernel_builds(time.perf_counter() - t0)
            return done + outputs
        outputs = self._process_result(plan, result, t0)
        self._report_gauges()
        return done + outputs

    def _process_result(self, plan: StepPlan, result: StepOutput, t0: float) -> list[RequestOutput]:
        # which sequences were sampled must be read before update() advances the requests
        sampled_seqs = [seq for seq in plan.seqs if seq.needs_sample]
        for i, rows in result.prompt_logprobs.items():
            seq = plan.seqs[i]
            self.outputs.add_prompt_logprobs(seq.request.request_id, seq.start + 1, rows)
        finished = self.scheduler.update(plan, result.token_ids)
        return self._emit_step(plan, sampled_seqs, result, finished, time.perf_counter() - t0)

    def _emit_step(self, plan: StepPlan, sampled_seqs: list[ScheduledSeq], result: StepOutput,
                   finished: list[Request], step_s: float) -> list[RequestOutput]:
        """A step's metrics and outputs; stop strings end their requests in the scheduler."""
        now = time.monotonic()
        self.observer.on_step(result.phase, plan.num_tokens, step_s, result.attention_s)
        if result.attention_by_kind:
            self.observer.on_attention_kinds(result.phase, result.attention_by_kind)
        self._check_kernel_builds(step_s)
        outputs, stopped = self.outputs.process(
            sampled_seqs, result.token_ids, result.logprobs, finished, now, self.observer
        )
        for request_id in stopped:
            self.scheduler.finish_request(request_id, FinishReason.STOP)
        self.generated_tokens += len(result.token_ids)
        if self.stats_logger is not None:
            self.stats_logger.on_step(self.prefill_tokens_computed, self.generated_tokens,
                                      self.scheduler.stats)
        return outputs

    def _fail_step(self, plan: StepPlan, message: str) -> list[RequestOutput]:
        outputs = []
        for seq in plan.seqs:
            rid = seq.request.request_id
            self.scheduler.abort_request(rid)
            out = self.outputs.fail(rid, message, self.observer)
            if out is not None:
                outputs.append(out)
        return outputs

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

    def _report_gauges(self) -> None:
        self.observer.on_gauges(
            self.scheduler.num_running, self.scheduler.num_waiting, self.scheduler.stats
        )

    # ---- introspection ----------------------------------------------------------------------
    def stats_due_in(self) -> float | None:
        """Seconds until the stats line of the current interval is due (None: none pending);
        an idle engine loop wakes then and calls `flush_stats`."""
        return self.stats_logger.due_in() if self.stats_logger is not None else None

    def flush_stats(self) -> None:
        if self.stats_logger is not None:
            self.stats_logger.flush_if_due()

    def effective_config(self) -> dict[str, object]:
        """EngineConfig's fields with what start-up resolved in place of `auto`/None: dtype,
        device, backend, page size, max model length, KV tokens, graph batch, chat template
        (a file's path, or "inline")."""
        values = self.config.as_dict()
        graphs = self.runner.graphs
        values.update(
            model=self.loaded.source, dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device), attention_backend=self.backend.name,
            page_size=self.layout.page_size, max_model_len=self.max_model_len,
            kv_cache_tokens=self.pool.num_tokens, served_model_name=self.model_name,
            kv_cache_dtype=self.kv_dtype.name, kv_cache_scale=self.kv_dtype.scale_mode or "none",
            kv_cache_memory=self.pool.nbytes,
            cuda_graphs=graphs is not None,
            cuda_graph_max_batch=graphs.max_batch if graphs is not None else 0,
        )
        template = self.config.chat_template
        if template is not None and "{" in template:
            values["chat_template"] = "inline"
        return values

    def stats(self) -> dict[str, object]:
        """The scheduler's stats and the number of requests the engine tracks."""
        return {**dataclasses.asdict(self.scheduler.stats), "num_tracked": len(self.outputs),
                **self.kv_cache_info()}

    def kv_cache_info(self) -> dict[str, object]:
        """What the KV cache stores and holds: dtype, scale mode, capacity in tokens, bytes."""
        return {"kv_cache_dtype": self.kv_dtype.name,
                "kv_cache_scale": self.kv_dtype.scale_mode or "none",
                "kv_cache_tokens": self.pool.num_tokens, "kv_cache_bytes": self.pool.nbytes}
