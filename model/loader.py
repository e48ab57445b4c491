"""Loading a model from one of its sources: the embedded SmolLM2 GGUF, any GGUF file, a
Hugging Face folder (config.json + safetensors, offline) or a synthetic preset.

Models are built on the meta device and materialised directly on the target device in the
target dtype, so nothing is initialised twice and big synthetic models load in seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm import tqdm

from model.families import AnyConfig, AnyModel, config_from_hf_dict, model_class, weight_loader
from model.gguf_weights import GGUFFile, embedded_smollm2_path
from model.parallel.group import TPGroup
from model.parallel.layers import TensorParallelCausalLM
from model.parallel.sharding import TPShard
from model.parallel.weights import ShardedWeightLoader
from model.presets import SYNTHETIC_PRESETS, init_synthetic_weights, synthetic_config
from model.tokenizer import Tokenizer
from model.weights import WeightLoader

logger = logging.getLogger(__name__)
T = TypeVar("T")

EMBEDDED_NAMES = ("smollm2", "smollm2-135m-instruct")


@dataclass
class LoadedModel:
    model: AnyModel
    config: AnyConfig
    tokenizer: Tokenizer | None
    source: str  # human-readable description of where the weights came from
    # seconds per part of the load ("weights_s", "tokenizer_s", ...) and "total_s"
    timings: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def _no_param_init() -> Iterator[None]:
    """Skip Linear's and Embedding's initialisers while a model is built: every parameter is
    overwritten by the loader, and initialising 135M values costs seconds on a CPU."""
    classes = (torch.nn.Linear, torch.nn.Embedding)
    saved = [cls.reset_parameters for cls in classes]
    try:
        for cls in classes:
            cls.reset_parameters = lambda self: None  # type: ignore[method-assign]
        yield
    finally:
        for cls, original in zip(classes, saved, strict=True):
            cls.reset_parameters = original  # type: ignore[method-assign]


class ModelSpecError(ValueError):
    """A --model (or --tokenizer) value that names nothing loadable: a one-line message."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def empty_model(config: AnyConfig, dtype: torch.dtype, device: torch.device,
                tp: TPGroup | None = None) -> AnyModel:
    """A model with uninitialised parameters on `device` (rotary cache computed); with `tp`,
    this rank's part of it (model/parallel/; TensorParallelUnsupported for a family that is
    not split).

    Built on `device` directly, not on the meta device: an operation on meta tensors imports
    torch._dynamo (1.5-2.5 s of a fresh process), and allocation without initialisation
    costs nothing on either device."""
    with torch.device(device), _no_param_init():
        if tp is None:
            model = model_class(config)(config, dtype=dtype)  # type: ignore[arg-type]
        else:
            model = TensorParallelCausalLM(TPShard(config, tp.rank, tp.size), tp, dtype)
    model.rotary.reset_cache(config)  # inv_freq computed on the CPU, as the reference does
    return model.eval().requires_grad_(False)


def embedded_tokenizer() -> Tokenizer:
    path = embedded_smollm2_path()
    return Tokenizer.from_pretrained(path.parent, gguf_file=path.name)


def check_tokenizer_spec(spec: str) -> Path:
    """The --tokenizer path, or ModelSpecError unless it is a folder or a .gguf file."""
    path = Path(spec).expanduser()
    if (path.is_file() and path.suffix == ".gguf") or path.is_dir():
        return path
    raise ModelSpecError(f"--tokenizer {spec!r} is neither a tokenizer folder nor a .gguf file")


def load_tokenizer(spec: str) -> Tokenizer:
    """A tokenizer from a Hugging Face folder or a .gguf file (`--tokenizer`)."""
    path = check_tokenizer_spec(spec)
    if path.is_file():
        return Tokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return Tokenizer.from_pretrained(path)


def _progress(items: Iterator, total: int, desc: str) -> Iterator:
    return tqdm(items, total=total, desc=desc, unit="tensor", file=sys.stderr, leave=False)


def _loader_of(model: AnyModel) -> WeightLoader | Any:
    """The weight loader of `model`'s family, or of a tensor-parallel rank's shard."""
    if isinstance(model, TensorParallelCausalLM):
        return ShardedWeightLoader(model)
    return weight_loader(model)


def _load_gguf(
    path: Path, dtype: torch.dtype, device: torch.device, with_tokenizer: bool,
    tp: TPGroup | None = None,
) -> LoadedModel:
    """The tokenizer loads on a second thread meanwhile: importing transformers is most of
    its time and holds the GIL, while dequantizing mostly runs in torch, which releases it
    (bench/gguf_load.py measures both parts)."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(1, thread_name_prefix="tokenizer") as pool:
        tokenizer_job = (pool.submit(_timed, Tokenizer.from_pretrained, path.parent, path.name)
                         if with_tokenizer else None)
        gf = GGUFFile(path)
        config = gf.config()
        model = empty_model(config, dtype, device, tp)
        loader = _loader_of(model)  # GGUF: Llama family only
        if tp is None:
            gf.load_into(loader)
        else:  # whole tensors, each sliced to the rank's part
            for name, tensor in gf.hf_tensors(config):
                loader.load(name, tensor)
        loader.check_complete()
        weights_s = time.perf_counter() - t0
        tokenizer, tokenizer_s = tokenizer_job.result() if tokenizer_job else (None, 0.0)
    return LoadedModel(model, config, tokenizer, f"gguf:{path}",
                       {"weights_s": weights_s, "tokenizer_s": tokenizer_s})


def _timed(fn: Callable[..., T], *args: object) -> tuple[T, float]:
    t0 = time.perf_counter()
    return fn(*args), time.perf_counter() - t0


def _safetensors_items(folder: Path) -> tuple[list[Path], int]:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder}")
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            total += len(list(st.keys()))
    return files, total


def _iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)


def _load_hf_folder(
    folder: Path, dtype: torch.dtype, device: torch.device, with_tokenizer: bool,
    tp: TPGroup | None = None,
) -> LoadedModel:
    config = config_from_hf_dict(json.loads((folder / "config.json").read_text()))
    files, total = _safetensors_items(folder)
    model = empty_model(config, dtype, device, tp)
    loader = _loader_of(model)
    for name, tensor in _progress(_iter_safetensors(files), total, f"loading {folder.name}"):
        loader.load(name, tensor)
    loader.check_complete()
    tokenizer = None
    if with_tokenizer:
        has_own = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        if has_own:
            tokenizer = Tokenizer.from_pretrained(folder)
        else:
            logger.warning("%s has no tokenizer; using the embedded SmolLM2 tokenizer", folder)
            tokenizer = embedded_tokenizer()
    return LoadedModel(model, config, tokenizer, f"hf:{folder}")


def _load_synthetic(
    name: str, dtype: torch.dtype, device: torch.device, seed: int, with_tokenizer: bool,
    tp: TPGroup | None = None,
) -> LoadedModel:
    config = synthetic_config(name)
    model = empty_model(config, dtype, device, tp)
    # a rank draws each tensor whole and keeps its part: the same model at every TP size
    init_synthetic_weights(model, seed, shard=model.shard if tp is not None else None)
    tokenizer = embedded_tokenizer() if with_tokenizer else None
    return LoadedModel(model, config, tokenizer, f"synthetic:{name} (seed {seed})")


def resolve_model_spec(spec: str | None) -> tuple[str, str]:
    """(kind, target) for a model spec, without loading anything: ("gguf", path),
    ("hf", folder) or ("synthetic", preset). Raises ModelSpecError with what was expected."""
    key = (spec or "smollm2").strip()
    bare = key.removeprefix("synthetic:").lower()
    path = Path(key).expanduser()
    if key.lower() in EMBEDDED_NAMES:
        try:
            return "gguf", str(embedded_smollm2_path())
        except FileNotFoundError as e:
            raise ModelSpecError(str(e)) from None
    if key.startswith("synthetic:") or bare in SYNTHETIC_PRESETS:
        if bare not in SYNTHETIC_PRESETS:
            raise ModelSpecError(f"unknown synthetic preset {bare!r}; presets: "
                                 f"{', '.join(sorted(SYNTHETIC_PRESETS))}")
        return "synthetic", bare
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", str(path)
    if path.is_dir() and (path / "config.json").is_file():
        return "hf", str(path)
    if path.is_dir() and len(ggufs := sorted(path.glob("*.gguf"))) == 1:
        return "gguf", str(ggufs[0])
    expected = ("expected 'smollm2' (the embedded model), a .gguf file, a Hugging Face folder "
                "with config.json + *.safetensors, or a synthetic preset "
                f"({', '.join(sorted(SYNTHETIC_PRESETS))})")
    if not path.exists() and _HUB_ID.match(key):
        raise ModelSpecError(
            f"--model {key!r} looks like a Hugging Face Hub id, and attnserve does not "
            f"download models: fetch it first (e.g. huggingface-cli download {key} "
            "--local-dir DIR) and pass --model DIR")
    if not path.exists():
        raise ModelSpecError(f"--model {key!r}: no such file or folder; {expected}")
    raise ModelSpecError(f"--model {key!r} is not a model this server can load; {expected}")


def peek_model_config(spec: str | None) -> AnyConfig:
    """The whole model's config of `spec`, without loading its weights (a GGUF's metadata,
    a folder's config.json, a preset)."""
    kind, target = resolve_model_spec(spec)
    if kind == "gguf":
        return GGUFFile(Path(target)).config()
    if kind == "synthetic":
        return synthetic_config(target)
    return config_from_hf_dict(json.loads((Path(target) / "config.json").read_text()))


def load_model(
    spec: str | None,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    *,
    with_tokenizer: bool = True,
    tp: TPGroup | None = None,
) -> LoadedModel:
    """Load `spec`: None/'smollm2' (embedded GGUF), a .gguf path, a Hugging Face folder, or
    a synthetic preset ('synthetic:llama3-8b' or 'llama3-8b'); see resolve_model_spec.
    With `tp`, only this tensor-parallel rank's part of the model (`config` stays the whole
    model's; `model.config` is the rank's)."""
    device = torch.device(device)
    t0 = time.perf_counter()
    kind, target = resolve_model_spec(spec)
    if kind == "gguf":
        loaded = _load_gguf(Path(target), dtype, device, with_tokenizer, tp)
    elif kind == "synthetic":
        loaded = _load_synthetic(target, dtype, device, seed, with_tokenizer, tp)
    else:
        loaded = _load_hf_folder(Path(target), dtype, device, with_tokenizer, tp)
    loaded.timings["total_s"] = time.perf_counter() - t0
    cfg = loaded.config
    logger.info(
        "loaded %s: %s, %d layers, hidden %d, %d/%d heads x %d, vocab %d, %.1fM params, "
        "%s on %s in %.1f s",
        loaded.source,
        cfg.architecture,
        cfg.num_layers,
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.vocab_size,
        cfg.num_parameters() / 1e6,
        str(dtype).removeprefix("torch."),
        device,
        time.perf_counter() - t0,
    )
    return loaded
