"""Speculative decoding by prompt lookup: the draft for a sequence's next tokens is what followed the
last earlier occurrence of its final n tokens (n from lookup_max down to lookup_min) in the output
the client predicted (OpenAI's predicted outputs), else in its prompt and output so far; the engine
verifies a draft in one forward over it and keeps the longest prefix the model agrees with, plus the
model's own next token (greedy: its argmax; sampled: the token its next uniform draws there, as one
token a step would: engine._verify), so the output is the same with or without drafts. Pure Python."""


class PromptLookup:
    """The n-gram index of one sequence, grown as its tokens arrive: each n-gram maps to the
    position after its latest occurrence, so a lookup costs one dict probe per n. The draft's
    length adapts (Hugging Face's assisted-generation heuristic): it starts at max_tokens (copied
    runs are mostly longer than 2: from 2, the copy workload's decode was 3.6 % slower on the engine
    alone, chat's the same; the message of the commit that made it so), grows by 2 after a draft
    kept whole and shrinks by 1 after one cut short, between 1 and max_tokens."""

    def __init__(self, max_tokens: int, lookup_min: int, lookup_max: int, prediction: list[int] = (),
                 prompt_len: int = 0) -> None:
        self.max_tokens, self.sizes = max_tokens, range(lookup_max, lookup_min - 1, -1)
        self.num_tokens = max_tokens           # the next draft's length at most
        self.index: dict[tuple, int] = {}
        self.seen = 0                      # tokens indexed so far
        # the predicted output: its n-grams map to the positions after each occurrence, in order
        self.prediction, self.prompt_len = list(prediction), prompt_len
        self.predicted: dict[tuple, list[int]] = {}
        for n in self.sizes:
            for end in range(n, len(self.prediction)):
                self.predicted.setdefault(tuple(self.prediction[end - n:end]), []).append(end)
        self.drafted_at: int | None = None     # where in the prediction the last draft began (None: not from it)
        self.resume = 0                        # where in the prediction the output is thought to go on

    def kept(self, num_drafted: int, num_kept: int) -> None:
        """What the model made of the last draft: the next one's length (and, drafted from the
        prediction, where the output goes on there)."""
        if self.drafted_at is not None:
            self.resume = self.drafted_at + num_kept
        if num_kept == num_drafted:
            self.num_tokens = min(self.num_tokens + 2, self.max_tokens)
        else:
            self.num_tokens = max(self.num_tokens - 1, 1)

    def draft(self, tokens: list[int], limit: int) -> list[int]:
        """Up to min(num_tokens, limit) tokens: the prediction's next ones while the output follows it
        (from its start, or again after the longest suffix of `tokens`, the sequence so far, found
        there: at the first occurrence from where the last draft's kept part ended), else those that
        followed the latest earlier occurrence of that suffix in `tokens`; [] when none is found."""
        limit = min(limit, self.num_tokens)
        self.drafted_at = self._in_prediction(tokens) if limit > 0 else None
        if self.drafted_at is not None:
            return self.prediction[self.drafted_at:self.drafted_at + limit]
        for end in range(max(self.seen, 1), len(tokens)):     # index n-grams that ended before each new token
            for n in self.sizes:
                if end >= n:
                    self.index[tuple(tokens[end - n:end])] = end
        self.seen = len(tokens)
        for n in self.sizes:
            after = self.index.get(tuple(tokens[-n:])) if len(tokens) >= n and limit > 0 else None
            if after is not None:
                return tokens[after:after + limit]
        return []

    def _in_prediction(self, tokens: list[int]) -> int | None:
        """Where the prediction goes on after `tokens`, or None (no prediction, or lost and not found)."""
        if not self.prediction:
            return None
        done = len(tokens) - self.prompt_len
        if done < len(self.prediction) and tokens[self.prompt_len:] == self.prediction[:done]:
            return done
        for n in self.sizes:
            ends = self.predicted.get(tuple(tokens[-n:])) if len(tokens) >= n else None
            if ends:
                return next((e for e in ends if e >= self.resume), ends[-1])
        return None


def accepted_length(draft: list[int], predicted: list[int]) -> int:
    """How many leading draft tokens the model predicted itself (predicted[j] follows draft[:j])."""
    n = 0
    while n < len(draft) and draft[n] == predicted[n]:
        n += 1
    return n
