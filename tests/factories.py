"""Small real models for tests, made on the fly (random init; for plumbing, never for accuracy).

Accuracy assertions use the trained reference models (trtconv.data.reference_models) instead: on a
random model the logits are near uniform and top-1 agreement is noise.
"""

from __future__ import annotations

from pathlib import Path

import torch

_TOKENIZER_TEXT = [
    "def main(argv):\n    return parse(argv)\n",
    "Return the number of items in a container.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "class Parser:\n    '''Parse command line arguments.'''\n",
    "Raise ValueError if the value is negative; otherwise return its square root.",
]


# `trtconv calibrate` arguments for plumbing runs on random tiny models: small and fast, the accuracy gate
# relaxed (random models give noise; accuracy is asserted on the trained reference models).
PLUMBING_ARGS = [
    "--num-samples", "4", "--seq-len", "64", "--batch-size", "4",
    "--set", "evaluate.num_samples=8", "--set", "evaluate.seq_len=64",
    "--set", "evaluate.allow_inconclusive=true",
    "--set", "evaluate.gates.max_ppl_increase_pct=1000", "--set", "evaluate.gates.max_kl=100",
    "--set", "evaluate.gates.min_top1_agreement=0",
]


# A chat template as real instruct models ship one (ChatML, like SmolLM2 / Qwen2): it must reach the
# artifact's tokenizer/ so a runtime can format conversations.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tokenizer(out_dir: Path, vocab_size: int = 512, chat_template: str | None = None):
    """A byte-level BPE tokenizer trained on a few lines, saved as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TOKENIZER_TEXT * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(out_dir)
    return fast


def tiny_config(arch: str = "llama", vocab_size: int = 512, **overrides):
    """Config of a tiny model whose Linear dims are multiples of 128 (so AWQ group 128 applies)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if arch == "llama":
        # Llama-3 style rope (theta 500000, llama3 scaling) like the reference model, so a dropped
        # rotary setting shows.
        from trtconv.data.reference_models import LLAMA3_ROPE

        return LlamaConfig(rope_parameters=dict(LLAMA3_ROPE), **common)
    if arch == "qwen2":
        return Qwen2Config(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **common)
    if arch == "mistral":
        # No sliding window unless asked for (sliding_window=16): Mistral-7B v0.1 has 4096.
        return MistralConfig(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **{"sliding_window": None, **common})
    if arch in NEW_FAMILY_CONFIGS:
        return NEW_FAMILY_CONFIGS[arch](common)
    raise ValueError(f"unknown arch {arch!r}; known: {', '.join(TINY_ARCHS)}")


def _qwen3(common: dict):
    from transformers import Qwen3Config

    return Qwen3Config(head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **common)


def _gemma3(common: dict):
    # Gemma 3's text model: local (window 16) and global layers interleaved with their own rope bases,
    # q/k norms, (1+w) norms, scaled embeddings. 3 layers: sliding, sliding, full.
    from transformers import Gemma3TextConfig

    fields = {**common, "num_hidden_layers": 3, "tie_word_embeddings": True}  # every real Gemma ties its head
    return Gemma3TextConfig(head_dim=32, sliding_window=16, query_pre_attn_scalar=32,
                            layer_types=["sliding_attention", "sliding_attention", "full_attention"], **fields)


def _gemma2(common: dict):
    # Gemma 2: attention and final-logit soft-capping, alternating windowed and full layers.
    from transformers import Gemma2Config

    fields = {**common, "tie_word_embeddings": True}
    return Gemma2Config(head_dim=32, sliding_window=16, query_pre_attn_scalar=32, attn_logit_softcapping=50.0,
                        final_logit_softcapping=30.0, **fields)


def _phi3(common: dict):
    # Phi-3 / Phi-4: qkv_proj and gate_up_proj fused in the checkpoint itself; LongRoPE scaling.
    from transformers import Phi3Config

    fields = {k: v for k, v in common.items() if k != "max_position_embeddings"}
    half = 128 // 4 // 2  # head_dim / 2 factors
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * half,
            "long_factor": [1.5] * half, "original_max_position_embeddings": 256}
    return Phi3Config(max_position_embeddings=512, original_max_position_embeddings=256, rope_parameters=rope,
                      pad_token_id=0, **fields)


def _mixtral(common: dict):
    # 4 experts, top-2 (Mixtral's softmax over all experts, renormalised over the chosen two).
    from transformers import MixtralConfig

    fields = {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None, **common}
    return MixtralConfig(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **fields)


def _qwen3_moe(common: dict):
    # 4 experts, top-2, expert width 128 (moe_intermediate_size), q/k norms; norm_topk_prob off as in
    # Qwen3-MoE's config default, so the executor's routing must not renormalise; layer 1 is dense
    # (mlp_only_layers) so both kinds of MLP are converted.
    from transformers import Qwen3MoeConfig

    fields = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128, "norm_topk_prob": False,
              "mlp_only_layers": [1], **common}
    return Qwen3MoeConfig(head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **fields)


def _deepseek_v3(common: dict):
    # DeepSeek-V3: MLA attention (q and kv through low-rank projections with their own norms, a decoupled rope
    # part; q/k head 48, v head 32), layer 0 dense (first_k_dense_replace), layers 1-2 MoE: 8 routed experts of
    # width 64 in 2 groups, top-2 within the best group (n_group / topk_group: group-limited sigmoid routing with
    # e_score_correction_bias, made non-zero by make_tiny_model), plus one shared expert.
    from transformers import DeepseekV3Config

    defaults = {"n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1, "q_lora_rank": 64, "kv_lora_rank": 32,
                "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 32,
                # what the hub's config.json says and vLLM reads (transformers always routes so, whatever they say)
                "topk_method": "noaux_tc", "scoring_func": "sigmoid"}
    fields = {**defaults, **common, "num_hidden_layers": 3, "num_key_value_heads": common["num_attention_heads"]}  # MLA: kv heads = heads
    return DeepseekV3Config(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **fields)


def _route_bias(model) -> None:
    """DeepSeek-V3's routers add e_score_correction_bias (a buffer, zero at init) to the scores that pick the
    experts: a trained model's is not zero, and a reader that leaves it at zero must show."""
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.2 * torch.randn_like(buffer))


NEW_FAMILY_CONFIGS = {"qwen3": _qwen3, "gemma3": _gemma3, "gemma2": _gemma2, "phi3": _phi3,
                      "mixtral": _mixtral, "qwen3_moe": _qwen3_moe, "deepseek_v3": _deepseek_v3}
MOE_FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v3")
# What a family's random init leaves unlike a trained model, set after it is made.
AFTER_INIT = {"deepseek_v3": _route_bias}

# Every architecture family of trtconv.architectures has a tiny factory (tests/test_registries.py checks).
TINY_ARCHS = ("llama", "qwen2", "mistral", *NEW_FAMILY_CONFIGS)


def make_tiny_model(out_dir: Path, arch: str = "llama", dtype: torch.dtype = torch.bfloat16, seed: int = 0, **overrides) -> Path:
    """Save a random-init tiny model + tokenizer as a normal HF folder and return its path."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out_dir)
    cfg = tiny_config(arch, vocab_size=len(tok), **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    AFTER_INIT.get(arch, lambda m: None)(model)
    model.to(dtype).save_pretrained(out_dir)
    return out_dir


def make_windowed_mistral(llama_dir: Path, out_dir: Path, sliding_window: int) -> Path:
    """A trained MistralForCausalLM with a sliding window: the trained reference Llama's weights
    (the same tensor layout) under a Mistral config. Its logits are peaked enough for accuracy
    assertions (a random tiny model's are not); the window only narrows what each token sees."""
    import json
    import shutil

    out_dir = Path(out_dir)
    shutil.copytree(llama_dir, out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=sliding_window)
    for key in ("attention_bias", "mlp_bias", "pretraining_tp"):  # Llama-only keys
        config.pop(key, None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def make_real_shaped_model(out_dir: Path, arch: str = "llama", seed: int = 0) -> Path:
    """A tiny model with the shapes real pretrained models have and the reference models lack:
    tied input/output embeddings, head_dim (48) != hidden / heads (128 / 4 = 32), a vocabulary that
    is not a multiple of 64 (517, larger than the tokenizer's: unused rows, as in real checkpoints),
    and a chat template in the tokenizer. o_proj's input (4 x 48 = 192) takes AWQ group 64, not 128."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    make_tokenizer(out_dir, chat_template=CHAT_TEMPLATE)
    cfg = tiny_config(arch, vocab_size=517, tie_word_embeddings=True, head_dim=48)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    model.save_pretrained(out_dir)
    return out_dir


def make_moe_with_unrouted_expert(out_dir: Path, arch: str = "mixtral") -> Path:
    """A tiny MoE model (5 experts, top-2) whose layer-0 router never picks expert 4, whatever the text.

    Layer 0's MoE input keeps one feature (post-attention norm weight 1 there, 0 elsewhere) and the router
    reads only it with weights [2, 1, -1, -2, 0]: a positive feature ranks experts 0, 1 first, a negative
    one 3, 2; expert 4 (0) is always third. The other experts and layers are as made.
    DeepSeek-V3 (layer 0 dense, 8 experts in 2 groups): layer 1's e_score_correction_bias of expert 4 is -1000;
    its router picks by score + bias (scores in (0, 1)), so expert 4 is never among the top-k."""
    from transformers import AutoModelForCausalLM

    if arch == "deepseek_v3":
        return _deepseek_with_unrouted_expert(Path(out_dir))
    key = "num_local_experts" if arch == "mixtral" else "num_experts"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size=len(tok), **{key: 5}))
    layer = model.model.layers[0]
    with torch.no_grad():
        layer.post_attention_layernorm.weight.zero_()
        layer.post_attention_layernorm.weight[5] = 1.0
        layer.mlp.gate.weight.zero_()
        layer.mlp.gate.weight[:, 5] = torch.tensor([2.0, 1.0, -1.0, -2.0, 0.0])
    model.to(torch.bfloat16).save_pretrained(out_dir)
    return out_dir


def _deepseek_with_unrouted_expert(out_dir: Path) -> Path:
    make_tiny_model(out_dir, "deepseek_v3")
    from safetensors.torch import load_file, save_file

    tensors = load_file(out_dir / "model.safetensors")
    tensors["model.layers.1.mlp.gate.e_score_correction_bias"][4] = -1000.0
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir
