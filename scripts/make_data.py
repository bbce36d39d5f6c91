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


def news_story(rng: random.Random) -> tuple[str, dict]:
    """A short story and its facts (who, role, city, plan, day), among distracting sentences."""
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
    return " ".join(sentences), {"city": city, "person": person, "role": role, "plan": plan, "outcome": outcome,
                                 "day": day}


def summarize_row(rng: random.Random, index: int) -> dict:
    document, facts = news_story(rng)
    return {"id": f"sum-{index:05d}", "document": document,
            "summary": f"{facts['city']} {facts['outcome']}, says its {facts['role']}."}


NOUNS = {"cat": ("chat", "m"), "dog": ("chien", "m"), "bird": ("oiseau", "m"), "fish": ("poisson", "m"),
         "house": ("maison", "f"), "car": ("voiture", "f"), "book": ("livre", "m"), "apple": ("pomme", "f"),
         "table": ("table", "f"), "garden": ("jardin", "m"), "boat": ("bateau", "m"), "door": ("porte", "f"),
         "child": ("enfant", "m"), "woman": ("femme", "f"), "man": ("homme", "m"), "city": ("ville", "f")}
ADJECTIVES = {"red": ("rouge", "rouge"), "small": ("petit", "petite"), "green": ("vert", "verte"),
              "black": ("noir", "noire"), "old": ("vieux", "vieille"), "new": ("nouveau", "nouvelle"),
              "happy": ("heureux", "heureuse"), "big": ("grand", "grande")}
VERBS = {"sees": "voit", "likes": "aime", "takes": "prend", "finds": "trouve", "follows": "suit", "wants": "veut"}


def _noun_phrase(rng: random.Random) -> tuple[str, str]:
    noun = rng.choice(list(NOUNS))
    french, gender = NOUNS[noun]
    article = "l'" if french[0] in "aeiouh" else ("le " if gender == "m" else "la ")
    if rng.random() < 0.6:
        adjective = rng.choice(list(ADJECTIVES))
        # French puts most adjectives after the noun, and they agree with its gender.
        form = ADJECTIVES[adjective][0 if gender == "m" else 1]
        return f"the {adjective} {noun}", f"{article}{french} {form}"
    return f"the {noun}", f"{article}{french}"


def translate_row(rng: random.Random, index: int) -> dict:
    (subject_en, subject_fr), (object_en, object_fr) = _noun_phrase(rng), _noun_phrase(rng)
    verb = rng.choice(list(VERBS))
    english = f"{subject_en} {verb} {object_en}."
    french = f"{subject_fr} {VERBS[verb]} {object_fr}."
    return {"id": f"tr-{index:05d}", "translation": {"en": english.capitalize(), "fr": french.capitalize()}}


def qa_row(rng: random.Random, index: int) -> dict:
    """SQuAD v2 schema: context, question, answers{text, answer_start}; a fifth have no answer."""
    story, facts = news_story(rng)
    questions = {
        "city": (f"Which city does the {facts['role']} {facts['person']} serve?", facts["city"]),
        "person": (f"Who is the {facts['role']} of {facts['city']}?", facts["person"]),
        "day": (f"On which day did {facts['person']} speak to reporters?", facts["day"]),
        "plan": (f"What does {facts['city']} plan to do next year?", facts["plan"]),
    }
    row = {"id": f"qa-{index:05d}", "title": "news", "context": story}
    if rng.random() < 0.2:
        absent = rng.choice([c for c in CITIES if c not in story])
        return {**row, "question": f"Who is the {facts['role']} of {absent}?", "answers": {"text": [], "answer_start": []}}
    question, answer = questions[rng.choice(sorted(questions))]
    # The stated sentence ("the mayor of X, spoke") comes first in the story: index() finds that one.
    return {**row, "question": question, "answers": {"text": [answer], "answer_start": [story.index(answer)]}}


CAPITALS = {"France": "Paris", "Norway": "Oslo", "Kenya": "Nairobi", "Peru": "Lima", "Vietnam": "Hanoi",
            "Ireland": "Dublin", "Ecuador": "Quito", "Tunisia": "Tunis", "Poland": "Warsaw", "Portugal": "Lisbon",
            "Ghana": "Accra", "Japan": "Tokyo", "Egypt": "Cairo", "Chile": "Santiago", "Canada": "Ottawa"}
WEATHER = ["sunny", "rainy", "windy", "cloudy", "snowy"]


def dialogue_row(rng: random.Random, index: int) -> dict:
    """Chat schema: messages [{role, content}]; the assistant's replies follow from the user's turns."""
    country = rng.choice(sorted(CAPITALS))
    weather = rng.choice(WEATHER)
    messages = [{"role": "system", "content": "You are a helpful travel assistant."}] if rng.random() < 0.5 else []
    messages += [
        {"role": "user", "content": f"What is the capital of {country}?"},
        {"role": "assistant", "content": f"The capital of {country} is {CAPITALS[country]}."},
    ]
    if rng.random() < 0.7:
        messages += [
            {"role": "user", "content": f"It looks {weather} there today. What should I bring?"},
            {"role": "assistant", "content": f"For {weather} weather in {CAPITALS[country]}, bring "
                                             f"{ {'sunny': 'a hat', 'rainy': 'an umbrella', 'windy': 'a jacket', 'cloudy': 'a sweater', 'snowy': 'warm boots'}[weather] }."},
        ]
    return {"id": f"dlg-{index:05d}", "messages": messages}


def text_row(rng: random.Random, index: int) -> dict:
    (subject, _), (obj, _) = _noun_phrase(rng), _noun_phrase(rng)
    verb = rng.choice(list(VERBS))
    city = rng.choice(CITIES)
    sentences = [f"In {city}, {subject} {verb} {obj}.", f"Then {subject} goes home.",
                 f"Everyone in {city} talks about it."]
    return {"id": f"txt-{index:05d}", "text": " ".join(sentences[: rng.randint(1, 3)])}


GENERATORS = {
    "summarize": (summarize_row, 3000, 200),
    "translate": (translate_row, 3000, 200),
    "qa": (qa_row, 3000, 200),
    "dialogue": (dialogue_row, 2000, 200),
    "text": (text_row, 3000, 200),
}


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
