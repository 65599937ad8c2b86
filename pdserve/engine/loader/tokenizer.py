"""Tokenizer (HF `tokenizers`), chat template (jinja2), incremental detokenization."""

from __future__ import annotations

from dataclasses import dataclass, field

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer, decoders, models, pre_tokenizers


class ChatTemplateError(ValueError):
    pass


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


@dataclass
class TextTokenizer:
    tokenizer: Tokenizer
    chat_template: str | None = None
    bos_token: str = ""
    eos_token: str = ""
    add_bos: bool = False
    special_ids: frozenset[int] = field(default_factory=frozenset)
    uses_post_processor: bool = False  # HF tokenizer.json adds its own BOS/EOS

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        # encode_batch releases the GIL while it works (encode holds it: a 10 MB prompt
        # tokenized on a thread would still stall the router's event loop for seconds)
        if self.uses_post_processor:
            return self.tokenizer.encode_batch([text], add_special_tokens=add_special)[0].ids
        ids = self.tokenizer.encode_batch([text], add_special_tokens=False)[0].ids
        bos = self.tokenizer.token_to_id(self.bos_token) if self.bos_token else None
        if add_special and self.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template; send a plain prompt")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ChatTemplateError("each chat message needs 'role' and 'content'")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token, eos_token=self.eos_token)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # templates write their own BOS; HF's apply_chat_template adds no specials either
        return self.encode(self.apply_chat_template(messages), add_special=False)


def byte_level_bpe(tokens: list[str], merges: list[str], special: list[str]) -> Tokenizer:
    """GPT-2 style byte-level BPE as SmolLM2/Llama-3/Qwen2 GGUFs describe it."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(special)
    return tok


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 char.

    Decodes a short window (prefix_offset..) and emits only what lies past what was
    already emitted; a trailing U+FFFD means an incomplete byte sequence, so it waits.
    """

    def __init__(self, tokenizer: TextTokenizer, prompt_ids: list[int] | None = None) -> None:
        self._tok = tokenizer
        self._ids: list[int] = list(prompt_ids or [])[-6:]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix = self._tok.decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._tok.decode(self._ids[self._prefix_offset:])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        delta = full[len(prefix):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self.text += delta
        return delta
