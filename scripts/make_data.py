"""Generate the bundled datasets, deterministically, in the public Hub schemas.

    python scripts/make_data.py            # writes data/<task>/{train,validation}.jsonl

summarize: XSum schema (id, document, summary). Each document is a short news story whose facts
(who, what, where, when) are spread over sentences among distracting ones; the summary is the
one-sentence gist, so a model must find and copy the right facts rather than the first sentence.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Dublin", "Quito", "Tunis", "Perth", "Krakow",
          "Porto", "Bergen", "Accra", "Cusco", "Hue", "Cork", "Cuenca", "Sfax", "Darwin", "Gdansk"]
PEOPLE = ["Ana Costa", "Lars Berg", "Grace Otieno", "Rosa Quispe", "Minh Tran", "Sean Walsh", "Luis Mora",
          "Amel Haddad", "Kate Brown", "Piotr Nowak", "Ines Silva", "Ola Dahl", "Kofi Mensah", "Eva Rojas"]
ROLES = ["mayor", "minister", "police chief", "union leader", "head teacher", "hospital director"]
EVENTS = [
    ("open a new library", "will open a new library"),
    ("close the old bridge", "will close the old bridge"),
    ("raise bus fares", "will raise bus fares"),
    ("build a football stadium", "will build a football stadium"),
    ("cut the school budget", "will cut the school budget"),
    ("plant ten thousand trees", "will plant ten thousand trees"),
    ("ban cars from the centre", "will ban cars from the centre"),
    ("hire more nurses", "will hire more nurses"),
    ("move the central market", "will move the central market"),
    ("repair the harbour wall", "will repair the harbour wall"),
    ("host a music festival", "will host a music festival"),
    ("lower water prices", "will lower water prices"),
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FILLERS = [
    "Local residents gathered outside the town hall as the news spread.",
    "The weather stayed mild for most of the week.",
    "Several shops in the area reported a busy morning.",
    "Officials declined to comment on the cost of the plan.",
    "The decision follows months of debate in the council.",
    "Critics said the timing was poor.",
    "A spokesperson promised more details in the coming weeks.",
    "Traffic in the city was slower than usual.",
    "The announcement was broadcast on local radio.",
    "Supporters welcomed the move.",
]


def summarize_row(rng: random.Random, index: int) -> dict:
    city, person, role = rng.choice(CITIES), rng.choice(PEOPLE), rng.choice(ROLES)
    plan, outcome = rng.choice(EVENTS)
    day = rng.choice(DAYS)
    facts = [
        f"On {day}, {person}, the {role} of {city}, spoke to reporters.",
        f"{person} said the city plans to {plan} next year.",
    ]
    other_city, other_person = rng.choice([c for c in CITIES if c != city]), rng.choice([p for p in PEOPLE if p != person])
    other_plan = rng.choice([e for e in EVENTS if e[0] != plan])[0]
    # Distractors name another city, person and plan, so copying the first name seen is not enough.
    distractors = [f"Last year {other_person} visited {other_city} to {other_plan}, without success.",
                   f"In {other_city}, a similar plan to {other_plan} was dropped."]
    fillers = rng.sample(FILLERS, k=rng.randint(1, 3)) + rng.sample(distractors, k=1)
    rng.shuffle(fillers)
    sentences = fillers[:1] + facts[:1] + fillers[1:2] + facts[1:] + fillers[2:]
    return {"id": f"sum-{index:05d}", "document": " ".join(sentences), "summary": f"{city} {outcome}, says its {role}."}


GENERATORS = {"summarize": (summarize_row, 3000, 200)}


def write_split(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main(root: Path = Path("data")) -> None:
    for name, (make_row, num_train, num_validation) in GENERATORS.items():
        rng = random.Random(f"hftk-{name}")
        rows = [make_row(rng, i) for i in range(num_train + num_validation)]
        write_split(root / name / "train.jsonl", rows[:num_train])
        write_split(root / name / "validation.jsonl", rows[num_train:])


if __name__ == "__main__":
    main()
