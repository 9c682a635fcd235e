"""`transformers`: the Hugging Face model class of the file's architecture (LlamaForCausalLM,
Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM, MixtralForCausalLM, Phi3ForCausalLM,
Gemma2ForCausalLM, Gemma3ForCausalLM) as most users run it, built from our ModelSpec
(config and state dict from the GGUF, no hub access) and driven step by step through its KV cache."""

from __future__ import annotations

import numpy as np

from backends.base import LoadInfo, LoadOptions, Mode, Requirement, float_load_info, pip_extra
from backends.torch_llama import TORCH, TORCH_DTYPES, TORCH_RUNTIME, TorchBased, synchronize
from engine.model.forward import rope_frequencies

TRANSFORMERS = Requirement("transformers", "transformers", pip_extra("transformers"))

# our LayerWeights field -> HF parameter name inside model.layers.{i}
HF_LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight", "ffn_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight",
    "bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias",
    "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
}
# Gemma: four norms per block, named differently
GEMMA_LAYER_NAMES = {**HF_LAYER_NAMES, "ffn_norm": "pre_feedforward_layernorm.weight",
                     "post_attn_norm": "post_attention_layernorm.weight",
                     "post_ffn_norm": "post_feedforward_layernorm.weight"}
# Phi-3: the fused projections transformers keeps as one matrix, from our split fields
PHI3_FUSED = {"self_attn.qkv_proj.weight": ("wq", "wk", "wv"), "mlp.gate_up_proj.weight": ("w_gate", "w_up")}
# mixture of experts: transformers stacks gate and up of every expert in one (experts, 2 * ffn, dim)
MOE_NAMES = {"router": "mlp.gate.weight", "down_exps": "mlp.experts.down_proj"}
MOE_FUSED = {"mlp.experts.gate_up_proj": ("gate_exps", "up_exps")}
# architecture -> (transformers config class, model class, layer names)
HF_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", HF_LAYER_NAMES),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", HF_LAYER_NAMES),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", HF_LAYER_NAMES),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", HF_LAYER_NAMES),
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {**HF_LAYER_NAMES, **MOE_NAMES}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**HF_LAYER_NAMES, **MOE_NAMES}),  # llama with experts
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", GEMMA_LAYER_NAMES),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", GEMMA_LAYER_NAMES),
}


def _rope(base: float, factor: float) -> dict:
    if factor == 1.0:
        return {"rope_type": "default", "rope_theta": base}
    return {"rope_type": "linear", "rope_theta": base, "factor": factor}


def hf_arch(c) -> str:
    """The HF_CLASSES key of a config: its architecture, Mixtral for llama with experts."""
    return "mixtral" if c.arch.name == "llama" and c.n_experts else c.arch.name


def hf_config(spec):
    import transformers

    c = spec.config
    arch = hf_arch(c)
    common = dict(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.context_length,
        rms_norm_eps=c.rms_eps, tie_word_embeddings=spec.tied_embeddings, head_dim=c.head_dim,
        bos_token_id=spec.field("tokenizer.ggml.bos_token_id"), eos_token_id=spec.field("tokenizer.ggml.eos_token_id"),
    )
    if arch.startswith("gemma"):
        extra = _gemma_config(c)
    else:
        extra = dict(hidden_act="silu", rope_parameters=_rope(c.rope_base, c.rope_linear_factor))
        if arch == "llama":
            extra.update(attention_bias=False, mlp_bias=False)
        if arch in ("qwen3", "qwen3moe"):
            extra.update(attention_bias=False)
        if arch == "qwen3moe":  # llama.cpp renormalises the top-k weights of every qwen3moe
            extra.update(num_experts=c.n_experts, num_experts_per_tok=c.n_experts_used, norm_topk_prob=True,
                         moe_intermediate_size=c.expert_ffn_dim, decoder_sparse_step=1, mlp_only_layers=[])
        if arch == "mixtral":  # its router always renormalises the top-k, as llama.cpp's llama with experts
            extra.update(num_local_experts=c.n_experts, num_experts_per_tok=c.n_experts_used,
                         intermediate_size=c.expert_ffn_dim, sliding_window=None)

        if arch == "phi3":  # llama.cpp runs Phi-3 without its sliding window: so does this
            extra.update(sliding_window=None, pad_token_id=None, original_max_position_embeddings=c.context_length)
    return getattr(transformers, HF_CLASSES[arch][0])(**{**common, **extra})  # extra overrides (Mixtral's ffn)


def _gemma_config(c) -> dict:
    """Gemma 2 and 3: window layers, query scale, soft-caps; Gemma 3 gives its local layers a RoPE of their own."""
    rope = _rope(c.rope_base, c.rope_linear_factor)
    if c.arch.name == "gemma3":
        rope = {"full_attention": rope, "sliding_attention": _rope(c.rope_base_local, 1.0)}
    return dict(
        hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=round(c.scale ** -2), sliding_window=c.sliding_window,
        layer_types=["sliding_attention" if local else "full_attention" for local in c.local_layers],
        rope_parameters=rope, final_logit_softcapping=c.final_softcap or None,
        attn_logit_softcapping=c.attn_softcap or None, pad_token_id=None,
    )


def build_hf_model(spec, precision: str, device: str):
    """The architecture's own transformers model holding the GGUF's weights (dequantized, HF row
    order for Q/K; Gemma's norm weights back to transformers' 1 + w convention)."""
    import torch
    import transformers

    dtype = getattr(torch, TORCH_DTYPES[precision])
    cfg = hf_config(spec)
    _, model_class, names = HF_CLASSES[hf_arch(spec.config)]
    with torch.device("meta"):
        model = getattr(transformers, model_class)(cfg)
    state = {}
    w = spec.load_weights(lambda a: torch.from_numpy(a).to(dtype=dtype))
    shift = spec.config.arch.name.startswith("gemma")  # GGUF stores 1 + w (the converter adds it)
    norm = (lambda t: t - 1) if shift else (lambda t: t)  # noqa: E731
    state["model.embed_tokens.weight"] = w.tok_embd
    state["model.norm.weight"] = norm(w.output_norm)
    state["lm_head.weight"] = w.output
    fused = PHI3_FUSED if spec.config.arch.fused else MOE_FUSED if spec.config.n_experts else {}
    for i in range(len(w.layers)):
        # the layer leaves `w` first, so each fused copy frees its parts before the next layer's
        # (holding them all doubled the MoE shape's gate/up experts: 19.3 GB peak, 13.7 estimated)
        parts, w.layers[i] = w.layers[i].tensors(), None
        for hf_name, fields in fused.items():  # rows of a matrix, or of each expert's matrix
            state[f"model.layers.{i}.{hf_name}"] = torch.cat([parts.pop(f) for f in fields], dim=-2)
        for ours, tensor in parts.items():
            state[f"model.layers.{i}.{names[ours]}"] = norm(tensor) if ours.endswith("norm") else tensor
    model.load_state_dict(state, assign=True, strict=False)
    if spec.tied_embeddings:
        model.tie_weights()
    # buffers created on meta (RoPE inv_freq, Gemma's embedding scale): rebuild them for real
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    if spec.config.rope_freq_factors:  # Llama 3.x: the file holds the llama3 scaling as frequencies, not parameters
        model.model.rotary_emb.inv_freq = torch.from_numpy(rope_frequencies(spec.config, 0)).float()
        model.model.rotary_emb.original_inv_freq = model.model.rotary_emb.inv_freq
    embed = model.model.embed_tokens
    if hasattr(embed, "scalar_embed_scale"):
        embed.embed_scale = torch.tensor(embed.scalar_embed_scale)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"transformers model has tensors the GGUF did not fill: {', '.join(left[:3])}")
    return model.to(device=device, dtype=dtype).eval()


class TransformersBackend(TorchBased):
    name = "transformers"
    description = "Hugging Face's model class for the architecture, stepped through its own KV cache"
    requires = (TRANSFORMERS, TORCH)
    runtime_bytes = TORCH_RUNTIME + 150 * 2**20  # transformers' modules beside torch's (measured)

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

    def step(self, tokens: list[list[int]], start: int) -> np.ndarray:
        import torch
        from transformers import DynamicCache

        if self.cache is None:
            self.cache = DynamicCache(config=self.model.config)
        ids = torch.tensor(tokens, device=self.device)  # (B, T): equal lengths, so no padding or mask
        out = self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        synchronize(self.device)
        return out.logits[:, -1].float().cpu().numpy()
