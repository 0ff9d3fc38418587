"""Retrieved passages -> a prompt within the generator's token budget, and citations back to ids."""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from nestvec.errors import invalid
from nestvec.rag.generators import DEFAULT_TEMPLATE, Generator, Prompt
from nestvec.types import Hit, JSONDict

MIN_PASSAGE_TOKENS = 32  # a passage cut shorter than this is left out rather than packed
_CITATION = re.compile(r"\[(\d+(?:\s*[,;]\s*\d+)*)\]")


@dataclass(frozen=True)
class Passage:
    id: str
    text: str
    score: float
    metadata: JSONDict = field(default_factory=dict)

    @classmethod
    def from_hit(cls, hit: Hit) -> Passage:
        return cls(hit.id, hit.text or "", float(hit.score), dict(hit.metadata))


def pack(question: str, passages: Sequence[Passage], generator: Generator, max_new_tokens: int,
         template: str = DEFAULT_TEMPLATE) -> tuple[Prompt, list[Passage]]:
    """The prompt holding as many passages, best first, as fit in the generator's context with
    room for `max_new_tokens`; the last one may be cut. Returns the prompt and what it holds."""
    budget = generator.context_tokens - max_new_tokens
    base = generator.prompt_tokens(Prompt(question, (), template))
    if base > budget:
        raise invalid("question", f"takes {base} prompt tokens; {generator.name} has {budget} left after "
                                  f"{max_new_tokens} for the answer")
    texts: list[str] = []
    packed: list[Passage] = []
    used = base
    for passage in passages:
        if not passage.text:
            continue
        cost = generator.count_tokens(f"[{len(texts) + 1}] {passage.text}\n\n")
        if used + cost > budget:
            room = budget - used - 8  # the number, separators and template tokens around it
            if room >= MIN_PASSAGE_TOKENS:
                texts.append(generator.truncate(passage.text, room))
                packed.append(passage)
            break
        texts.append(passage.text)
        packed.append(passage)
        used += cost
    prompt = Prompt(question, tuple(texts), template)
    # tokens do not add up exactly across boundaries: trim the last passage until the whole fits
    while texts and generator.prompt_tokens(prompt) > budget:
        over = generator.prompt_tokens(prompt) - budget
        shorter = generator.truncate(texts[-1], generator.count_tokens(texts[-1]) - over - 1)
        if generator.count_tokens(shorter) < MIN_PASSAGE_TOKENS:
            texts.pop()
            packed.pop()
        else:
            texts[-1] = shorter
        prompt = Prompt(question, tuple(texts), template)
    return prompt, packed


def cited_numbers(text: str) -> list[tuple[int, int]]:
    """(position, number) of each citation in `text`: [2], [1, 3] and [1][2] forms."""
    return [(match.start(), int(n)) for match in _CITATION.finditer(text)
            for n in re.split(r"\s*[,;]\s*", match.group(1))]



_SENTENCE = re.compile(r"[^.!?\n]+[.!?]?")
_TOKEN = re.compile(r"[^\W_]{3,}")
MIN_OVERLAP = 0.5  # share of a sentence's words a passage must hold to be credited with it


def attributed(text: str, passages: Sequence[Passage]) -> list[str]:
    """Ids of the passages the answer's sentences draw on, by word overlap, first used first.

    Small local models (SmolLM2-135M) rarely write [n] markers even when told to, but they copy
    from the passages: each sentence of four or more words is credited to the passage sharing the
    most of its word pairs (copied phrases; a long passage holds many single words by chance), then
    of its words, if that passage holds at least MIN_OVERLAP of its words."""
    words_of = [_TOKEN.findall(p.text.lower()) for p in passages]
    vocab = [set(words) for words in words_of]
    pairs = [set(itertools.pairwise(words)) for words in words_of]
    found: dict[str, None] = {}
    for sentence in _SENTENCE.findall(text):
        sequence = _TOKEN.findall(sentence.lower())
        words, bigrams = set(sequence), set(itertools.pairwise(sequence))
        if len(words) < 4 or not vocab:
            continue
        shares = [len(words & v) / len(words) for v in vocab]
        phrase = [len(bigrams & b) / max(1, len(bigrams)) for b in pairs]
        best = max(range(len(shares)), key=lambda i: (phrase[i], shares[i], -i))
        if shares[best] >= MIN_OVERLAP:
            found[passages[best].id] = None
    return list(found)
