"""Smaller models made from the teacher and saved as Hugging Face directories the handler can
serve (model_path): magnitude pruning of the decoder's linear layers (unstructured or 2:4) and a
distilled student with half the teacher's layers. Knows nothing about timing, ONNX or MLflow."""

import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    return model, AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def decoder_linears(model) -> list[torch.nn.Linear]:
    """The decoder layers' projections; the embedding (tied to the LM head) stays dense."""
    return [getattr(block, name) for layer in model.model.layers
            for block in (layer.self_attn, layer.mlp) for name in LINEARS if hasattr(block, name)]


def sparsity_mask(weight: torch.Tensor, sparsity: float | str) -> torch.Tensor:
    """True where a weight is kept. A fraction: the smallest |w| of the matrix go (unstructured);
    "2:4": the two smallest |w| of every four consecutive inputs of a row go (semi-structured)."""
    if sparsity == "2:4":
        groups = weight.abs().reshape(weight.shape[0], -1, 4)                 # [out, in / 4, 4]
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
        return keep.reshape(weight.shape)
    if isinstance(sparsity, float) and 0 < sparsity < 1:
        num_pruned = int(weight.numel() * sparsity)
        threshold = weight.abs().flatten().kthvalue(num_pruned).values
        return weight.abs() > threshold
    raise ValueError(f"sparsity must be a fraction in (0, 1) or '2:4', got {sparsity!r}")


@torch.no_grad()
def prune(model, sparsity: float | str) -> float:
    """Zero the pruned weights in place; returns the fraction of decoder weights now zero."""
    num_zero = num_all = 0
    for linear in decoder_linears(model):
        linear.weight.mul_(sparsity_mask(linear.weight, sparsity))
        num_zero += int((linear.weight == 0).sum())
        num_all += linear.weight.numel()
    return num_zero / num_all


def sparse_kernel_check(model) -> str:
    """Whether this machine has a 2:4 sparse kernel: torch's semi-structured sparse tensors run on
    CUDA only (cuSPARSELt / CUTLASS); the answer is what torch says when asked on this device."""
    weight = decoder_linears(model)[0].weight
    try:
        sparse = torch.sparse.to_sparse_semi_structured(weight.to(torch.bfloat16))
        torch.mm(sparse, torch.ones(weight.shape[1], 8, dtype=torch.bfloat16))
        return "ok"
    except (RuntimeError, NotImplementedError, ValueError, AssertionError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def half_layers(teacher):
    """A student holding every other decoder layer of the teacher (0, 2, 4, ...), the embedding,
    final norm and LM head too: the teacher's weights are its starting point."""
    student = copy.deepcopy(teacher)
    kept = list(student.model.layers)[::2]
    for index, layer in enumerate(kept):
        layer.self_attn.layer_idx = index              # the KV cache is indexed by it
    student.model.layers = torch.nn.ModuleList(kept)
    student.config.num_hidden_layers = len(kept)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = student.config.layer_types[::2]
    return student


def distill_loss(student_logits, teacher_logits, labels, temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(teacher || student) at temperature T + (1 - alpha) * next-token loss."""
    V = student_logits.shape[-1]
    kl = F.kl_div(F.log_softmax(student_logits.reshape(-1, V) / temperature, -1),
                  F.log_softmax(teacher_logits.reshape(-1, V) / temperature, -1), log_target=True,
                  reduction="batchmean") * temperature ** 2
    ce = F.cross_entropy(student_logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    return alpha * kl + (1 - alpha) * ce


def distill(teacher, train_ids: list[int], settings: dict, seed: int, on_step=None):
    """Train half_layers(teacher) on windows of train_ids drawn at random for settings["minutes"]
    (AdamW, linear warm-up, bf16 autocast where the CPU has it). on_step(step, loss, seconds)."""
    torch.manual_seed(seed)
    teacher.eval()
    student = half_layers(teacher).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=settings["lr"], weight_decay=0.0)
    seq_len, batch_size, warmup = settings["seq_len"], settings["batch_size"], settings["warmup_steps"]
    data = torch.tensor(train_ids[:len(train_ids) // seq_len * seq_len]).view(-1, seq_len)   # [N, T]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=torch.backends.mkldnn.is_available())
    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < settings["minutes"] * 60:
        batch = data[torch.randint(len(data), (batch_size,))]
        with autocast:
            with torch.no_grad():
                teacher_logits = teacher(batch).logits.float()
            loss = distill_loss(student(batch).logits.float(), teacher_logits, batch,
                                settings["temperature"], settings["alpha"])
        for group in optimizer.param_groups:
            group["lr"] = settings["lr"] * min(1.0, (step + 1) / warmup)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        step += 1
        value = float(loss.detach())
        assert math.isfinite(value), f"distillation diverged at step {step}"
        if on_step is not None:
            on_step(step, value, time.perf_counter() - start)
    return student.eval(), {"steps": step, "tokens": step * batch_size * seq_len,
                            "train_s": time.perf_counter() - start}
