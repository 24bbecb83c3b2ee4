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
    from rlkd.factory import tiny_llama_model

    return tiny_llama_model(vocab_size=vocab_size, hidden=hidden, layers=layers, heads=4, seed=seed,
                            max_positions=1024).eval()


def save_tiny_checkpoint(directory: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Save a tiny LLaMA plus the given tokenizer as a loadable HF checkpoint directory."""
    from transformers import AutoTokenizer

    tiny_llama(seed).save_pretrained(directory)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    return Path(directory)
