"""Tokenizer, chat template and streaming detokenization over a transformers tokenizer."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from mlxq.errors import TokenizerError

# Tokens that end an assistant turn in the common chat formats; generation stops at any of them.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


class Tokenizer:
    """Encode/decode, chat templates (with `enable_thinking` passed through) and the EOS set. Safe to share across
    threads: encoding and templating take turns (a fast tokenizer's settings may change under an encode)."""

    def __init__(self, hf, chat_template: str | None = None, eos_token_ids: list[int] | None = None):
        self.hf = hf
        self._lock = threading.Lock()
        if chat_template:
            hf.chat_template = chat_template
        ids = set(eos_token_ids or []) | {i for t in END_OF_TURN if (i := self.token_id(t)) is not None}
        if hf.eos_token_id is not None:
            ids.add(hf.eos_token_id)
        self.eos_token_ids = ids
        self.bos_token_id = hf.bos_token_id
        self.vocab_size = len(hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        with self._lock:
            return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        with self._lock:
            return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], **options: Any) -> list[int]:
        """Token ids of the rendered conversation (`render_chat_template` takes the options)."""
        # The template already writes BOS where the model wants it.
        return self.encode(self.render_chat_template(messages, **options), add_special_tokens=False)

    def render_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """The conversation rendered as text (Jinja only: the tokenizer itself is not touched). Extra kwargs
        (e.g. `enable_thinking`) reach the template as variables, as transformers passes them."""
        if not self.has_chat_template:
            raise TokenizerError("the model has no chat template; pass a plain prompt instead")
        return self.hf.apply_chat_template(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False,
            **template_kwargs,
        )

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)

    def token_id(self, token: str) -> int | None:
        """The id of `token` if the vocabulary has it (added tokens included). Looked up one by one: the whole
        vocabulary as a dict (`get_vocab`) costs ~50 ms for 49k tokens; an unknown token maps to the unknown token's
        id, which maps back to another string."""
        i = self.hf.convert_tokens_to_ids(token)
        return i if isinstance(i, int) and self.hf.convert_ids_to_tokens(i) == token else None


class StreamingDetokenizer:
    """Turns tokens into text pieces as they come, never splitting a multi-byte character.

    Decodes only a short window (the previous piece and the new tokens) per step, so each step costs
    O(1) however long the output grows.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._decode = tokenizer.hf.decode
        self.tokens: list[int] = []
        self._prefix = 0  # start of the window that is decoded for context
        self._read = 0  # tokens before this have been emitted
        self.text = ""

    def add(self, token: int) -> str:
        """Feed one token; returns the text that is now final (possibly empty)."""
        self.tokens.append(token)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self._decode(self.tokens[self._prefix : self._read])
        now = self._decode(self.tokens[self._prefix :])
        if len(now) <= len(before) or (now.endswith("\ufffd") and not final):
            return ""
        piece = now[len(before) :]
        self._prefix, self._read = self._read, len(self.tokens)
        self.text += piece
        return piece


def load_tokenizer(tokenizer_dir: Path | None, gguf_file: Path | None, chat_template: str | None,
                   eos_token_ids: list[int] | None = None) -> Tokenizer:
    from transformers import AutoTokenizer

    try:
        if gguf_file is not None:
            hf = _gguf_tokenizer(gguf_file)
        elif tokenizer_dir is not None:
            hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        else:
            raise TokenizerError("no tokenizer: the checkpoint has neither tokenizer files nor GGUF vocab")
    except (OSError, ValueError, KeyError, TypeError) as e:
        where = gguf_file or tokenizer_dir
        raise TokenizerError(f"{where}: cannot load a tokenizer ({str(e).splitlines()[0][:200]})") from None
    if chat_template is None and tokenizer_dir is not None:
        jinja = tokenizer_dir / "chat_template.jinja"
        chat_template = jinja.read_text() if jinja.exists() and not hf.chat_template else None
    return Tokenizer(hf, chat_template, eos_token_ids)


_GENERIC = ("TokenizersBackend", "PreTrainedTokenizerFast")  # transformers' names of its generic fast tokenizer


def _gguf_tokenizer(gguf_file: Path):
    """transformers builds a tokenizer from GGUF vocab in seconds; the result is cached, keyed by the file's
    identity, so later loads take a fraction of that."""
    import shutil
    import tempfile

    from transformers import AutoTokenizer, PreTrainedTokenizerFast


    cached = gguf_tokenizer_cache(gguf_file)
    if (cached / "tokenizer_config.json").exists():
        try:  # the generic fast class opened directly takes half of AutoTokenizer's time; a family's own class
            # (Qwen2Tokenizer, ...) goes through AutoTokenizer, which picks it
            _merges_as_strings(cached)
            generic = _with_added_tokens(cached).get("tokenizer_class") in _GENERIC
            return (PreTrainedTokenizerFast if generic else AutoTokenizer).from_pretrained(str(cached))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            shutil.rmtree(cached, ignore_errors=True)  # a damaged cache entry is rebuilt, never trusted
    hf = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent))
    except OSError:  # a read-only or full cache only costs speed
        return hf
    try:
        hf.save_pretrained(str(tmp))
        _merges_as_strings(tmp)
        _with_added_tokens(tmp)
        tmp.rename(cached)  # appears whole or not at all
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return hf


def gguf_tokenizer_cache(gguf_file: Path) -> Path:
    """Where the tokenizer built from `gguf_file` is cached, keyed by the file's identity."""
    import hashlib

    from mlxq.formats.fetch import cache_dir

    st = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "tokenizers" / key


_STRING_MERGES = ".merges-as-strings"  # in a cache entry: its tokenizer.json was rewritten (or needs no rewrite)


def _merges_as_strings(saved: Path) -> None:
    """A saved tokenizer.json's BPE merges rewritten from pairs (["a", "b"], as transformers saves them) to the
    "a b" strings the tokenizers library also reads: parsed in about four fifths of the time (SmolLM2's 48,900
    merges), on every load from the cache. Left as pairs when a merge's token holds a space, which the string form
    cannot tell apart from the separator. Done once per entry (marked by a file, so a load checks one name)."""
    mark = saved / _STRING_MERGES
    if mark.exists():
        return
    path = saved / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    merges = spec.get("model", {}).get("merges")
    if merges and all(isinstance(m, list) and len(m) == 2 and " " not in m[0] + m[1] for m in merges):
        spec["model"]["merges"] = [f"{a} {b}" for a, b in merges]
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        tmp.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        tmp.replace(path)  # whole or not at all, also with other processes upgrading the same entry
    mark.touch()


def _with_added_tokens(saved: Path) -> dict:
    """A saved tokenizer's config, with its added tokens written into it (`added_tokens_decoder`) if they are not
    yet: without them transformers parses all of tokenizer.json in Python (a few MB, holding the GIL) to find
    them; with them it leaves that file to the tokenizers library."""
    path = saved / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if "added_tokens_decoder" not in config:
        added = json.loads((saved / "tokenizer.json").read_text()).get("added_tokens", [])
        config["added_tokens_decoder"] = {str(t.pop("id")): t for t in added}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False))
        tmp.replace(path)  # whole or not at all, also with other processes upgrading the same entry
    return config
