#!/usr/bin/env python3
"""Makes the shipped chat data under data/chat/ (our own, generated; same license as the code).

Each conversation states a fact in the user turn and asks for it back; the assistant answers with
the fact. A model can only answer held-out conversations by reading the question, so the share of
held-out answers that contain the fact (`expected`) is a success criterion that an untuned
pre-trained model fails and supervised fine-tuning must raise.

  data/chat/train.jsonl   2000 conversations (some with a system prompt, some multi-turn)
  data/chat/eval.jsonl     100 held-out single-turn conversations with `expected`
  data/chat/gatt_instructions.txt   instructions for the Ghost Attention example

Usage: python scripts/data/make_chat_data.py
"""
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent.parent / "data" / "chat"
NAMES = "Alice Bob Carol David Emma Frank Grace Henry Irene Jack Karen Louis Maria Nathan Olivia Peter Quinn Rachel Samuel Tina Victor Wendy Xavier Yvonne Zachary Anna Brian Clara Daniel Elena Felix Hannah Isaac Julia Kevin Laura Martin Nora Oscar Paula".split()
CITIES = "Paris London Boston Chicago Denver Madrid Rome Berlin Vienna Dublin Oslo Lisbon Prague Warsaw Athens Cairo Tokyo Sydney Toronto Seattle Houston Miami Atlanta Dallas Phoenix Portland Austin Detroit Memphis Nashville".split()
COLORS = "red blue green yellow purple orange black white pink brown gray silver".split()
ANIMALS = "cat dog horse rabbit goat sheep duck parrot turtle hamster".split()
SYSTEMS = ["You are a helpful assistant.", "Answer in one short sentence.", "You are a friendly assistant who answers briefly."]


def fact(rng):
    kind = rng.choice(["name", "city", "color", "pets"])
    if kind == "name":
        v = rng.choice(NAMES)
        return f"My name is {v}.", "What is my name?", f"Your name is {v}.", v
    if kind == "city":
        v = rng.choice(CITIES)
        return f"I live in {v}.", "Where do I live?", f"You live in {v}.", v
    if kind == "color":
        v = rng.choice(COLORS)
        return f"My favorite color is {v}.", "What is my favorite color?", f"Your favorite color is {v}.", v
    n, a = rng.randint(2, 9), rng.choice(ANIMALS)
    return f"I have {n} {a}s.", f"How many {a}s do I have?", f"You have {n} {a}s.", f"{n} {a}s"


def conversation(rng, multi):
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    turns = 2 if multi else 1
    expected = None
    for _ in range(turns):
        statement, question, answer, value = fact(rng)
        messages.append({"role": "user", "content": f"{statement} {question}"})
        messages.append({"role": "assistant", "content": answer})
        expected = value
    return {"messages": messages, "expected": expected}


def main():
    rng = random.Random(0)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "train.jsonl", "w") as f:
        for i in range(2000):
            f.write(json.dumps(conversation(rng, multi=i % 5 == 4)) + "\n")
    with open(OUT / "eval.jsonl", "w") as f:
        for _ in range(100):
            c = conversation(rng, multi=False)
            f.write(json.dumps(c) + "\n")
    (OUT / "gatt_instructions.txt").write_text("Always answer in French.\nAct as a pirate.\nAnswer in one word.\nAlways mention the weather.\n")
    (OUT / "multiturn.jsonl").write_text("".join(json.dumps(conversation(rng, multi=True)) + "\n" for _ in range(20)))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
