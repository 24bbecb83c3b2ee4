"""Small helpers shared by rlkd's evaluation tests (tiny random models, local tokenizers)."""

from __future__ import annotations

from pathlib import Path

LLAMA2_TOKENIZER = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tokenizers" / "llama2"


def llama2_tokenizer_dir() -> Path | None:
    from rlkd.paths import default_data_dir

    data = default_data_dir()
    candidate = data / "tokenizers" / "llama2" if data is not None else LLAMA2_TOKENIZER
    return candidate if (candidate / "tokenizer.json").is_file() else None


def tiny_llama(seed: int = 0, vocab_size: int = 32000, layers: int = 2, hidden: int = 32):
    """A randomly initialised LLaMA small enough to run in milliseconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def save_tiny_checkpoint(directory: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Save a tiny LLaMA plus the given tokenizer as a loadable HF checkpoint directory."""
    from transformers import AutoTokenizer

    tiny_llama(seed).save_pretrained(directory)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    return Path(directory)
