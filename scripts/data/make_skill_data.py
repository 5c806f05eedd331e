#!/usr/bin/env python3
"""Makes the shipped temporal and tool-use data (our own, generated; same license as the code).

Temporal perception (Llama 2 paper, section 5.1): the system prompt states today's date and the
knowledge cut-off; the user asks how long ago a dated event happened, in what year it happened, or
what happened in a year. Events after the cut-off, and years after it, get "I cannot know". The
years since an event are worked out with the calculator, as a person would.

Tool use: the assistant writes a call where its value belongs, `That is <call>calculator(12 *
7)</call>` or `The capital of Veltria is <call>search(capital of Veltria)</call>`; the runtime
appends `<result>84</result>` and the assistant goes on (` apples.`): the result is read in place,
as in Toolformer. Training data holds the results as the runtime writes them; they carry no loss.

  data/chat/temporal_train.jsonl  1500 dated chats
  data/eval/temporal.jsonl         100 held-out dated prompts (`expected`, `group`: 50 known, 50 cutoff)
  data/chat/tools_train.jsonl     3000 chats with calls: arithmetic word problems (1,500 with
                                  one-digit operands, 600 with two-digit ones) and 900 look-ups
  data/eval/tools.jsonl            100 held-out prompts (`expected`; `group`: 50 calculator
                                  (one-digit operands), 25 calculator-2-digit, 25 search)
  data/tools/search.jsonl          the simulated search corpus (`key`, `value`), 300 entries

Held out: the "today" years 2014, 2021 and 2029 (never today in training), and the eval's
(event, today, cut-off) combinations; for look-ups, 60 countries of the corpus never asked about in
training; for arithmetic, the numbers are drawn afresh (a problem seen in training is skipped).
Most problems have one-digit operands: the tiny model copies a one-token number from the question
into the call, not yet a two-digit one (docs/results.md); the two-digit group measures that.

Usage: python scripts/data/make_skill_data.py
"""
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
MONTHS = "January February March April May June July August September October November December".split()

# (year, event): well-known dated events.
EVENTS = [
    (1903, "the first powered flight"), (1912, "the sinking of the Titanic"),
    (1914, "the start of the First World War"), (1918, "the end of the First World War"),
    (1929, "the Wall Street crash"), (1939, "the start of the Second World War"),
    (1945, "the end of the Second World War"), (1947, "the independence of India"),
    (1953, "the first ascent of Mount Everest"), (1957, "the launch of Sputnik"),
    (1961, "the first human spaceflight"), (1969, "the first Moon landing"),
    (1975, "the end of the Vietnam War"), (1981, "the first Space Shuttle flight"),
    (1986, "the Chernobyl disaster"), (1989, "the fall of the Berlin Wall"),
    (1991, "the first website"), (1994, "the opening of the Channel Tunnel"),
    (1997, "the return of Hong Kong to China"), (1998, "the founding of Google"),
    (2001, "the launch of Wikipedia"), (2004, "the founding of Facebook"),
    (2007, "the first iPhone"), (2008, "the Beijing Olympics"),
    (2009, "the first Bitcoin block"), (2010, "the eruption of Eyjafjallajokull"),
    (2011, "the Fukushima disaster"), (2012, "the London Olympics"),
    (2013, "the election of Pope Francis"), (2014, "the Rosetta comet landing"),
    (2015, "the Paris climate agreement"), (2016, "the Rio Olympics"),
    (2017, "the first neutron star merger seen"), (2018, "the Pyeongchang Winter Olympics"),
    (2019, "the first image of a black hole"), (2020, "the start of the COVID-19 pandemic"),
    (2021, "the launch of the James Webb telescope"), (2022, "the Qatar World Cup"),
    (2023, "the first landing near the Moon's south pole"), (2024, "the Paris Olympics"),
]
HELD_OUT_TODAY = {2014, 2021, 2029}


def cap(s):
    return s[0].upper() + s[1:]


def dated_system(rng, today_years):
    today = rng.choice(today_years)
    cutoff = today - rng.randint(1, 3)
    day, month = rng.randint(1, 28), rng.choice(MONTHS)
    return today, cutoff, f"Today is {day} {month} {today}. Your knowledge cut-off is {cutoff}."


def cannot_know(cutoff):
    return f"I cannot know: my knowledge stops in {cutoff}."


def temporal(rng, today_years):
    """One dated chat: (system, question, answer, expected, group)."""
    today, cutoff, system = dated_system(rng, today_years)
    kind = rng.choice(["ago", "ago", "year", "what"])
    if kind == "what":
        # A year after the cut-off half of the time (an event's year or any year up to today).
        if rng.random() < 0.5:
            year = rng.randint(cutoff + 1, today)
        else:
            year = rng.choice([y for y, _ in EVENTS if y <= cutoff])
        question = rng.choice(["What happened in {y}?", "What big event happened in {y}?"]).format(y=year)
        if year > cutoff:
            return system, question, cannot_know(cutoff), "cannot know", "cutoff"
        event = next(e for y, e in EVENTS if y == year)
        return system, question, f"In {year}: {event}.", event, "known"
    # Events near the cut-off 40% of the time, so that the same event is sometimes before it and
    # sometimes after: the answer depends on the cut-off, not on the event alone.
    recent = [e for e in EVENTS if cutoff - 4 <= e[0] <= today]
    year, event = rng.choice(recent if recent and rng.random() < 0.4 else [e for e in EVENTS if e[0] <= today])
    if kind == "year":
        question = rng.choice(["In what year was {e}?", "When was {e}?"]).format(e=event)
        if year > cutoff:
            return system, question, cannot_know(cutoff), "cannot know", "cutoff"
        return system, question, f"{cap(event)} was in {year}.", str(year), "known"
    question = rng.choice(["How long ago was {e}?", "How many years ago was {e}?"]).format(e=event)
    if year > cutoff:
        return system, question, cannot_know(cutoff), "cannot know", "cutoff"
    years = today - year
    answer = f"{cap(event)} was in {year}, <call>calculator({today} - {year})</call><result>{years}</result> years ago."
    return system, question, answer, f"{years} years ago", "known"


SYLLABLES = "ka lo ve tri mor dan sel ra bo nix tal quen fa ri zo mel gar pu sin dor".split()
THINGS = "apples pencils books coins stamps marbles cookies shells cards stickers".split()
NAMES = "Alice Bob Carol David Emma Frank Grace Henry Irene Jack Karen Louis Maria Nathan Olivia Peter".split()


def countries(rng, n):
    seen, out = set(), []
    while len(out) < n:
        country = cap("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))) + "ia"
        capital = cap("".join(rng.choice(SYLLABLES) for _ in range(2)))
        if country not in seen:
            seen.add(country)
            out.append((country, capital))
    return out


def arithmetic(rng, digits):
    """An arithmetic word problem with `digits`-digit operands: (question, answer, expected)."""
    name, things = rng.choice(NAMES), rng.choice(THINGS)
    op = rng.choice("+-*/q")
    low, high = (2, 9) if digits == 1 else (10, 99)
    a, b = rng.randint(low, high), rng.randint(low, high)
    if op == "+":
        question, expr, r = f"{name} has {a} {things} and gets {b} more. How many {things} does {name} have now?", f"{a} + {b}", a + b
        answer = f"{name} has {{}} {things} now."
    elif op == "-":
        a, b = max(a, b) + (10 if digits == 2 else 1), min(a, b)
        question, expr, r = f"{name} had {a} {things} and gave away {b}. How many {things} are left?", f"{a} - {b}", a - b
        answer = f"{{}} {things} are left."
    elif op == "*":
        b = rng.randint(3, 9)
        a = a if digits == 2 else rng.randint(2, 9)
        question, expr, r = f"{name} buys {a} boxes of {b} {things}. How many {things} is that?", f"{a} * {b}", a * b
        answer = f"That is {{}} {things}."
    elif op == "/":
        b = rng.randint(2, 9)
        a = a if digits == 2 else rng.randint(2, 9)
        question, expr, r = f"{name} shares {a * b} {things} equally among {b} friends. How many does each friend get?", f"{a * b} / {b}", a
        answer = f"Each friend gets {{}} {things}."
    else:
        sym = rng.choice("+*")
        r = a + b if sym == "+" else a * b
        question, expr, answer = f"What is {a} {sym} {b}?", f"{a} {sym} {b}", f"{a} {sym} {b} is {{}}."
    # The call stands where its value goes, and the result is read in place (Toolformer's
    # inline calls): the sentence goes on after it without restating the number.
    return question, answer.format(f"<call>calculator({expr})</call><result>{r}</result>"), str(r)


def lookup(rng, country, capital):
    question = rng.choice(["What is the capital of {c}?", "Which city is the capital of {c}?"]).format(c=country)
    answer = f"The capital of {country} is <call>search(capital of {country})</call><result>{capital}</result>."
    return question, answer, capital


def chat(system, question, answer):
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def prompt(system, question, expected, group):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return {"messages": messages, "expected": expected, "group": group}


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main():
    rng = random.Random(20)
    train_years = [y for y in range(2009, 2034) if y not in HELD_OUT_TODAY]
    rows, seen = [], set()
    for _ in range(1500):
        system, q, a, _, _ = temporal(rng, train_years)
        rows.append(chat(system, q, a))
        seen.add((system, q))
    write(ROOT / "data/chat/temporal_train.jsonl", rows)
    evals, wanted = [], {"known": 50, "cutoff": 50}
    while len(evals) < 100:
        system, q, _, expected, group = temporal(rng, sorted(HELD_OUT_TODAY))
        if (system, q) not in seen and wanted[group] > 0:
            wanted[group] -= 1
            seen.add((system, q))
            evals.append(prompt(system, q, expected, group))
    write(ROOT / "data/eval/temporal.jsonl", evals)

    corpus = countries(rng, 300)
    write(ROOT / "data/tools/search.jsonl", [{"key": f"capital of {c}", "value": k} for c, k in corpus])
    asked, held = corpus[:240], corpus[240:]
    rows, seen = [], set()
    for i in range(3000):
        if i % 10 < 3:
            q, a, _ = lookup(rng, *rng.choice(asked))
        else:
            q, a, _ = arithmetic(rng, 1 if i % 10 < 8 else 2)
        rows.append(chat(None, q, a))
        seen.add(q)
    write(ROOT / "data/chat/tools_train.jsonl", rows)
    evals = []
    while len(evals) < 100:
        kind = len(evals) % 4
        if kind == 3:
            q, _, expected = lookup(rng, *rng.choice(held))
            group = "search"
        else:
            digits = 2 if kind == 2 else 1
            q, _, expected = arithmetic(rng, digits)
            group = "calculator" if digits == 1 else "calculator-2-digit"
        if q not in seen:
            seen.add(q)
            evals.append(prompt(None, q, expected, group))
    write(ROOT / "data/eval/tools.jsonl", evals)
    print("wrote data/chat/{temporal,tools}_train.jsonl, data/eval/{temporal,tools}.jsonl, data/tools/search.jsonl")


if __name__ == "__main__":
    main()
