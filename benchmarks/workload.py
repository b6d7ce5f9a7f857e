"""The workload every measurement sends: three templates (chat, code, summarize) filled from the
same questions and WikiText-2 text (data/wikitext-2), either as the load test's seeded mix of
short requests or as the benchmark's prompts cut to an exact token count; and the max_new_tokens
distribution. Knows nothing about Locust, HTTP, models or clocks."""

import random
import re
from pathlib import Path

WIKITEXT = Path(__file__).resolve().parent.parent / "data" / "wikitext-2"
TEMPLATES = ("chat", "code", "summarize")
CHAT_QUESTIONS = (
    "What is the capital of France?",
    "Why is the sky blue?",
    "How many legs does a spider have?",
    "What is the difference between weather and climate?",
    "Give me three tips for sleeping better.",
    "Who wrote Pride and Prejudice?",
    "What does a bee do in a hive?",
    "How do I boil an egg?",
    "What is photosynthesis?",
    "Name three planets in the solar system.",
    "Why do leaves change colour in autumn?",
    "What is a good name for a pet goldfish?",
    "How far is the Moon from the Earth?",
    "What is the boiling point of water at sea level?",
    "Explain what a rainbow is in one sentence.",
    "What are the primary colours?",
)
CODE_REQUESTS = (
    "Write a Python function that reverses a string.",
    "Write a Python function that checks whether a number is prime.",
    "Write a SQL query that counts the rows of a table named orders.",
    "Write a JavaScript function that returns the largest number in an array.",
    "Write a Python function that reads a CSV file and prints the first line.",
    "Explain what a Python list comprehension is, with an example.",
    "Write a bash command that counts the lines in every .txt file of a folder.",
    "Write a Python class for a stack with push and pop.",
    "Write a Python function that computes the factorial of n.",
    "Write a regular expression that matches an email address.",
)
SUMMARIZE = "Summarize this article in three sentences."
CODE_SNIPPETS = (   # the code an exact-length code prompt is padded with
    "def scale_{k}(values):\n    total = 0\n    for v in values:\n        total += v * {k}\n    return total\n\n",
    "class Counter{k}:\n    def __init__(self):\n        self.counts = {{}}\n\n    def add(self, key):\n"
    "        self.counts[key] = self.counts.get(key, 0) + {k}\n\n",
    "def find_{k}(items, target):\n    for i, item in enumerate(items):\n        if item == target:\n"
    "            return i + {k}\n    return -1\n\n",
)
HEADING = re.compile(r"^ = [^=].* = $")   # a top-level WikiText heading: one article starts here


def load_articles(path: Path, num_words: int = 200, max_articles: int = 200) -> list[str]:
    """The opening num_words words of each WikiText article that has that many."""
    if not path.is_file():
        raise ValueError(f"WikiText file {str(path)!r} not found; set --wikitext to its path")
    articles, current = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if HEADING.match(line):
            articles.append(current)
            current = []
        elif line.strip() and not line.strip().startswith("="):
            # undo WikiText's tokenization of numbers and hyphens ("1 @,@ 000" -> "1,000")
            current.extend(line.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".").split())
    articles.append(current)
    texts = [" ".join(words[:num_words]) for words in articles if len(words) >= num_words]
    if not texts:
        raise ValueError(f"no article of {num_words} words or more in {str(path)!r}")
    return texts[:max_articles]


def parse_tokens_spec(spec: str) -> tuple[int, int]:
    """"64" -> (64, 64); "16-256" -> (16, 256): max_new_tokens is drawn uniformly from the range."""
    low, _, high = str(spec).partition("-")
    try:
        bounds = (int(low), int(high or low))
    except ValueError:
        raise ValueError(f"max_new_tokens must be N or LOW-HIGH, got {spec!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise ValueError(f"max_new_tokens must satisfy 1 <= LOW <= HIGH, got {spec!r}")
    return bounds


class PromptMix:
    """One user's seeded stream of request bodies: the same seed gives the same sequence."""

    def __init__(self, seed: int, articles: list[str], max_new_tokens: tuple[int, int]) -> None:
        self.rng = random.Random(seed)
        self.articles = articles
        self.max_new_tokens = max_new_tokens

    def _body(self, content: str) -> dict:
        return {"messages": [{"role": "user", "content": content}],
                "max_new_tokens": self.rng.randint(*self.max_new_tokens)}

    def chat(self) -> dict:
        return self._body(self.rng.choice(CHAT_QUESTIONS))

    def code(self) -> dict:
        return self._body(self.rng.choice(CODE_REQUESTS))

    def summarize(self) -> dict:
        return self._body(f"{SUMMARIZE}\n\n{self.rng.choice(self.articles)}")


def exact_prompt(tokenizer, text: str, index: int, length: int) -> tuple[str, list[int]]:
    """Prompt `index` of a length: its template (cycling through TEMPLATES) and exactly `length`
    token ids, filled from `text` at a place that depends on the index. The head is cut to fit;
    the tail (what the model answers) is always kept whole."""
    template = TEMPLATES[index % len(TEMPLATES)]
    start = text.find("\n", (index * 7919 * 8) % max(1, len(text) - length * 8)) + 1
    article = text[start:start + length * 8]       # WikiText averages ~4 characters per token
    if template == "chat":
        head = f"User: {CHAT_QUESTIONS[index % len(CHAT_QUESTIONS)]} Here is some background:\n{article}"
        tail = "\nAssistant:"
    elif template == "code":
        head = "# A small module of helpers.\n\n" + "".join(
            CODE_SNIPPETS[(index + k) % len(CODE_SNIPPETS)].format(k=index * 100 + k) for k in range(length // 20 + 1))
        tail = f"\n# {CODE_REQUESTS[index % len(CODE_REQUESTS)]}\n"
    elif template == "summarize":
        head, tail = f"{SUMMARIZE}\n\n{article}", "\n\nSummary:"
    else:
        raise ValueError(f"unknown template {template!r}")
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"][:length - len(tail_ids)]
    assert len(head_ids) + len(tail_ids) == length, f"{template} head too short for {length} tokens"
    return template, head_ids + tail_ids
