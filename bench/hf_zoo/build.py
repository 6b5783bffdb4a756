"""Tiny random-weight builds of every causal-LM architecture transformers ships.

``names()`` lists every entry of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``; ``build(name)`` makes one
with random weights (seed 0, ``eval()``) from a config shrunk from the architecture's default:
width 64, 4 heads, 2 KV heads, head_dim 16, FFN 128, 2 layers, vocab 128, 64 positions, MoE with 4
experts (top-2, width 32), MLA ranks 16-32.  ``inputs()`` is the one call every model gets.

Nothing is downloaded: configs come from the config classes' defaults.  The shrinking is generic
(``SIZE``: config keys by meaning, whatever the architecture calls them); what it misses is in
``EXTRA`` (per-architecture overrides, found by trying) and ``SKIP`` (what cannot be built as a
plain ``input_ids -> logits`` model, and why).
"""
from __future__ import annotations

import torch
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

VOCAB = 128
H, HEADS, KV, FFN, LAYERS, POS, HD = 64, 4, 2, 128, 2, 64, 16

# Config keys whose integer value is replaced, by meaning.  A list of ints under one of these keys
# (a per-layer size) becomes ``[SIZE[key]] * LAYERS``.
SIZE = {
    # width
    "hidden_size": H, "n_embd": H, "d_model": H, "n_embed": H, "dim": H, "embed_dim": H, "d_embed": H,
    "attention_hidden_size": 2 * H,
    # heads
    "num_attention_heads": HEADS, "n_head": HEADS, "n_heads": HEADS, "num_heads": HEADS,
    "decoder_attention_heads": HEADS, "encoder_attention_heads": HEADS,
    "num_key_value_heads": KV, "n_kv_heads": KV, "num_kv_heads": KV, "multi_query_group_num": KV,
    "head_dim": HD, "d_kv": HD, "kv_channels": HD, "attention_head_dim": HD,
    # ffn
    "intermediate_size": FFN, "ffn_dim": FFN, "n_inner": FFN, "d_ff": FFN, "ffn_hidden_size": FFN,
    "decoder_ffn_dim": FFN, "encoder_ffn_dim": FFN, "d_inner": FFN, "inner_hidden_size": FFN,
    "ffn_inner_hidden_size": FFN,
    # layers
    "num_hidden_layers": LAYERS, "n_layer": LAYERS, "num_layers": LAYERS, "n_layers": LAYERS,
    "decoder_layers": LAYERS, "encoder_layers": LAYERS, "num_decoder_layers": LAYERS,
    "layer_group_size": 2,
    # vocab / positions
    "vocab_size": VOCAB, "max_position_embeddings": POS, "n_positions": POS, "n_ctx": POS,
    "max_seq_len": POS, "seq_length": POS, "max_sequence_length": POS,
    # MoE
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_routed_experts": 4,
    "num_experts_per_tok": 2, "num_experts_per_token": 2, "moe_topk": 2, "top_k": 2, "moe_k": 2,
    "num_selected_experts": 2,
    "moe_intermediate_size": 32, "expert_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "shared_experts_intermediate_size": 32, "moe_ffn_hidden_size": 32,
    "n_shared_experts": 1, "num_shared_experts": 1,
    "n_group": 1, "topk_group": 1, "num_expert_group": 1, "first_k_dense_replace": 1,
    # MLA (multi-head latent attention) and sparse-attention indexers
    "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "qk_head_dim": 16, "index_head_dim": 16, "index_n_heads": 2,
    # linear attention / SSM
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "linear_head_dim": 16, "linear_num_heads": 4,
    "state_size": 8, "ssm_state_size": 8, "mamba_d_state": 8, "mamba_n_heads": 4, "mamba_d_head": 16,
    "mamba_head_dim": 16, "mamba_expand": 2, "expand": 2, "n_groups": 1, "mamba_n_groups": 1,
    "time_step_rank": 8, "mamba_dt_rank": 8,
    # windows, partial rotary
    "sliding_window": 16, "attention_window_size": 16, "rotary_dim": 8,
    "sliding_window_size": 16, "attention_window": 16, "window_size": 16,
}

# Keys of SIZE that are also set where the default is None (None there means "derive it", and the
# derived value would come from the default, unshrunk sizes).
NONE_OK = {"head_dim", "num_key_value_heads"}

# Token ids: a default id outside the tiny vocabulary is replaced by a small one.
TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
                "cls_token_id", "mask_token_id", "unk_token_id", "image_token_id", "image_token_index")
SMALL_TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # others: 3

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")

# Per-architecture overrides, applied after the generic shrinking (found by trying).  A nested dict
# under a sub-config's key (``text_config``...) overrides that sub-config.
EXTRA: dict[str, dict] = {
    "cpmant": {"dim_ff": FFN}, "ctrl": {"dff": FFN}, "deepseek_v4": {"o_lora_rank": 32},
    "gemma3n_text": {"vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 16,
                     "num_kv_shared_layers": 0},
    "gemma4_text": {"vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 16},
    "gemma4": {"text_config": {"vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 16}},
    "inkling2_text": {"unpadded_vocab_size": VOCAB}, "inkling2_loop_text": {"unpadded_vocab_size": VOCAB},
    "llama4_text": {"intermediate_size_mlp": FFN},
    "llama4": {"text_config": {"intermediate_size_mlp": FFN}},
    "longcat_flash": {"zero_expert_num": 2, "expert_ffn_hidden_size": 32},
    "minimax_m3_vl_text": {"dense_intermediate_size": FFN, "shared_intermediate_size": 32},
    "nemotron_h": {"moe_shared_expert_intermediate_size": 32},
    "roc_bert": {"shape_embed_dim": 16, "shape_vocab_size": VOCAB, "pronunciation_vocab_size": VOCAB,
                 "pronunciation_embed_dim": 16},
    "xlm": {"emb_dim": H}, "rembert": {"input_embedding_size": 32, "output_embedding_size": H},
    # Mamba-2 style mixers: heads * head_dim must equal expand * hidden.
    "bamba": {"mamba_n_heads": 8}, "granitemoehybrid": {"mamba_n_heads": 8}, "mamba2": {"num_heads": 8},
    "falcon_h1": {"mamba_n_heads": 8, "mamba_d_ssm": 128},
    "zaya": {"num_experts_per_tok": 1},
    "deepseek_v2": {"num_experts_per_tok": 2},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1},
    "dory": {"num_hidden_layers": 4, "layer_types": ["sliding_attention", "mlp", "full_attention", "mlp"]},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "qwen4_exp_text": {"hc_lowrank": 16, "ple_embed_dim": 16, "ngram_vocab_size_base": VOCAB, "split_ngram_parts": 2,
                       "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 4,
                       "indexer_compress_ratio": 2, "num_experts_per_tok": 2},
    "qwen4_exp": {"text_config": {"hc_lowrank": 16, "ple_embed_dim": 16, "ngram_vocab_size_base": VOCAB,
                                  "split_ngram_parts": 2, "indexer_n_heads": 2, "indexer_kv_heads": 1,
                                  "indexer_head_dim": 16, "indexer_budget": 4, "indexer_compress_ratio": 2,
                                  "num_experts_per_tok": 2}},
    "dots3_note_text": {"per_layer_config": {}, "head_dim": 16},
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
    "zamba": {"num_hidden_layers": 4, "attn_layer_period": 2, "attn_layer_offset": 1, "attention_head_dim": 32,
              "layer_types": ["linear_attention", "hybrid", "linear_attention", "hybrid"]},
    "blt": {"encoder_hash_byte_group_vocab": 256, "local_attention_window_len": 16, "patching_mode": None,
            "encoder_config": {"hidden_size_global": H, "num_hidden_layers": 1},
            "decoder_config": {"hidden_size_global": H},
            "global_config": {}, "patcher_config": {}},
    "reformer": {"is_decoder": True, "axial_pos_shape": [8, 8], "axial_pos_embds_dim": [32, 32],
                 "feed_forward_size": FFN},
}

# Architectures not built, and why.
SKIP: dict[str, str] = {
    "musicgen": "audio codebooks: input_ids must be (batch * num_codebooks, seq)",
    "musicgen_melody": "audio codebooks: input_ids must be (batch * num_codebooks, seq)",
    "dots3_note": "multimodal (vision + audio adapters must match the text width); dots3_note_text covers the LM",
    "gemma4_assistant": "assistant (draft) model: needs the backbone's shared_kv_states / inputs_embeds",
    "gemma4_unified_assistant": "assistant (draft) model: needs inputs_embeds and shared_kv_states",
    "gemma3n": "ImportError building the audio/vision towers (timm not installed); gemma3n_text covers the LM",
}

# Multimodal classes registered as causal LMs; the scan feeds them input_ids only (text-only run).
TEXT_ONLY_MULTIMODAL = {"gemma3", "gemma4", "gemma4_unified", "got_ocr2", "fuyu", "phi4_multimodal",
                        "moss_transcribe_diarize", "git"}


class Skip(Exception):
    """``build`` of an architecture listed in ``SKIP``."""


def names() -> list[str]:
    """Every causal-LM architecture (``model_type``) transformers registers."""
    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def select(only: str, error) -> list[str]:
    """The architectures a ``--only a,b`` option names (every one when empty); ``error(message)``
    (``ArgumentParser.error``) is called with those transformers does not register."""
    if not only:
        return names()
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in names()]
    if unknown:
        error(f"not causal-LM architectures in this transformers: {', '.join(unknown)}")
    return wanted


def class_name(name: str) -> str:
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[name]


def _shrink_layer_list(v: list) -> list:
    """Shrink a per-layer list: a list of layer kinds keeps one layer of each kind (at least 2
    layers); any other list keeps its first ``LAYERS`` entries."""
    if v and all(isinstance(x, str) for x in v):
        kinds = list(dict.fromkeys(v))
        return kinds * 2 if len(kinds) < 2 else kinds
    return list(v[:LAYERS])


def shrink_dict(d: dict, extra: dict | None = None) -> dict:
    """The keyword arguments that shrink config dict ``d`` (``to_dict()`` of a default config).

    Only keys that change are returned; nested configs (dicts with a ``model_type``) are shrunk
    recursively.  Per-layer lists (as long as the default layer count) are shrunk too; a list of
    layer kinds sets the layer count, so that every kind of layer the architecture has is built.
    """
    out = {}
    n_default = next((d[k] for k in LAYER_COUNT_KEYS if isinstance(d.get(k), int)), None)
    layer_lists = {}
    for k, v in d.items():
        if isinstance(v, dict) and "model_type" in v:
            out[k] = shrink_dict(v, (extra or {}).get(k))
        elif k in SIZE and ((v is None and k in NONE_OK) or (isinstance(v, int) and not isinstance(v, bool))):
            out[k] = SIZE[k]
        elif k in SIZE and isinstance(v, list) and v and all(isinstance(x, int) for x in v):
            out[k] = [SIZE[k]] * LAYERS
        elif k in TOKEN_FIELDS and isinstance(v, int) and v >= 64:
            out[k] = SMALL_TOKEN_IDS.get(k, 3)
        elif k in TOKEN_FIELDS and isinstance(v, list):
            out[k] = [2]
        elif isinstance(v, list) and n_default and len(v) == n_default and n_default > LAYERS:
            layer_lists[k] = _shrink_layer_list(v)

    # The longest list of layer kinds sets the layer count; other per-layer lists are cycled to it.
    n = max((len(v) for v in layer_lists.values() if all(isinstance(x, str) for x in v)), default=None)
    out.update(layer_lists)
    if n:
        for k in LAYER_COUNT_KEYS:
            if k in out:
                out[k] = n
        for k, v in layer_lists.items():
            if len(v) < n:
                out[k] = (v * n)[:n]

    # MLA: every head has its own latent K/V; the rope part sets head_dim.
    if "kv_lora_rank" in out and "num_key_value_heads" in out:
        out["num_key_value_heads"] = HEADS
    if "qk_rope_head_dim" in out and "head_dim" in out:
        out["head_dim"] = out["qk_rope_head_dim"]

    if extra:
        # Overrides of a nested config were applied by the recursive call.
        out.update({k: v for k, v in extra.items()
                    if not (isinstance(v, dict) and isinstance(d.get(k), dict) and "model_type" in d[k])})
    return out


def config_for(name: str):
    """The architecture's default config, shrunk."""
    cfg_cls = getattr(transformers, CONFIG_MAPPING_NAMES[name])
    return cfg_cls(**shrink_dict(cfg_cls().to_dict(), EXTRA.get(name)))


def build(name: str) -> torch.nn.Module:
    """A tiny ``eval()`` model of architecture ``name`` with random weights (seed 0): the same
    weights in every process, which is what the multi-rank check relies on.

    Raises ``Skip`` for the architectures in ``SKIP``.  A composite config (vision-language or
    audio wrapper) is replaced by its text sub-config when the causal-LM class takes that one.
    """
    if name in SKIP:
        raise Skip(SKIP[name])
    cls = getattr(transformers, class_name(name))
    cfg = config_for(name)
    want = getattr(cls, "config_class", None)
    if want is not None and not isinstance(cfg, want) and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    torch.manual_seed(0)
    model = cls(cfg).eval()
    if name == "xmod":  # X-MOD routes through per-language adapters and needs one chosen
        model.set_default_language(cfg.languages[0] if getattr(cfg, "languages", None) else "en_XX")
    return model


def inputs() -> tuple[tuple, dict]:
    """``(args, kwargs)`` of the call every model gets: ids (2, 8) in [3, VOCAB) -- above the special
    token ids -- from a fixed seed, without a KV cache."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 8), generator=g)
    return (ids,), {"use_cache": False}
