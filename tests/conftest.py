"""Test setup: 8 fake CPU devices (set before jax is imported) and tiny Hugging Face checkpoints."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

FAMILIES = ("llama", "qwen2", "qwen3")


def tiny_hf_config(family: str, **overrides):
    """A small random-weight config of each family (2 layers, width 64) as transformers builds it."""
    import transformers

    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    if family == "llama":  # Llama 3 frequency scaling, untied head
        return transformers.LlamaConfig(**{"rope_theta": 500000.0, "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}, **kw})
    if family == "qwen2":  # q/k/v bias, tied embeddings
        return transformers.Qwen2Config(**{"tie_word_embeddings": True, **kw})
    if family == "qwen3":  # q/k norm, explicit head_dim != hidden/heads
        return transformers.Qwen3Config(**{"head_dim": 32, **kw})
    raise ValueError(family)


def make_hf_model(family: str, seed: int = 0, std: float = 0.2, **overrides):
    """A transformers torch model with random weights (std large enough for peaked, tie-free logits)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_hf_config(family, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, std)
    return model.eval()


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """family -> (folder written by save_pretrained, the torch model)."""
    out = {}
    for fam in FAMILIES:
        model = make_hf_model(fam)
        folder = tmp_path_factory.mktemp(f"hf_{fam}")
        model.save_pretrained(folder)
        out[fam] = (folder, model)
    return out
