"""Tiny random-init configs, one per supported family, for tests that run in seconds.

Shapes keep what makes each family different: grouped-query heads (kv < heads), a head_dim
that is not hidden/heads (Gemma, D4), fused interleaved QKV (NeoX, BLOOM), post-norm OPT.
"""

from __future__ import annotations

import torch
import transformers

TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "gpt2": ("GPT2Config", dict(n_layer=2, n_head=4, n_embd=32, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)),
    "opt": ("OPTConfig", dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, ffn_dim=64,
                              word_embed_proj_dim=32, vocab_size=128, max_position_embeddings=64)),
    "opt_postnorm": ("OPTConfig", dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, ffn_dim=64,
                                       word_embed_proj_dim=16, vocab_size=128, max_position_embeddings=64,
                                       do_layer_norm_before=False)),
    "gpt_neox": ("GPTNeoXConfig", dict(num_hidden_layers=2, num_attention_heads=8, hidden_size=64,
                                       intermediate_size=128, vocab_size=128, max_position_embeddings=64,
                                       rotary_pct=0.25)),
    "bloom": ("BloomConfig", dict(n_layer=2, n_head=4, hidden_size=32, vocab_size=128)),
    "llama": ("LlamaConfig", dict(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                  hidden_size=64, intermediate_size=96, vocab_size=128, max_position_embeddings=64)),
    "mistral": ("MistralConfig", dict(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                      hidden_size=64, intermediate_size=96, vocab_size=128,
                                      max_position_embeddings=64, sliding_window=4)),
    "qwen2": ("Qwen2Config", dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  hidden_size=32, intermediate_size=64, vocab_size=128, max_position_embeddings=64)),
    "gemma": ("GemmaConfig", dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=24,
                                  hidden_size=32, intermediate_size=64, vocab_size=128, max_position_embeddings=64)),
    "gemma2": ("Gemma2Config", dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                    hidden_size=32, intermediate_size=64, vocab_size=128,
                                    max_position_embeddings=64, sliding_window=4, attn_logit_softcapping=5.0)),
    "gemma3": ("Gemma3TextConfig", dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                                        head_dim=24, hidden_size=32, intermediate_size=64, vocab_size=128,
                                        max_position_embeddings=64, sliding_window=4,
                                        # sliding and full layers interleaved: two masks in one forward
                                        # pass, layers settled together out of order; no soft-capping
                                        # (gemma2's layers mix masks, but soft-cap)
                                        layer_types=["sliding_attention", "full_attention",
                                                     "sliding_attention"])),
    "bert": ("BertConfig", dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32,
                                intermediate_size=64, vocab_size=128, max_position_embeddings=64)),
}


def build_tiny(name: str, attn_implementation: str = "eager", seed: int = 0):
    """A tiny random-init model of the family `name`, in float32 eval mode, weights perturbed
    so that biases and norm gains are not their trivial init values."""
    cls_name, kwargs = TINY_CONFIGS[name]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    auto = transformers.AutoModel if name == "bert" else transformers.AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 1:  # biases (init 0) and norm gains (init 1): make them informative
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()
