"""Needle in a haystack, in the style of RULER's NIAH tasks (Hsieh et al., 2024):
key-value needles ("One of the special magic numbers for {key} is: {value}.")
hidden at chosen depths in repeated distractor text, then a question about one
key. Everything is drawn from a seed, so the same arguments give the same
samples; a sample is right when the first number the model generates is
exactly the value."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

# RULER's "noise" haystack, one sentence at a time.
NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
         "There and back again.")
INTRO = ("Some special magic numbers are hidden within the following text. Make sure to "
         "memorize it. I will quiz you about the numbers afterwards.\n")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = ("\nWhat is the special magic number for {key} mentioned in the provided text? "
            "The special magic number for {key} mentioned in the provided text is")
_ADJECTIVES = ("ancient", "bitter", "calm", "curious", "dusty", "eager", "fancy", "gentle",
               "hollow", "icy", "jolly", "lively", "misty", "noisy", "odd", "proud", "quiet",
               "rapid", "silent", "tender", "vivid", "wise", "young", "zealous")
_NOUNS = ("anchor", "badger", "canyon", "dolphin", "ember", "falcon", "glacier", "harbor",
          "island", "jacket", "kettle", "lantern", "meadow", "needle", "orchard", "pebble",
          "quarry", "river", "saddle", "tunnel", "umbrella", "violin", "walnut", "yacht")


@dataclass(frozen=True)
class NiahSample:
    prompt: str
    key: str               # the key asked about
    value: str             # its value, the expected answer
    depth: float           # where its needle sits: 0 = start of the haystack, 1 = end
    needles: tuple[tuple[str, str], ...]  # all (key, value) pairs hidden, asked one first
    context_length: int    # the target prompt length in tokens


def make_sample(count_tokens: Callable[[str], int], context_length: int, depth: float,
                num_needles: int = 1, seed: int = 0) -> NiahSample:
    """One prompt of about `context_length` tokens. The asked needle sits at `depth`;
    the other `num_needles - 1` (distractors with different keys) at random depths."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    if not 1 <= num_needles <= len(_ADJECTIVES) * len(_NOUNS):
        raise ValueError(f"num_needles={num_needles} must be at least 1")
    rng = np.random.default_rng([seed, context_length, round(depth * 1000), num_needles])
    pairs = rng.choice(len(_ADJECTIVES) * len(_NOUNS), num_needles, replace=False)
    keys = [f"{_ADJECTIVES[p // len(_NOUNS)]}-{_NOUNS[p % len(_NOUNS)]}" for p in pairs]
    values = [str(v) for v in rng.integers(1_000_000, 10_000_000, num_needles)]
    needles = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
    fixed = count_tokens(INTRO + " ".join(needles) + QUESTION.format(key=keys[0]))
    # Needles go between sentences, never inside one.
    per_sentence = count_tokens(" ".join(NOISE * 8)) / (8 * len(NOISE))
    n = max(0, int((context_length - fixed) / per_sentence))
    haystack = [NOISE[i % len(NOISE)] for i in range(n)]
    slots = [round(depth * n)] + [int(s) for s in rng.integers(0, n + 1, num_needles - 1)]
    # Insert from the back so earlier slots keep their meaning.
    for slot, needle in sorted(zip(slots, needles), key=lambda x: -x[0]):
        haystack.insert(slot, needle)
    prompt = INTRO + " ".join(haystack) + QUESTION.format(key=keys[0])
    return NiahSample(prompt, keys[0], values[0], depth, tuple(zip(keys, values)), context_length)


def make_samples(count_tokens: Callable[[str], int], context_lengths: Sequence[int],
                 depths: Sequence[float], num_needles: int = 1, samples: int = 1,
                 seed: int = 0) -> list[NiahSample]:
    """`samples` prompts for every (context length, depth) cell."""
    return [make_sample(count_tokens, length, depth, num_needles, seed * 1_000_003 + i)
            for length in context_lengths for depth in depths for i in range(samples)]


def answer(generated: str) -> str | None:
    """The first number in the generated text, or None."""
    found = re.search(r"\d+", generated)
    return found.group(0) if found else None


def is_correct(sample: NiahSample, generated: str) -> bool:
    return answer(generated) == sample.value
