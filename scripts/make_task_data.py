#!/usr/bin/env python3
"""Regenerate the structured-output task shipped in qlora/assets/data/ (deterministic, no copied data).

The task: read one sentence about a person and answer with exactly one JSON
object ``{"name": ..., "age": ..., "city": ..., "job": ...}``, keys in that
order, age an integer. Answers are checked exactly (``qlora.eval.task``), so
the metric is unambiguous: the reply must parse as JSON and equal the
reference.

- data/people-json.jsonl       train records ({"messages": [user, assistant]})
- data/people-json-eval.jsonl  held-out records: different people, the same sentence templates

Run: .venv/bin/python scripts/make_task_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "qlora" / "assets" / "data"
INSTRUCTION = "Extract the person's name, age, city and job from the text. Answer with one JSON object."

FIRST = (
    "Maria Jonas Aiko Pedro Fatima Lars Ingrid Omar Chen Priya Tomas Elena Kwame Sofia Mateo Hana Ivan Leila "
    "Diego Nora Ravi Greta Yusuf Clara Felix Amara Bruno Mei Oskar Zainab Hugo Lucia Emil Rosa Arjun Wanda Theo "
    "Ines Kofi Vera Pablo Sana Anton Julia Marek Alma Rafael Nadia"
).split()
LAST = (
    "Lopez Berg Tanaka Silva Haddad Nilsson Okafor Rossi Novak Kumar Schmidt Moreau Mensah Costa Ivanova Park "
    "Fischer Duarte Weber Kowalski Ahmed Larsen Romero Sato Petrov Dubois Varga Hansen Ortiz Yilmaz"
).split()
CITIES = (
    "Lisbon|Oslo|Nairobi|Osaka|Lima|Warsaw|Toronto|Cairo|Seoul|Dublin|Madrid|Prague|Accra|Hanoi|Quito|Vienna|"
    "Athens|Manila|Bogota|Helsinki|Porto|Dakar|Perth|Munich|Kyoto|Santiago|Tunis|Riga|Denver|Glasgow"
).split("|")
JOBS = (
    "nurse|teacher|pilot|baker|engineer|librarian|chef|architect|dentist|farmer|journalist|plumber|pharmacist|"
    "carpenter|translator|electrician|painter|lawyer|firefighter|gardener|accountant|photographer|surgeon|tailor"
).split("|")
TEMPLATES = [
    "{name} is a {age}-year-old {job} who lives in {city}.",
    "Meet {name}: {age} years old, works as a {job} in {city}.",
    "After years of training, {name} now works as a {job}. {name_first} is {age} and calls {city} home.",
    "{city} is where {name}, a {job}, has lived since turning {age_less}. Today {name_first} is {age}.",
    "Our new {job} is {name}, aged {age}, who just moved here from {city}.",
    "At {age}, {name} runs a small business in {city} as a {job}.",
    "Name: {name}. Based in {city}. Age {age}. Occupation: {job}.",
    "Born {age} years ago, {name} became a {job} and settled in {city}.",
    "The {job} from {city}, {name}, celebrated {pron} {age_ordinal} birthday yesterday.",
    "In {city}, everyone knows {name}, the {age}-year-old {job}.",
]


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _person(rng: random.Random) -> dict:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    return {"name": f"{first} {last}", "first": first, "age": rng.randint(19, 78),
            "city": rng.choice(CITIES), "job": rng.choice(JOBS)}


def _record(rng: random.Random, p: dict) -> dict:
    text = rng.choice(TEMPLATES).format(
        name=p["name"], name_first=p["first"], age=p["age"], age_less=p["age"] - rng.randint(2, 9),
        age_ordinal=_ordinal(p["age"]), city=p["city"], job=p["job"], pron=rng.choice(["her", "his", "their"]),
    )
    answer = json.dumps({"name": p["name"], "age": p["age"], "city": p["city"], "job": p["job"]})
    return {"messages": [{"role": "user", "content": f"{INSTRUCTION}\n\nText: {text}"},
                         {"role": "assistant", "content": answer}]}


def make(n_train: int = 480, n_eval: int = 48, seed: int = 7) -> tuple[list[dict], list[dict]]:
    """Train and held-out records; no (name, age, city, job) appears in both."""
    rng, seen, train, held = random.Random(seed), set(), [], []
    while len(train) + len(held) < n_train + n_eval:
        p = _person(rng)
        key = (p["name"], p["age"], p["city"], p["job"])
        if key in seen:
            continue
        seen.add(key)
        (train if len(train) < n_train else held).append(_record(rng, p))
    return train, held


def main() -> None:
    train, held = make()
    for name, rows in (("people-json.jsonl", train), ("people-json-eval.jsonl", held)):
        (OUT / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {OUT / name}: {len(rows)} records")


if __name__ == "__main__":
    main()
