"""`transformers`: Hugging Face LlamaForCausalLM as most users run it, built from our ModelSpec
(config and state dict from the GGUF, no hub access) and driven step by step through its KV cache."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from backends.base import LoadInfo, LoadOptions, Mode, Requirement, float_load_info, pip_extra
from backends.torch_llama import TORCH, TORCH_DTYPES, TorchBased, synchronize

TRANSFORMERS = Requirement("transformers", "transformers", pip_extra("transformers"))

# our LlamaWeights field -> HF parameter name inside model.layers.{i}
HF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "wq": "self_attn.q_proj", "wk": "self_attn.k_proj",
    "wv": "self_attn.v_proj", "wo": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj",
}


def hf_config(spec):
    from transformers import LlamaConfig

    c = spec.config
    return LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.context_length,
        rms_norm_eps=c.rms_eps, rope_theta=c.rope_base, tie_word_embeddings=spec.tied_embeddings,
        bos_token_id=spec.field("tokenizer.ggml.bos_token_id"), eos_token_id=spec.field("tokenizer.ggml.eos_token_id"),
        hidden_act="silu", attention_bias=False, mlp_bias=False,
    )


def build_hf_model(spec, precision: str, device: str):
    """A LlamaForCausalLM holding the GGUF's weights (dequantized, HF row order for Q/K)."""
    import torch
    from transformers import LlamaForCausalLM

    dtype = getattr(torch, TORCH_DTYPES[precision])
    cfg = hf_config(spec)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    state = {}
    w = spec.load_weights(lambda a: torch.from_numpy(a).to(dtype=dtype))
    state["model.embed_tokens.weight"] = w.tok_embd
    state["model.norm.weight"] = w.output_norm
    state["lm_head.weight"] = w.output
    for i, layer in enumerate(w.layers):
        for ours, theirs in HF_LAYER_NAMES.items():
            state[f"model.layers.{i}.{theirs}.weight"] = getattr(layer, ours)
    model.load_state_dict(state, assign=True, strict=False)
    if spec.tied_embeddings:
        model.tie_weights()
    # buffers (RoPE inv_freq) were created on meta: rebuild them on the target device
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    return model.to(device=device, dtype=dtype).eval()


class TransformersBackend(TorchBased):
    name = "transformers"
    description = "Hugging Face LlamaForCausalLM, stepped through its own KV cache"
    requires = (TRANSFORMERS, TORCH)

    @classmethod
    def modes(cls, spec, device):
        return [Mode("f32"), Mode("bf16")]

    def build(self, spec, opts: LoadOptions) -> LoadInfo:
        import torch

        self.prepare_torch(opts)
        self.model = build_hf_model(spec, opts.precision, self.device)
        self.cache = None
        return float_load_info(spec, opts.precision, self.device, torch_threads=torch.get_num_threads(),
                               attn_implementation=self.model.config._attn_implementation)

    def reset(self) -> None:
        super().reset()
        self.cache = None

    def step(self, tokens: Sequence[int], start: int) -> np.ndarray:
        import torch
        from transformers import DynamicCache

        if self.cache is None:
            self.cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([list(tokens)], device=self.device)
        out = self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        synchronize(self.device)
        return out.logits[0, -1].float().cpu().numpy()
