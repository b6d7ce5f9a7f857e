from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer (local files made by scripts/prepare_model.py)."""
    if not (MODEL_DIR / "tokenizer.json").is_file():
        pytest.skip("model not prepared: run make mar")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny randomly initialised Llama with the real tokenizer, saved as a local HF directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.3, eos_token_id=tokenizer.eos_token_id, bos_token_id=1,
                         pad_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def person_model():
    """A pydantic model with an optional field and a list of nested models, and the schema the openai
    client sends for it in .parse() (strict: $defs, $ref, anyOf)."""
    from typing import Optional

    import pydantic
    from openai.lib._pydantic import to_strict_json_schema

    class Pet(pydantic.BaseModel):
        name: str
        kind: str

    class Person(pydantic.BaseModel):
        name: str
        age: Optional[int] = None
        pets: list[Pet]
        boss: Optional["Person"] = None

    return Person, to_strict_json_schema(Person)


@pytest.fixture(scope="session")
def meeting_model():
    """A pydantic model of what a schema now holds beyond the basics (a datetime, a pattern, float
    bounds, a dict, a tuple, a discriminated union), and the strict schema the openai client sends."""
    import datetime
    from typing import Literal, Union

    import pydantic
    from openai.lib._pydantic import to_strict_json_schema

    class Cat(pydantic.BaseModel):
        kind: Literal["cat"]
        meows: int

    class Dog(pydantic.BaseModel):
        kind: Literal["dog"]
        barks: bool

    class Meeting(pydantic.BaseModel):
        topic: str
        starts: datetime.datetime
        room: str = pydantic.Field(pattern=r"^[A-Z]\d{2}$")
        confidence: float = pydantic.Field(ge=0, le=1)
        votes: dict[str, int]
        span: tuple[int, int]
        pet: Union[Cat, Dog] = pydantic.Field(discriminator="kind")

    return Meeting, to_strict_json_schema(Meeting)
