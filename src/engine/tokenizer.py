"""Tokenizer from the GGUF's own metadata (gpt2-style byte-level BPE) plus its chat template.

Built with the `tokenizers` library from the file's vocab and merges; the pre-tokenizer follows
llama.cpp's `tokenizer.ggml.pre` so ids equal llama.cpp's on the same file. The chat template is
untrusted input: it renders in jinja2's sandbox.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Sequence

from engine.errors import ModelError

if TYPE_CHECKING:
    from engine.gguf_model import ModelSpec

# llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
CONTROL, USER_DEFINED = 3, 4

# llama.cpp pre-tokenizer regexes (llama-vocab.cpp), as split patterns for `tokenizers`
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# pre-tokenizer name -> (split regexes applied in order)
PRE_TOKENIZERS = {
    "default": (_GPT2,),
    "gpt2": (_GPT2,),
    "smollm": (r"\p{N}", _GPT2),  # digits split one by one, then GPT-2's pattern
    "llama-bpe": (_LLAMA3,),
    "llama3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
}


class Tokenizer:
    def __init__(self, tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int], pre: str,
                 bos_id: int | None, eos_id: int | None, eot_id: int | None, add_bos: bool,
                 chat_template: str | None, source: str = "model"):
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        if pre not in PRE_TOKENIZERS:
            raise ModelError(f"{source}: pre-tokenizer {pre!r} not supported (supported: {', '.join(PRE_TOKENIZERS)})")
        vocab = {tok: i for i, tok in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=False)
        tk = HFTokenizer(bpe)
        splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in PRE_TOKENIZERS[pre]]
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        tk.decoder = decoders.ByteLevel()
        specials = [tokens[i] for i, t in enumerate(token_types) if t in (CONTROL, USER_DEFINED)]
        tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
        self._tk = tk
        self.vocab_size = len(tokens)
        self.bos_id, self.eos_id, self.eot_id = bos_id, eos_id, eot_id
        self.add_bos = add_bos
        self.chat_template = chat_template

    @classmethod
    def from_spec(cls, spec: "ModelSpec") -> "Tokenizer":
        model = spec.field("tokenizer.ggml.model")
        if model != "gpt2":
            raise ModelError(f"{spec.path}: tokenizer model {model!r} not supported (supported: gpt2 byte-level BPE)")
        tokens = spec.field("tokenizer.ggml.tokens")
        merges = spec.field("tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise ModelError(f"{spec.path}: tokenizer vocab or merges missing")
        types = spec.field("tokenizer.ggml.token_type") or [1] * len(tokens)
        return cls(
            tokens, merges, types,
            pre=spec.field("tokenizer.ggml.pre", "default"),
            bos_id=spec.field("tokenizer.ggml.bos_token_id"),
            eos_id=spec.field("tokenizer.ggml.eos_token_id"),
            eot_id=spec.field("tokenizer.ggml.eot_token_id"),
            add_bos=bool(spec.field("tokenizer.ggml.add_bos_token", False)),
            chat_template=spec.field("tokenizer.chat_template"),
            source=spec.path,
        )

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text (`<|im_start|>`) are parsed."""
        ids = self._tk.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        return self._tk.id_to_token(token_id) or ""

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(sorted({i for i in (self.eos_id, self.eot_id) if i is not None}))

    @cached_property
    def _template(self):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ModelError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template or _CHATML)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError

        try:
            return self._template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.token_text(self.bos_id) if self.bos_id is not None else "",
                eos_token=self.token_text(self.eos_id) if self.eos_id is not None else "",
            )
        except TemplateError as e:
            raise ModelError(f"chat template failed to render: {e}") from e


# used when a file carries no template of its own
_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
