"""The model as ONNX with its KV cache, run by ONNX Runtime's CPU provider: export (torch.onnx's
dynamo exporter: optimum's needs transformers < 4.58, we pin 5.23), ORT's dynamic int8
quantization, greedy generation and the loss perplexity is scored with. Knows nothing about the
engine, MLflow or the other variants."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F


class CachedStep(torch.nn.Module):
    """One forward over new tokens with the past keys and values as plain tensors, so the graph's
    inputs and outputs are tensors ONNX can name: (input_ids, past_keys, past_values) ->
    (logits, keys, values), the keys and values holding the past and the new tokens."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers

    def forward(self, input_ids, past_keys, past_values):   # input_ids: [B, T]; past_*: [L, B, Hkv, P, D]
        from transformers import DynamicCache

        B, T = input_ids.shape
        P = past_keys.shape[3]
        cache = DynamicCache(ddp_cache_data=[(past_keys[i], past_values[i]) for i in range(self.num_layers)])
        positions = torch.arange(P, P + T).unsqueeze(0).expand(B, T)
        out = self.model(input_ids=input_ids, past_key_values=cache, position_ids=positions, use_cache=True)
        layers = out.past_key_values.layers
        return (out.logits, torch.stack([layer.keys for layer in layers]),
                torch.stack([layer.values for layer in layers]))


def empty_past(config, batch_size: int, length: int = 0) -> np.ndarray:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return np.zeros((config.num_hidden_layers, batch_size, config.num_key_value_heads, length, head_dim), np.float32)


def export(model_dir: Path, path: Path) -> None:
    """model_dir's fp32 weights as one ONNX file, batch, new tokens and past length dynamic."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    step = CachedStep(model)
    # example inputs, every size named below dynamic; keys and values must be two tensors, or the
    # exporter takes them for one input and reads the values as keys
    keys, values = (torch.randn(empty_past(model.config, 2, 3).shape) for _ in range(2))
    batch, new, past_len = (torch.export.Dim(n, max=4096) for n in ("batch", "new_tokens", "past"))
    torch.onnx.export(step, (torch.ones(2, 5, dtype=torch.long), keys, values), str(path), dynamo=True,
                      input_names=["input_ids", "past_keys", "past_values"], output_names=["logits", "keys", "values"],
                      dynamic_shapes={"input_ids": {0: batch, 1: new}, "past_keys": {1: batch, 3: past_len},
                                      "past_values": {1: batch, 3: past_len}},
                      external_data=False, verbose=False)


def quantize_int8(fp32_path: Path, path: Path) -> None:
    """ORT's dynamic quantization: int8 weights of every MatMul, a scale per output column (ORT's
    finer option; per tensor did worse: figures in 30fbb99's message), activations quantized per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32_path), str(path), weight_type=QuantType.QInt8, per_channel=True)


class OrtModel:
    def __init__(self, path: Path, config) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.config = config

    def forward(self, input_ids: np.ndarray, past_keys: np.ndarray, past_values: np.ndarray):
        return self.session.run(None, {"input_ids": input_ids, "past_keys": past_keys, "past_values": past_values})

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy answers of exactly max_new_tokens to prompts of one length (no padding), decoded together."""
        assert len({len(p) for p in prompts}) == 1, "greedy() takes prompts of one length"
        ids = np.array(prompts, dtype=np.int64)                           # [B, T]
        keys = values = empty_past(self.config, len(prompts))
        out = []
        for _ in range(max_new_tokens):
            logits, keys, values = self.forward(ids, keys, values)
            ids = logits[:, -1].argmax(-1)[:, None].astype(np.int64)       # [B, 1]
            out.append(ids[:, 0])
        return np.stack(out, 1).tolist()

    def loss(self, x: torch.Tensor, labels: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        """benchmarks.measure.perplexity's model interface: mean next-token loss over labels != -100."""
        past = empty_past(self.config, 1)
        logits = torch.from_numpy(self.forward(x.numpy(), past, past)[0])   # [1, T, V]
        return SimpleNamespace(loss=F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100))
