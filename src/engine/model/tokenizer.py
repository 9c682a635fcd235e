"""Tokenizer from the GGUF's own metadata plus its chat template.

Built with the `tokenizers` library: gpt2-style byte-level BPE from the file's vocab and merges
(the pre-tokenizer follows llama.cpp's `tokenizer.ggml.pre`), or SentencePiece BPE from the
vocab and scores; either way ids equal llama.cpp's on the same file. The chat template is
untrusted input: it renders in jinja2's sandbox.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Sequence

from engine.errors import ModelError

if TYPE_CHECKING:
    from engine.model.spec import ModelSpec

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


def byte_level_bpe(tokens: Sequence[str], merges: Sequence[str], pre: str, source: str):
    """gpt2-style BPE (`tokenizer.ggml.model = gpt2`): byte-level alphabet, merges from the file."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    if pre not in PRE_TOKENIZERS:
        raise ModelError(f"{source}: pre-tokenizer {pre!r} not supported (supported: {', '.join(PRE_TOKENIZERS)})")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=False))
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in PRE_TOKENIZERS[pre]]
    tk.pre_tokenizer = pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    return tk


def sentencepiece_bpe(tokens: Sequence[str], scores: Sequence[float], add_space_prefix: bool, unk_id: int | None):
    """SentencePiece BPE (`tokenizer.ggml.model = llama`): merges follow the merged piece's score,
    unknown bytes fall back to <0xNN> tokens, spaces are '▁' (as llama.cpp's SPM vocab)."""
    from tokenizers import decoders, models, normalizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {tok: i for i, tok in enumerate(tokens)}
    score = dict(zip(tokens, scores))
    merges = []
    for piece in tokens:  # every split of a piece into two pieces is a merge, ranked by the piece's score
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges += [(left, right, score[piece]) for left, right in local]
    merges.sort(key=lambda m: m[2], reverse=True)
    unk = tokens[unk_id] if unk_id is not None else None
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=[(a, b) for a, b, _ in merges], unk_token=unk, fuse_unk=True,
                                byte_fallback=True))
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    tk.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(content=" ", left=1, right=0)] if add_space_prefix else []
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    return tk


class Tokenizer:
    def __init__(self, hf_tokenizer, tokens: Sequence[str], token_types: Sequence[int], bos_id: int | None,
                 eos_id: int | None, eot_id: int | None, add_bos: bool, chat_template: str | None):
        from tokenizers import AddedToken

        specials = [tokens[i] for i, t in enumerate(token_types) if t in (CONTROL, USER_DEFINED)]
        hf_tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
        self._tk = hf_tokenizer
        self.vocab_size = len(tokens)
        self.bos_id, self.eos_id, self.eot_id = bos_id, eos_id, eot_id
        self.add_bos = add_bos
        self.chat_template = chat_template

    @classmethod
    def from_spec(cls, spec: "ModelSpec") -> "Tokenizer":
        model = spec.field("tokenizer.ggml.model")
        tokens = spec.field("tokenizer.ggml.tokens")
        if not tokens:
            raise ModelError(f"{spec.path}: tokenizer vocab missing")
        if model == "gpt2":
            merges = spec.field("tokenizer.ggml.merges")
            if merges is None:
                raise ModelError(f"{spec.path}: tokenizer merges missing")
            hf = byte_level_bpe(tokens, merges, spec.field("tokenizer.ggml.pre", "default"), spec.path)
            default_bos, space_prefix = False, False
        elif model == "llama":
            scores = spec.field("tokenizer.ggml.scores") or [0.0] * len(tokens)
            space_prefix = bool(spec.field("tokenizer.ggml.add_space_prefix", True))
            hf = sentencepiece_bpe(tokens, scores, space_prefix, spec.field("tokenizer.ggml.unknown_token_id"))
            default_bos = True
        else:
            raise ModelError(f"{spec.path}: tokenizer model {model!r} not supported (supported: gpt2, llama)")
        types = spec.field("tokenizer.ggml.token_type") or [1] * len(tokens)
        eot = spec.field("tokenizer.ggml.eot_token_id")
        if eot is None:  # end-of-turn tokens llama.cpp also recognises by their text
            eot = next((tokens.index(t) for t in EOT_TEXTS if t in tokens), None)
        return cls(
            hf, tokens, types,
            bos_id=spec.field("tokenizer.ggml.bos_token_id"),
            eos_id=spec.field("tokenizer.ggml.eos_token_id"),
            eot_id=eot,
            add_bos=bool(spec.field("tokenizer.ggml.add_bos_token", default_bos)),
            chat_template=spec.field("tokenizer.chat_template") or DEFAULT_TEMPLATES.get(spec.config.arch.name),
        )

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text (`<|im_start|>`) are parsed."""
        ids = self._tk.encode(text, add_special_tokens=False).ids if text else []
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """The rendered conversation's ids; a template that writes the BOS token itself gets no second one."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        bos = self.token_text(self.bos_id) if self.bos_id is not None else None
        return self.encode(text, add_bos=False if bos and text.startswith(bos) else None)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=False)

    @property
    def hf_tokenizer(self):
        """The `tokenizers.Tokenizer` behind this one (to save it as tokenizer.json)."""
        return self._tk

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


EOT_TEXTS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>")

# Gemma's turn format, for Gemma files that carry no template (a system message opens the first user turn)
_GEMMA = (
    "{{ bos_token }}{% set sys = messages[0]['content'] + '\n\n' if messages and messages[0]['role'] == 'system' "
    "else '' %}{% for m in messages %}{% if m['role'] != 'system' %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ sys if loop.index0 == (1 if sys else 0) else '' }}{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
DEFAULT_TEMPLATES = {"gemma3": _GEMMA}

# used when a file carries no template of its own
_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
