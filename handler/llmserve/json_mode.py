"""JSON mode (OpenAI's response_format {"type": "json_object"}): a request's output is held to a
JSON object, token by token. A byte-level automaton (step) says whether the output so far can still
become one; JsonVocab says which tokens of the vocabulary keep it so from a given state, and picks a
constrained row's token the way llama.cpp applies a grammar: the token the row's own sampling chose
stands if it is valid; else every invalid token is masked and the row draws again from the rest,
with its own temperature, top-k, top-p and min-p (greedy: the likeliest valid token). The end of
text (EOS, or one of the request's stop_token_ids) is valid only once the object is closed, and
then only whitespace or the end is, so a finished answer always parses; an answer cut short by
max_new_tokens is a prefix of one (finish_reason "length"), as OpenAI's is."""

from collections import OrderedDict

import torch

from .sampling import draw

# modes of the automaton's state (mode, stack, aux, spaces): stack holds the open containers ("{" or
# "["), aux the mode's detail (STRING: 0, 1 after a backslash, 3 + k with k + 1 hex digits of a \u
# escape to go; NUMBER: its grammar's place, NUM_*; LITERAL: the bytes still to come), spaces the
# whitespace bytes in a row outside strings
START, VALUE, ARRAY_FIRST, OBJECT_FIRST, KEY, COLON, AFTER, DONE, STRING_VALUE, STRING_KEY, NUMBER, LITERAL = range(12)
STRUCTURAL = (START, VALUE, ARRAY_FIRST, OBJECT_FIRST, KEY, COLON, AFTER, DONE)
INITIAL = (START, "", 0, 0)
MAX_SPACES = 16          # whitespace bytes in a row outside strings: a small model can indent forever
WHITESPACE = frozenset(b" \t\n\r")
DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrt')
# a number's place in JSON's grammar: after "-", after a leading 0, in the integer's digits, after
# ".", in the fraction, after "e", after the exponent's sign, in the exponent; ENDS may end one
NUM_SIGN, NUM_ZERO, NUM_INT, NUM_DOT, NUM_FRAC, NUM_E, NUM_E_SIGN, NUM_EXP = range(8)
NUM_ENDS = (NUM_ZERO, NUM_INT, NUM_FRAC, NUM_EXP)
LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
MASKS_KEPT = 256         # valid-token masks cached, by state (a few dozen states recur in practice)


def _closed(stack: str) -> tuple:
    """The state after a value (or container) completes with these containers still open."""
    return (AFTER, stack, 0, 0) if stack else (DONE, "", 0, 0)


def step(state: tuple, b: int) -> tuple | None:
    """The state after byte b, or None where no JSON object continues so."""
    mode, stack, aux, spaces = state
    if mode in (STRING_VALUE, STRING_KEY):
        if aux == 0:
            if b == 0x22:                                   # "
                return (COLON, stack, 0, 0) if mode == STRING_KEY else _closed(stack)
            if b == 0x5C:                                   # backslash
                return (mode, stack, 1, 0)
            return None if b < 0x20 else state
        if aux == 1:
            if b == ord("u"):
                return (mode, stack, 6, 0)
            return (mode, stack, 0, 0) if b in ESCAPES else None
        return (mode, stack, aux - 1 if aux > 3 else 0, 0) if b in HEX else None
    if mode == NUMBER:
        nxt = _number(aux, b)
        if nxt is not None:
            return (NUMBER, stack, nxt, 0)
        return step(_closed(stack), b) if aux in NUM_ENDS else None
    if mode == LITERAL:
        if b != aux[0]:
            return None
        return (LITERAL, stack, aux[1:], 0) if len(aux) > 1 else _closed(stack)
    if b in WHITESPACE:                                     # structural modes
        return (mode, stack, aux, spaces + 1) if spaces < MAX_SPACES else None
    if mode == START:
        return (OBJECT_FIRST, "{", 0, 0) if b == ord("{") else None
    if mode == DONE:
        return None
    if mode in (VALUE, ARRAY_FIRST):
        if b == ord("]") and mode == ARRAY_FIRST:
            return _closed(stack[:-1])
        if b == ord("{"):
            return (OBJECT_FIRST, stack + "{", 0, 0)
        if b == ord("["):
            return (ARRAY_FIRST, stack + "[", 0, 0)
        if b == 0x22:
            return (STRING_VALUE, stack, 0, 0)
        if b == ord("-"):
            return (NUMBER, stack, NUM_SIGN, 0)
        if b in DIGITS:
            return (NUMBER, stack, NUM_ZERO if b == ord("0") else NUM_INT, 0)
        if b in LITERALS:
            return (LITERAL, stack, LITERALS[b], 0)
        return None
    if mode in (OBJECT_FIRST, KEY):
        if b == 0x22:
            return (STRING_KEY, stack, 0, 0)
        return _closed(stack[:-1]) if b == ord("}") and mode == OBJECT_FIRST else None
    if mode == COLON:
        return (VALUE, stack, 0, 0) if b == ord(":") else None
    # AFTER: a value inside the container on top of the stack
    if b == ord(","):
        return (KEY, stack, 0, 0) if stack[-1] == "{" else (VALUE, stack, 0, 0)
    if b == ord("}" if stack[-1] == "{" else "]"):
        return _closed(stack[:-1])
    return None


def _number(place: int, b: int) -> int | None:
    """A number's next place after byte b, or None where b is not part of it."""
    if place == NUM_SIGN:
        return None if b not in DIGITS else NUM_ZERO if b == ord("0") else NUM_INT
    if place in (NUM_ZERO, NUM_INT, NUM_FRAC):
        if b in DIGITS and place != NUM_ZERO:
            return place
        if b == ord(".") and place != NUM_FRAC:
            return NUM_DOT
        return NUM_E if b in b"eE" else None
    if place == NUM_DOT:
        return NUM_FRAC if b in DIGITS else None
    if place == NUM_E:
        return NUM_E_SIGN if b in b"+-" else NUM_EXP if b in DIGITS else None
    return NUM_EXP if b in DIGITS else None                  # NUM_E_SIGN, NUM_EXP


def feed(state: tuple | None, data: bytes) -> tuple | None:
    """The state after data, or None."""
    for b in data:
        if state is None:
            return None
        state = step(state, b)
    return state


def byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's (GPT-2's) character for each byte, reversed: printable Latin-1 bytes stand for
    themselves, the other 68 for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


def token_bytes(tokenizer, size: int) -> list[bytes | None]:
    """Each token id's bytes (None for special tokens and ids past the tokenizer): byte-level BPE's
    characters mapped back to bytes, else the token decoded alone."""
    to_byte = byte_level_alphabet()
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    out: list[bytes | None] = [None] * size
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(min(size, len(tokenizer)))))):
        if i in special or piece is None:
            continue
        if all(c in to_byte for c in piece):
            out[i] = bytes(to_byte[c] for c in piece)
        else:                                               # not byte-level (sentencepiece and the like)
            out[i] = tokenizer.decode([i]).encode("utf-8")
    return out


class JsonVocab:
    """The vocabulary as JSON mode reads it: the tokens' bytes, grouped so that a state's valid
    tokens are found by checking a few thousand candidates rather than every token, and a cache of
    each recent state's mask."""

    def __init__(self, pieces: list[bytes | None], stop_ids: set[int]) -> None:
        self.pieces, self.stop_ids, self.size = pieces, stop_ids, len(pieces)
        plain = [p is not None and p != b"" and all(b >= 0x20 and b not in (0x22, 0x5C) for b in p) for p in pieces]
        self.plain = torch.tensor(plain)                    # valid anywhere inside a string, and stay there
        self.unplain = [i for i, p in enumerate(pieces) if p and not plain[i]]
        self.by_first: dict[int, list[int]] = {}            # tokens by their first byte (not whitespace)
        self.by_first_after_space: dict[int, list[int]] = {}   # ... by the first after leading whitespace
        self.spaces_only: list[int] = []
        for i, p in enumerate(pieces):
            if not p:
                continue
            rest = p.lstrip(b" \t\n\r")
            if not rest:
                self.spaces_only.append(i)
            elif len(rest) == len(p):
                self.by_first.setdefault(p[0], []).append(i)
            else:
                self.by_first_after_space.setdefault(rest[0], []).append(i)
        self.masks: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def is_valid(self, state: tuple, token: int, stop_ids: frozenset = frozenset()) -> bool:
        if token in self.stop_ids or token in stop_ids:
            return state[0] == DONE
        return token < self.size and self.pieces[token] is not None and feed(state, self.pieces[token]) is not None

    def mask(self, state: tuple) -> torch.Tensor:
        """[size] bool: the tokens valid from state (the stop tokens where it is DONE; a request's own
        stop_token_ids are added by the caller)."""
        if state in self.masks:
            self.masks.move_to_end(state)
            return self.masks[state]
        mode = state[0]
        if mode in (STRING_VALUE, STRING_KEY) and state[2] == 0:
            mask, candidates = self.plain.clone(), self.unplain
        else:
            mask = torch.zeros(self.size, dtype=torch.bool)
            candidates = [i for b in range(256) if b not in WHITESPACE and step(state, b) is not None
                          for i in self.by_first.get(b, ())]
            after_space = step(state, 0x20)
            if after_space is not None:   # whitespace first: what may follow it (the same mode, or a number's end)
                candidates += self.spaces_only + [i for b in range(256) if b not in WHITESPACE
                                                  and step(after_space, b) is not None
                                                  for i in self.by_first_after_space.get(b, ())]
        for i in candidates:
            if feed(state, self.pieces[i]) is not None:
                mask[i] = True
        if mode == DONE:
            for i in self.stop_ids:
                if i < self.size:
                    mask[i] = True
        self.masks[state] = mask
        if len(self.masks) > MASKS_KEPT:
            self.masks.popitem(last=False)
        return mask

    def choose(self, state: tuple, scores: torch.Tensor, token: int, params, generator) -> int:
        """A constrained row's token: `token` (what its sampling chose from scores [V]) if valid from
        state; else the likeliest valid one (greedy; the few likeliest are tried before a mask is
        built) or a new draw from the valid ones alone, with a new uniform from its generator."""
        stops = frozenset(params.stop_token_ids)
        if self.is_valid(state, token, stops):
            return token
        if params.is_greedy:
            for t in torch.topk(scores, 8).indices.tolist():
                if self.is_valid(state, t, stops):
                    return t
        mask = self.mask(state)
        if stops and state[0] == DONE:
            mask = mask.clone()
            mask[[t for t in stops if t < self.size]] = True
        masked = scores.masked_fill(~mask.to(scores.device), float("-inf"))
        if not torch.isfinite(masked.max()):   # min_tokens masked the end, the only valid token: the object comes first
            return int(mask.nonzero()[0])
        if params.is_greedy:
            return int(masked.argmax())
        u = torch.rand((), device=scores.device, generator=generator)
        return int(draw(masked[None], [params], u[None])[0])
