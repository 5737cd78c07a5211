"""Export a 1D-RoPE GPT prior to a `transformers` `LlamaForCausalLM` with identical logits.

Vocabulary of the export: image codes 0..V-1, then the prefix tokens: class c -> V + c (null
class -> V + num_classes) for class-conditional priors, the start token -> V for unconditional
ones. So `[prefix token, code_0, ..., code_{N-1}]` (see `llama_input_ids`) is an ordinary token
sequence and HF's logits over ids < V equal the prior's. The prefix ids are listed in
generation_config.json's `suppress_tokens` so `generate` never samples them. Our RoPE already
uses HF's rotate_half layout, so q/k weights copy without permutation.
"""

from pathlib import Path

import torch
from torch import Tensor

from prior.gpt import GPT
from training.serialization import atomic_dir


def prefix_token_count(gpt: GPT) -> int:
    """Number of extra (prefix) ids after the image codes in the exported vocabulary."""
    return gpt.config.num_classes + 1 if gpt.config.cond == "class" else 1


def llama_config(gpt: GPT):
    """The `LlamaConfig` matching a GPT prior (raises ValueError for unsupported priors)."""
    from transformers import LlamaConfig

    cfg = gpt.config
    if cfg.rope != "1d":
        raise ValueError(f"only 1D-RoPE priors export to Llama (this one has rope={cfg.rope!r})")
    if cfg.cond == "text":
        raise ValueError(
            "text-conditional priors do not export to Llama (the prefix is not a token)"
        )
    return LlamaConfig(
        vocab_size=cfg.vocab_size + prefix_token_count(gpt),
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.prefix_len + cfg.seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_base,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def to_llama(gpt: GPT):
    """An in-memory `LlamaForCausalLM` (fp32, eval) with the GPT's weights."""
    from transformers import LlamaForCausalLM

    cfg = gpt.config
    llama = LlamaForCausalLM(llama_config(gpt)).float().eval()
    src = {k: v.detach().float() for k, v in gpt.state_dict().items()}
    if cfg.cond == "class":
        prefix_rows = src["conditioner.class_embedding.weight"]  # [num_classes + 1, dim]
    else:
        prefix_rows = src["conditioner.start"]  # [1, dim]
    out_rows = torch.zeros(prefix_rows.shape[0], cfg.dim)  # logits of prefix ids: suppressed
    state = {
        "model.embed_tokens.weight": torch.cat([src["tok_embeddings.weight"], prefix_rows]),
        "model.norm.weight": src["transformer.norm.weight"],
        "lm_head.weight": torch.cat([src["output.weight"], out_rows]),
    }
    names = {
        "self_attn.q_proj": "attention.wq",
        "self_attn.k_proj": "attention.wk",
        "self_attn.v_proj": "attention.wv",
        "self_attn.o_proj": "attention.wo",
        "mlp.gate_proj": "feed_forward.w1",
        "mlp.up_proj": "feed_forward.w3",
        "mlp.down_proj": "feed_forward.w2",
    }
    for i in range(cfg.n_layers):
        ours, theirs = f"transformer.layers.{i}.", f"model.layers.{i}."
        for hf, us in names.items():
            state[f"{theirs}{hf}.weight"] = src[f"{ours}{us}.weight"]
        state[f"{theirs}input_layernorm.weight"] = src[f"{ours}attention_norm.weight"]
        state[f"{theirs}post_attention_layernorm.weight"] = src[f"{ours}ffn_norm.weight"]
    missing, unexpected = llama.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(
            f"Llama export mapping is incomplete: missing {missing}, unexpected {unexpected}"
        )
    llama.generation_config.suppress_tokens = list(range(cfg.vocab_size, llama.config.vocab_size))
    return llama


def export_to_llama(gpt: GPT, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write `out_dir` as a `LlamaForCausalLM` checkpoint (config.json + model.safetensors)."""
    llama = to_llama(gpt)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        llama.save_pretrained(tmp)
    return Path(out_dir)


def llama_input_ids(codes: Tensor, class_ids: Tensor | None, vocab_size: int) -> Tensor:
    """[prefix id, codes...] Long [B, 1 + N] for an exported prior (class_ids None = unconditional).

    HF logits[:, i, :vocab_size] then equal the prior's logits[:, i] for i < N.
    """
    b = codes.shape[0]
    if class_ids is None:
        first = torch.full((b, 1), vocab_size, dtype=torch.long, device=codes.device)
    else:
        if class_ids.shape != (b,):
            raise ValueError(f"class_ids must be [B={b}], got {tuple(class_ids.shape)}")
        first = (class_ids.long() + vocab_size)[:, None].to(codes.device)
    return torch.cat([first, codes.long()], dim=1)
