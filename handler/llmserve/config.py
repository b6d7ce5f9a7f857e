"""The engine's one frozen config, built from the `handler:` section of model-config.yaml or from
a script's flags, validated once. Facts learned at start-up live in ModelFacts, never here."""

from dataclasses import dataclass, fields

QUANTIZATION_MODES = ("fp32", "fp16", "bf16", "int8", "nf4", "fp4", "w8", "w4")
DEVICES = ("auto", "cpu", "cuda")
BATCHING_MODES = ("continuous", "request_level")
KV_CACHE_DTYPES = ("auto", "fp32", "fp16")
PREFIX_BLOCK = 8   # tokens a prefix-cache block holds (prefix_cache.py): a prompt's last partial block is
                   # computed again, ~half a block a prompt


@dataclass(frozen=True)
class EngineConfig:
    model_path: str                   # local Hugging Face directory; nothing is fetched from a hub
    quantization: str = "bf16"        # one of QUANTIZATION_MODES
    device: str = "auto"              # auto = cuda when available, else cpu
    batching: str = "continuous"      # continuous: join the running batch at the next step;
                                      # request_level: wait until the whole running batch is done
    max_model_len: int = 2048         # prompt + generated tokens per sequence (KV cache rows)
    max_num_seqs: int = 64            # sequences decoded together at most (KV cache slots)
    kv_budget_tokens: int = 0         # tokens the KV cache may hold in all; 0 = slots x max_model_len
    max_prefill_tokens: int = 4096    # prompt tokens prefilled in one step (at least one prompt)
    prefill_chunk_tokens: int = 0     # a longer standard or batch prompt, in a step that also decodes,
                                      # is computed this many tokens a step (a multiple of PREFIX_BLOCK; needs the
                                      # prefix cache, which holds the chunks); 0 = whole prompts only
    max_new_tokens_cap: int = 1024    # largest max_new_tokens a request may ask for
    default_max_new_tokens: int = 128 # used when a request does not say
    num_threads: int = 0              # torch intra-op threads on CPU; 0 = leave torch's default
    packed_max_rows: int = -1         # w8/w4: steps of at most this many rows use the packed kernels,
                                      # larger ones the float weights; -1 = measure at start-up
    max_waiting_requests: int = 0     # requests queued for a slot at most; beyond it add_request refuses
                                      # (the handler's 503 overloaded); 0 = unbounded
    max_queue_wait_s: float = 0.0     # a request not started after this long ends "queue_timeout"
                                      # (the handler's 503); 0 = no limit
    compile: bool = False             # w8/w4: fuse the decode steps: our C++ decoder step (every
                                      # step) where our 4-bit kernel runs every projection, else each
                                      # packed-kernel step's layers torch.compile'd at start-up
                                      # (other modes run eagerly)
    prefix_cache_tokens: int = 0      # prompt prefix tokens whose keys and values are kept for reuse
                                      # (blocks of PREFIX_BLOCK, least recently used evicted); 0 = off
    spec_tokens: int = 0              # speculative decoding by prompt lookup: draft tokens per step at
                                      # most for each request (see speculative.py); 0 = off
    spec_lookup_min: int = 2          # the n-gram sizes looked up, longest first
    spec_lookup_max: int = 3
    spec_max_rows: int = 3            # speculate while sequences x (1 + draft) fit in this many rows
                                      # (w8/w4: and in the packed kernels' rows)
    priority_ageing_s: float = 60.0   # a waiting request ranks one tier higher per this many seconds
                                      # since it arrived (scheduler.py); 0 = never
    kv_prefault: bool = False         # CPU: map the whole KV cache into memory at start-up (its full
                                      # size resident at once) instead of page by page as rows first use it
    kv_cache_dtype: str = "auto"      # auto: fp16 where our C++ decoder step runs (w4, compile), else the
                                      # activations' dtype; fp16 / fp32 insist (an error where the step
                                      # cannot take it)

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATION_MODES:
            raise ValueError(f"quantization must be one of {QUANTIZATION_MODES}, got {self.quantization!r}")
        if self.batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {BATCHING_MODES}, got {self.batching!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if not isinstance(self.model_path, str) or not self.model_path:
            raise ValueError(f"model_path must be a non-empty string, got {self.model_path!r}")
        for name in ("max_model_len", "max_num_seqs", "max_prefill_tokens", "max_new_tokens_cap",
                     "default_max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.packed_max_rows, int) or isinstance(self.packed_max_rows, bool) \
                or self.packed_max_rows < -1:
            raise ValueError(f"packed_max_rows must be -1 (measure) or a non-negative integer, got {self.packed_max_rows!r}")
        for name in ("compile", "kv_prefault"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("max_queue_wait_s", "priority_ageing_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a non-negative number of seconds, got {value!r}")
        for name in ("kv_budget_tokens", "num_threads", "max_waiting_requests", "prefix_cache_tokens",
                     "spec_tokens", "spec_max_rows", "prefill_chunk_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in (self.spec_lookup_min, self.spec_lookup_max)) \
                or not 1 <= self.spec_lookup_min <= self.spec_lookup_max:
            raise ValueError(f"spec_lookup_min and spec_lookup_max must be integers with 1 <= min <= max, got "
                             f"{self.spec_lookup_min!r} and {self.spec_lookup_max!r}")
        if self.prefill_chunk_tokens % PREFIX_BLOCK or (self.prefill_chunk_tokens and not self.prefix_cache_tokens):
            raise ValueError(f"prefill_chunk_tokens must be a multiple of {PREFIX_BLOCK} (the prefix cache's blocks) and needs "
                             f"prefix_cache_tokens > 0, got {self.prefill_chunk_tokens!r} with prefix_cache_tokens="
                             f"{self.prefix_cache_tokens!r}")
        if self.default_max_new_tokens > self.max_new_tokens_cap:
            raise ValueError(f"default_max_new_tokens ({self.default_max_new_tokens}) exceeds "
                             f"max_new_tokens_cap ({self.max_new_tokens_cap})")
        if self.kv_budget_tokens and self.kv_budget_tokens < self.max_model_len:
            raise ValueError(f"kv_budget_tokens ({self.kv_budget_tokens}) must hold one whole sequence "
                             f"(max_model_len={self.max_model_len})")

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv_budget_tokens or self.max_num_seqs * self.max_model_len

    @classmethod
    def from_dict(cls, section: dict) -> "EngineConfig":
        """Build from the `handler:` section; unknown keys are an error, not a silent no-op."""
        if not isinstance(section, dict):
            raise ValueError(f"handler section must be a mapping, got {type(section).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"unknown handler config keys {unknown}; known keys are {sorted(known)}")
        if "model_path" not in section:
            raise ValueError("handler config needs model_path")
        return cls(**section)
