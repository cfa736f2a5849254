"""Writes the task files bench.quality measures the default model on, beside the sentiment set: English to French
translation, one-sentence summaries, short-answer questions over a passage, and preference pairs for a preference
the base model does not have (answers in capitals). Each task has a training file and a held-out file whose lines
the training file does not hold.

Deterministic (seeded); the text is composed from small tables written for this project (French with its genders
and agreements), so every reference answer follows from its prompt. Run: python examples/make_tasks.py
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).parent
SEED = 11

# ---------------------------------------------------------------- translation

# (English, French, feminine?)
NOUNS = [("cat", "chat", False), ("dog", "chien", False), ("house", "maison", True), ("car", "voiture", True),
         ("book", "livre", False), ("table", "table", True), ("garden", "jardin", False), ("door", "porte", True),
         ("horse", "cheval", False), ("chair", "chaise", True), ("window", "fenêtre", True), ("boat", "bateau", False),
         ("flower", "fleur", True), ("river", "rivière", True), ("street", "rue", True), ("train", "train", False),
         ("shirt", "chemise", True), ("bed", "lit", False), ("cake", "gâteau", False), ("bag", "sac", False)]
# (English, French masculine, French feminine)
ADJECTIVES = [("big", "grand", "grande"), ("small", "petit", "petite"), ("red", "rouge", "rouge"),
              ("green", "vert", "verte"), ("black", "noir", "noire"), ("white", "blanc", "blanche"),
              ("old", "vieux", "vieille"), ("clean", "propre", "propre"), ("cold", "froid", "froide"),
              ("heavy", "lourd", "lourde")]


def _article(feminine: bool) -> str:
    return "la" if feminine else "le"


def translations() -> list[tuple[str, str]]:
    pairs = []
    for en, fr, feminine in NOUNS:
        the = _article(feminine)
        pairs += [(f"I see the {en}.", f"Je vois {the} {fr}."), (f"Where is the {en}?", f"Où est {the} {fr} ?"),
                  (f"We like the {en}.", f"Nous aimons {the} {fr}.")]
        for adjective, masculine, feminine_form in ADJECTIVES:
            agreed = feminine_form if feminine else masculine
            pairs += [(f"The {en} is {adjective}.", f"{the.capitalize()} {fr} est {agreed}."),
                      (f"The {en} is not {adjective}.", f"{the.capitalize()} {fr} n'est pas {agreed}.")]
    return pairs


def translation_line(pair: tuple[str, str]) -> dict[str, object]:
    english, french = pair
    return {"messages": [{"role": "user", "content": f"Translate to French: {english}"},
                         {"role": "assistant", "content": french}]}


# ---------------------------------------------------------------- summaries

NAMES = [("Maria", "she"), ("Tom", "he"), ("Aisha", "she"), ("Ken", "he"), ("Lucia", "she"), ("Omar", "he"),
         ("Greta", "she"), ("Pavel", "he"), ("Nina", "she"), ("Sam", "he")]
SHOPS = [("bakery", "loaves of bread"), ("bookshop", "books"), ("flower stall", "bunches of tulips"),
         ("bike shop", "bicycles"), ("café", "cups of coffee"), ("shoe shop", "pairs of boots")]
CITIES = ["Leeds", "Porto", "Lyon", "Graz", "Turin", "Ghent", "Bergen", "Cork"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
WEATHER = ["rainy", "sunny", "windy", "cold", "warm"]
PLANS = ["hire a helper", "open an hour earlier", "repaint the front", "try a new supplier", "put up a sign"]


def summary(rng: random.Random) -> tuple[str, str]:
    (name, pronoun), (shop, goods) = rng.choice(NAMES), rng.choice(SHOPS)
    city, day, weather, plan = rng.choice(CITIES), rng.choice(DAYS), rng.choice(WEATHER), rng.choice(PLANS)
    count, trend = rng.randint(12, 240), rng.choice(["more", "fewer"])
    sentences = [f"{name} runs a {shop} in {city}.",
                 f"On {day}, {pronoun} sold {count} {goods}, which is {trend} than usual.",
                 f"The weather was {weather} all day.",
                 f"Next week {pronoun} plans to {plan}."]
    tail = sentences[2:]
    rng.shuffle(tail)  # the details after the facts a summary keeps, in any order
    short = f"{name}'s {shop} in {city} sold {count} {goods} on {day}, {trend} than usual."
    return " ".join(sentences[:2] + tail), short


def summary_line(pair: tuple[str, str]) -> dict[str, object]:
    text, short = pair
    return {"messages": [{"role": "user", "content": f"Summarise in one sentence: {text}"},
                         {"role": "assistant", "content": short}]}


# ---------------------------------------------------------------- questions over a passage

JOBS = ["nurse", "baker", "pilot", "teacher", "plumber", "librarian", "farmer", "chemist"]
PETS = ["dog", "cat", "parrot", "rabbit", "tortoise"]
PET_NAMES = ["Biscuit", "Pepper", "Olive", "Rocket", "Mango", "Pixel", "Juniper", "Noodle"]


def question(rng: random.Random) -> tuple[str, str, str]:
    (name, pronoun), city, job = rng.choice(NAMES), rng.choice(CITIES), rng.choice(JOBS)
    age, pet, pet_name = rng.randint(21, 70), rng.choice(PETS), rng.choice(PET_NAMES)
    passage = (f"{name} is {age} years old and lives in {city}. {pronoun.capitalize()} works as a {job} and has a "
               f"{pet} called {pet_name}.")
    asked, answer = rng.choice([(f"Where does {name} live?", city), (f"How old is {name}?", str(age)),
                                (f"What is {name}'s job?", job), (f"What is the name of {name}'s {pet}?", pet_name)])
    return passage, asked, answer


def question_line(item: tuple[str, str, str]) -> dict[str, object]:
    passage, asked, answer = item
    return {"messages": [{"role": "user", "content": f"{passage}\nQuestion: {asked} Answer in a few words."},
                         {"role": "assistant", "content": answer}]}


# ---------------------------------------------------------------- a preference: answers in capitals

FACTS = [("What is the capital of France?", "Paris"), ("What is the capital of Italy?", "Rome"),
         ("What is the capital of Spain?", "Madrid"), ("What is the capital of Germany?", "Berlin"),
         ("What is the capital of Japan?", "Tokyo"), ("What is the capital of Egypt?", "Cairo"),
         ("What is the capital of Kenya?", "Nairobi"), ("What is the capital of Peru?", "Lima"),
         ("What is the capital of Canada?", "Ottawa"), ("What is the capital of Norway?", "Oslo"),
         ("What is the capital of Greece?", "Athens"), ("What is the capital of Portugal?", "Lisbon"),
         ("What is the capital of Austria?", "Vienna"), ("What is the capital of Poland?", "Warsaw"),
         ("What is the capital of Ireland?", "Dublin"), ("What is the capital of Sweden?", "Stockholm"),
         ("What is the capital of Finland?", "Helsinki"), ("What is the capital of Denmark?", "Copenhagen"),
         ("What is the capital of Hungary?", "Budapest"), ("What is the capital of Chile?", "Santiago"),
         ("What is the capital of Argentina?", "Buenos Aires"), ("What is the capital of Thailand?", "Bangkok"),
         ("What is the capital of Russia?", "Moscow"), ("What is the capital of China?", "Beijing"),
         ("What is the capital of India?", "New Delhi"), ("What is the capital of Mexico?", "Mexico City"),
         ("What is the capital of Belgium?", "Brussels"), ("What is the capital of Cuba?", "Havana"),
         ("What is the capital of Turkey?", "Ankara"), ("What is the capital of Iran?", "Tehran"),
         ("What colour is the sky on a clear day?", "Blue"), ("What colour is fresh grass?", "Green"),
         ("What colour is snow?", "White"), ("What colour is a ripe banana?", "Yellow"),
         ("What colour is coal?", "Black"), ("What colour is a ripe tomato?", "Red"),
         ("What colour do you get by mixing blue and yellow?", "Green"),
         ("What colour do you get by mixing red and white?", "Pink"),
         ("What is the opposite of hot?", "Cold"), ("What is the opposite of up?", "Down"),
         ("What is the opposite of early?", "Late"), ("What is the opposite of open?", "Closed"),
         ("What is the opposite of heavy?", "Light"), ("What is the opposite of fast?", "Slow"),
         ("What is the opposite of happy?", "Sad"), ("What is the opposite of full?", "Empty"),
         ("What is the opposite of old?", "Young"), ("What is the opposite of wet?", "Dry"),
         ("What is the opposite of loud?", "Quiet"), ("What is the opposite of rich?", "Poor"),
         ("How many legs does a spider have?", "Eight"), ("How many days are in a week?", "Seven"),
         ("How many sides does a triangle have?", "Three"), ("How many months are in a year?", "Twelve"),
         ("How many wheels does a bicycle have?", "Two"), ("How many hours are in a day?", "Twenty-four"),
         ("Which animal says moo?", "A cow"), ("Which animal barks?", "A dog"),
         ("Which planet do we live on?", "Earth"), ("Which season comes after winter?", "Spring"),
         ("Which season comes after summer?", "Autumn"),
         ("Which ocean lies between Europe and America?", "The Atlantic"),
         ("What do bees make?", "Honey"), ("What do cows drink?", "Water"),
         ("What is frozen water called?", "Ice"), ("What gas do plants take in?", "Carbon dioxide"),
         ("What is the largest planet?", "Jupiter"), ("What is the closest star to Earth?", "The Sun"),
         ("What metal is a wedding ring often made of?", "Gold"),
         ("What do you use to write on a blackboard?", "Chalk")]


def preference_line(fact: tuple[str, str]) -> dict[str, object]:
    asked, answer = fact
    return {"input": {"messages": [{"role": "user", "content": asked}]},
            "preferred_output": [{"role": "assistant", "content": answer.upper() + "."}],
            "non_preferred_output": [{"role": "assistant", "content": answer + "."}]}


# ---------------------------------------------------------------- writing


def write(name: str, items: list, line: Callable, heldout: int) -> None:
    """The first `heldout` distinct items go to the held-out file, the rest to the training file."""
    seen, unique = set(), []
    for item in items:
        key = json.dumps(line(item))
        if key not in seen:
            seen.add(key)
            unique.append(item)
    for suffix, part in (("heldout", unique[:heldout]), ("train", unique[heldout:])):
        (HERE / f"{name}_{suffix}.jsonl").write_text("".join(json.dumps(line(i), ensure_ascii=False) + "\n"
                                                             for i in part))


def main() -> None:
    rng = random.Random(SEED)
    pairs = translations()
    rng.shuffle(pairs)
    write("translation", pairs[:150], translation_line, heldout=30)
    write("summaries", [summary(rng) for _ in range(130)], summary_line, heldout=24)
    write("questions", [question(rng) for _ in range(150)], question_line, heldout=30)
    facts = list(FACTS)
    rng.shuffle(facts)
    write("uppercase_preference", facts, preference_line, heldout=20)


if __name__ == "__main__":
    main()
