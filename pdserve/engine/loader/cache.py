"""A local cache of converted GGUF checkpoints.

Reading a GGUF means parsing its vocabulary and dequantizing every tensor (seconds per
process). The first load writes what came out - config, tokenizer, fp32 weights as
safetensors - under ~/.cache/pdserve/models/<key>/, keyed by the file's path, size and
mtime; later loads (every worker and router process) read that instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from pdserve.engine.config import ModelConfig, RopeScaling
from pdserve.engine.loader.tokenizer import TextTokenizer

FORMAT_VERSION = 2  # 2: the config's rope freq_factors, windows, Gemma/Qwen3 fields


def cache_root() -> Path:
    return Path(os.environ.get("PDSERVE_CACHE_DIR") or Path.home() / ".cache" / "pdserve") / "models"


def cache_dir(path: Path) -> Path:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{FORMAT_VERSION}"
    return cache_root() / hashlib.blake2b(key.encode(), digest_size=10).hexdigest()


def read_meta(path: Path) -> tuple[ModelConfig, TextTokenizer] | None:
    folder = cache_dir(path)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except (OSError, ValueError, KeyError):
        return None
    cfg = meta["config"]
    rope = cfg["rope_scaling"]
    cfg["rope_scaling"] = RopeScaling(**{**rope, "freq_factors": tuple(rope["freq_factors"])})
    for key in ("eos_token_ids", "layer_sliding_windows"):  # JSON lists back to tuples
        cfg[key] = tuple(cfg[key])
    tok = meta["tokenizer"]
    tok["special_ids"] = frozenset(tok["special_ids"])
    return ModelConfig(**cfg), TextTokenizer(tokenizer=tokenizer, **tok)


def read_weights(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        return load_file(str(cache_dir(path) / "weights.safetensors"))
    except (OSError, ValueError):
        return None


def write(path: Path, config: ModelConfig, tokenizer: TextTokenizer,
          weights: dict[str, torch.Tensor]) -> None:
    """Best effort: a cache that cannot be written only costs speed."""
    folder = cache_dir(path)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        tokenizer.tokenizer.save(str(tmp / "tokenizer.json"))
        tok = {f.name: getattr(tokenizer, f.name) for f in dataclasses.fields(tokenizer)
               if f.name != "tokenizer"}
        tok["special_ids"] = sorted(tok["special_ids"])
        (tmp / "meta.json").write_text(json.dumps({"config": dataclasses.asdict(config),
                                                   "tokenizer": tok}))
        try:
            tmp.rename(folder)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass
