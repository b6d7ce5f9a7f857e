"""Published model architectures built with random weights, for benchmarking a model too large to
have on disk: valid for speed and memory only (their perplexity means nothing)."""

import json
from pathlib import Path

RANDOM_MARKER = "random-weights.json"   # in a model directory made here
SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
}


def build_shape_model(shape: str, tokenizer_dir: Path, shape_dir: Path) -> Path:
    """Save a model of `shape` with random bf16 weights (once) so every mode loads it like a real one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    path = shape_dir / f"{shape}-random"
    if not (path / RANDOM_MARKER).is_file():
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape]), dtype=torch.bfloat16)
        model.save_pretrained(path)
        AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True).save_pretrained(path)
        (path / RANDOM_MARKER).write_text(json.dumps({"shape": shape, "seed": 0}))
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()    # the workers need the GPU memory, not this process
    return path
