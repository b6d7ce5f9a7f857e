"""The vocabulary as JSON mode reads it (json_mode.py): each token's bytes (byte-level BPE's
alphabet mapped back), grouped so that the tokens valid from a state are found by checking a few
thousand candidates rather than every one, the grammars of recent schemas, and each recent state's
mask. Knows no model and no request."""

import json
from collections import OrderedDict

import torch

from .json_mode import DONE, IN_STRING, Grammar

MASKS_KEPT = 512         # valid-token masks cached, by grammar and state


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
    """The vocabulary as JSON mode reads it: the tokens' bytes, grouped by their leading whitespace
    and the byte after it, so that a state's valid tokens are found by checking a few thousand
    candidates rather than every token; the grammars of recent schemas; and each recent state's
    mask."""

    def __init__(self, pieces: list[bytes | None], stop_ids: set[int]) -> None:
        self.pieces, self.stop_ids, self.size = pieces, stop_ids, len(pieces)
        plain = [p is not None and p != b"" and all(b >= 0x20 and b not in (0x22, 0x5C) for b in p) for p in pieces]
        self.plain = torch.tensor(plain)                    # valid anywhere inside a string, and stay there
        self.characters = torch.tensor([sum(not 0x80 <= b <= 0xBF for b in p) if plain[i] else 0
                                        for i, p in enumerate(pieces)])   # ... adding this many characters
        self.unplain = [i for i, p in enumerate(pieces) if p and not plain[i]]
        # tokens by (leading whitespace, the byte after it; None for whitespace alone)
        self.groups: dict[bytes, dict[int | None, list[int]]] = {}
        for i, p in enumerate(pieces):
            if p:
                rest = p.lstrip(b" \t\n\r")
                lead = p[:len(p) - len(rest)]
                self.groups.setdefault(lead, {}).setdefault(rest[0] if rest else None, []).append(i)
        self.grammars: OrderedDict[str, Grammar] = OrderedDict()
        self.masks: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def grammar(self, schema: str) -> Grammar:
        """The grammar of a response_schema() text, compiled once while it is in use."""
        if schema not in self.grammars:
            self.grammars[schema] = Grammar(json.loads(schema), schema)
            if len(self.grammars) > 64:
                self.grammars.popitem(last=False)
        self.grammars.move_to_end(schema)
        return self.grammars[schema]

    def advance(self, grammar: Grammar, state: tuple, token: int) -> tuple | None:
        """The state after token (a special one, EOS included, leaves it as it is: it ends the request)."""
        return grammar.feed(state, self.pieces[token] or b"")

    def is_valid(self, grammar: Grammar, state: tuple, token: int, stop_ids: tuple = ()) -> bool:
        if token in self.stop_ids or token in stop_ids:
            return state[0] == DONE
        return token < self.size and self.pieces[token] is not None and grammar.feed(state, self.pieces[token]) is not None

    def mask(self, grammar: Grammar, state: tuple, stop_ids: tuple = ()) -> torch.Tensor:
        """[size] bool: the tokens valid from state (where it is DONE, the stop tokens: the model's
        and a request's own stop_ids)."""
        if stop_ids and state[0] == DONE:
            mask = self.mask(grammar, state).clone()
            mask[[t for t in stop_ids if t < self.size]] = True
            return mask
        key = (grammar.key, state)
        if key in self.masks:
            self.masks.move_to_end(key)
            return self.masks[key]
        if state[0] == IN_STRING and state[2][0] == 0 and state[2][3] is None:   # no pattern: plain text, a block
            length = state[2][2]
            room = None if length is None or length[1] is None else length[1] - length[2]
            mask = self.plain.clone() if room is None else self.plain & (self.characters <= room)
            candidates = self.unplain
        else:
            mask, candidates = torch.zeros(self.size, dtype=torch.bool), []
            for lead, by_byte in self.groups.items():
                after = grammar.feed(state, lead)
                if after is None:
                    continue
                for b, ids in by_byte.items():
                    if b is None:
                        mask[ids] = True                     # the whitespace alone, valid as fed
                    elif grammar.step(after, b) is not None:
                        candidates += ids
        for i in candidates:
            if grammar.feed(state, self.pieces[i]) is not None:
                mask[i] = True
        if state[0] == DONE:
            for i in self.stop_ids:
                if i < self.size:
                    mask[i] = True
        self.masks[key] = mask
        if len(self.masks) > MASKS_KEPT:
            self.masks.popitem(last=False)
        return mask
