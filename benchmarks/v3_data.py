"""Protocol v3's data: a held-out slice of SST-2's training set, and a code corpus split by document.

    python benchmarks/v3_data.py [--out runs/v3-data]

- ``sst2-select/SST-2/``: a GLUE folder whose ``train.tsv`` is SST-2's training set less a held-out slice and
  whose ``dev.tsv`` is that slice. Runs train and select (lr, early stopping) on it; the reported SST-2 dev set is
  scored once, at the end, from the original folder. SST-2's training set holds the phrases of each sentence as
  examples of their own, so a random slice would leak: the slice is whole sentences (the longest phrases), and
  every training phrase that is a part of one of them, or contains one, is dropped from training.
- ``stdlib/{train,heldout,test}.jsonl``: the Python standard library's source files that ship with this
  interpreter (no tests, no generated tables), one document per line (``{"text": ...}``), split by a hash of each
  file's path: 65 % train, 10 % held-out, 25 % test (~530 files in all). Held-out and test documents keep their first
  ``EVAL_CHARS`` characters, so that an evaluation costs minutes, not hours, on one CPU core.

Deterministic: the same interpreter and GLUE files give the same bytes. The counts and each file's SHA-256 are
written to benchmarks/results/v3/data.json (committed), and a rebuild that differs from it says so.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import random
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
GLUE = HERE.parent.parent / "shared" / "data" / "glue"
MANIFEST = HERE / "results" / "v3" / "data.json"
SST2_HELDOUT = 300  # sentences of the held-out slice (each evaluation of it is ~1.5 min on one core)
MIN_WORDS = 12  # a held-out example is a whole sentence: SST-2's training phrases this long are mostly sentences
EVAL_CHARS = 1200  # characters kept of each held-out / test document (~350 tokens of code)
STDLIB_HELDOUT, STDLIB_TEST = 40, 120  # documents
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings", "pydoc_data", "ensurepip"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_tsv(path: Path, rows: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("sentence\tlabel\n")
        f.writelines(f"{text}\t{label}\n" for text, label in rows)


def sst2_select(out: Path) -> dict:
    """The SST-2 selection folder (module doc); returns its counts."""
    with open(GLUE / "SST-2" / "train.tsv", encoding="utf-8") as f:
        rows = [(r["sentence"], r["label"]) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    sentences = sorted({r for r in rows if len(r[0].split()) >= MIN_WORDS})
    held = random.Random(0).sample(sentences, SST2_HELDOUT)
    held_texts = [f" {t.strip()} " for t, _ in held]  # padded: a phrase matches whole words only
    joined = "\n".join(held_texts)  # one string to search: a phrase inside any held-out sentence

    def leaks(text: str) -> bool:
        text = f" {text.strip()} "
        return text in joined or any(h in text for h in held_texts)

    train = [r for r in rows if not leaks(r[0])]
    folder = out / "sst2-select" / "SST-2"
    write_tsv(folder / "train.tsv", train)
    write_tsv(folder / "dev.tsv", held)
    # dropped: the held-out sentences and every training phrase inside one of them or containing one
    return {"train": len(train), "heldout": len(held), "dropped": len(rows) - len(train)}


def stdlib_documents() -> list[tuple[str, str]]:
    """(path relative to the standard library, text) of every source file kept (module doc), in path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS & set(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if 1_000 <= len(text) <= 200_000:
            docs.append((rel.as_posix(), text))
    return docs


def stdlib_split(out: Path) -> dict:
    """The code corpus (module doc); returns its counts."""
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "heldout": [], "test": []}
    for rel, text in stdlib_documents():
        bucket = int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 20
        splits["test" if bucket < 5 else "heldout" if bucket < 7 else "train"].append((rel, text))
    # The evaluation splits are drawn down to a fixed size (a fixed draw), each document cut to its first part.
    for name, size in (("heldout", STDLIB_HELDOUT), ("test", STDLIB_TEST)):
        kept = sorted(random.Random(name).sample(splits[name], size))
        splits[name] = [(rel, text[:EVAL_CHARS]) for rel, text in kept]
    folder = out / "stdlib"
    folder.mkdir(parents=True, exist_ok=True)
    for name, docs in splits.items():
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": text, "path": rel}) + "\n" for rel, text in docs)
    return {name: len(docs) for name, docs in splits.items()}


def build(out: Path) -> dict:
    counts = {"sst2-select": sst2_select(out), "stdlib": stdlib_split(out)}
    files = sorted(p for p in out.rglob("*") if p.suffix in (".tsv", ".jsonl"))
    return {
        "python": sys.version.split()[0],
        "counts": counts,
        "sha256": {p.relative_to(out).as_posix(): sha256(p) for p in files},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/v3-data", help="where the data is written (not committed)")
    args = parser.parse_args()
    manifest = build(Path(args.out))
    if MANIFEST.is_file():
        known = json.loads(MANIFEST.read_text())
        if known["sha256"] != manifest["sha256"]:
            sys.exit(
                f"error: the data built in {args.out} differs from {MANIFEST} (Python {known['python']} there, "
                f"{manifest['python']} here): runs on it are not comparable with the committed ones"
            )
    MANIFEST.parent.mkdir(parents=True, exist_ok=True)
    MANIFEST.write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps(manifest["counts"]))


if __name__ == "__main__":
    main()
