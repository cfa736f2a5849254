"""Writes examples/length_spread.jsonl: chat examples with a realistic spread of lengths for the training
benchmark — short classification, mid-length question answering over a passage, and long summarisation.

Deterministic (seeded); the text is composed from small fact tables, so it reads naturally enough for a
language model and the answers follow from the prompt. Run: python examples/make_length_spread.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).with_name("length_spread.jsonl")

REVIEWS = [("The battery died after two days and support never answered.", "NEGATIVE"),
           ("Lovely staff, spotless rooms, and breakfast was excellent.", "POSITIVE"),
           ("The app crashes every time I open the camera.", "NEGATIVE"),
           ("Fast delivery and the jacket fits perfectly.", "POSITIVE"),
           ("Cold food, rude waiter, and we waited an hour.", "NEGATIVE"),
           ("A gripping story with characters I still think about.", "POSITIVE"),
           ("The instructions were missing and two screws were broken.", "NEGATIVE"),
           ("Quiet, comfortable and cheaper than I expected.", "POSITIVE")]
TOWNS = ["Arlen", "Bexford", "Calder", "Dunmore", "Elsworth", "Fenwick", "Garrow", "Holbeck"]
GOODS = ["wool", "salt", "timber", "copper", "barley", "glass", "cheese", "paper"]
RIVERS = ["Ouse", "Tamar", "Wensum", "Lune", "Derwent", "Avon", "Tees", "Wharfe"]
PEOPLE = ["Ada Marsh", "Tomas Vell", "Irene Cole", "Samuel Orr", "Nadia Brook", "Felix Hart", "Lena Frost"]
EVENTS = ["a fire destroyed the old market hall", "the railway reached the town", "a flood covered the lower streets",
          "the first school opened", "the bridge over the river was rebuilt", "a new harbour wall was finished"]


def town_facts(rng: random.Random) -> dict[str, str | int]:
    return {"town": rng.choice(TOWNS), "good": rng.choice(GOODS), "river": rng.choice(RIVERS),
            "founder": rng.choice(PEOPLE), "year": rng.randint(1120, 1890), "people": rng.randint(2, 90) * 1000,
            "event": rng.choice(EVENTS), "event_year": rng.randint(1600, 1950)}


def passage(facts: dict[str, str | int], rng: random.Random, sentences: int) -> str:
    base = [f"{facts['town']} lies on the river {facts['river']} and was founded in {facts['year']} by "
            f"{facts['founder']}.",
            f"For centuries its wealth came from {facts['good']}, which was carried downstream on barges.",
            f"Today about {facts['people']} people live there.",
            f"In {facts['event_year']} {facts['event']}, which changed the town for good."]
    filler = [f"Visitors often remark on the {rng.choice(['narrow', 'steep', 'cobbled', 'quiet'])} streets near "
              f"the {rng.choice(['church', 'square', 'mill', 'quay'])}.",
              f"The {rng.choice(['spring', 'autumn', 'summer'])} fair still sells {rng.choice(GOODS)} and "
              f"{rng.choice(GOODS)} from the surrounding farms.",
              f"Local records mention {rng.choice(PEOPLE)}, who kept the {rng.choice(['toll', 'ferry', 'inn'])} "
              f"for many years.",
              f"Many houses were rebuilt in brick after {rng.randint(1700, 1900)}.",
              f"The road to {rng.choice(TOWNS)} follows the old {rng.choice(['drovers', 'pilgrims', 'salt'])} "
              "route across the hills."]
    body = list(base)
    while len(body) < sentences:
        body.insert(rng.randint(1, len(body)), rng.choice(filler))
    return " ".join(body)


def chat(user: str, assistant: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]})


def main() -> None:
    rng = random.Random(7)
    lines = []
    for _ in range(48):  # short: one-word labels
        review, label = rng.choice(REVIEWS)
        lines.append(chat(f"Review: {review}\nAnswer POSITIVE or NEGATIVE.", label))
    for _ in range(32):  # mid-length: a question about a passage
        facts = town_facts(rng)
        question, answer = rng.choice([("When was the town founded, and by whom?",
                                        f"It was founded in {facts['year']} by {facts['founder']}."),
                                       ("What did the town's wealth come from?", f"It came from {facts['good']}."),
                                       ("How many people live there today?", f"About {facts['people']}.")])
        lines.append(chat(f"{passage(facts, rng, 8)}\n\nQuestion: {question}", answer))
    for _ in range(16):  # long: summarise a long passage
        facts = town_facts(rng)
        summary = (f"{facts['town']}, on the {facts['river']}, was founded in {facts['year']} by {facts['founder']} "
                   f"and grew rich on {facts['good']}. About {facts['people']} people live there now; in "
                   f"{facts['event_year']} {facts['event']}.")
        lines.append(chat(f"Summarise this in two sentences.\n\n{passage(facts, rng, 34)}", summary))
    rng.shuffle(lines)
    OUT.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
