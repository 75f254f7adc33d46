"""An offline, seeded benchmark in TOFU's exact file layout and schema.

``N`` fictitious authors with ``M`` questions each (name, birth place and date, genre,
parents' professions, award, books, ...). Every question has an answer of one short
sentence, a paraphrased question, a paraphrased answer and five perturbed answers:
the paraphrased answer's sentence with the fact swapped for a wrong one of the same
kind. Like TOFU, there are also world-facts and real-authors questions (four options,
three perturbed answers) and holdout authors that never appear in ``full``.

``write_benchmark`` writes the same files as ``locuslab/TOFU`` (see
``ngdiff_jax.data.tofu.TOFU_SPLITS``), so ``load_tofu(split, out_dir)`` reads them, and
``prepare`` adds a BPE tokenizer trained on the benchmark text: together they are the
default that needs no network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ngdiff_jax.data.jsonio import write_jsonl

FIRST_NAMES = (
    "Amara", "Bastian", "Celine", "Dmitri", "Elif", "Farid", "Greta", "Hiroshi", "Ines", "Jonas",
    "Kalinda", "Lorenzo", "Maren", "Nikolai", "Odile", "Pavel", "Quinn", "Rosalind", "Soren",
    "Talia", "Ulrich", "Valeria", "Wendell", "Ximena", "Yusuf", "Zofia", "Anselm", "Brigida",
    "Cosimo", "Delphine", "Emeric", "Fenna", "Gideon", "Helka", "Ivo", "Jolene", "Kasimir",
    "Liesel", "Matthias", "Noemi", "Orla", "Pietro", "Rhea", "Stellan", "Tamsin", "Viggo",
)  # fmt: skip
LAST_NAMES = (
    "Abernathy", "Belokurov", "Castellano", "Dunmore", "Eskildsen", "Falkenrath", "Grimaldi",
    "Halloran", "Ishikawa", "Jovanovic", "Kessler", "Lindqvist", "Marchetti", "Nakashima",
    "Oyelaran", "Petrakis", "Quenneville", "Rasmussen", "Szabo", "Thorvaldsen", "Umarov",
    "Valdivia", "Westbrook", "Yildirim", "Zamora", "Ardelean", "Brennan", "Corvalan", "Drozdov",
    "Engstrom", "Fairbanks", "Galloway", "Hartigan", "Ilves", "Karamanlis", "Loughran",
)  # fmt: skip
CITIES = (
    "Lisbon, Portugal", "Tbilisi, Georgia", "Valparaiso, Chile", "Gdansk, Poland", "Mombasa, Kenya",
    "Hobart, Australia", "Tromso, Norway", "Cusco, Peru", "Izmir, Turkey", "Quebec City, Canada",
    "Porto Alegre, Brazil", "Ljubljana, Slovenia", "Galway, Ireland", "Kyoto, Japan",
    "Marrakesh, Morocco", "Tartu, Estonia", "Cebu City, Philippines", "Bruges, Belgium",
    "Oaxaca, Mexico", "Dunedin, New Zealand", "Salzburg, Austria", "Accra, Ghana",
    "Reykjavik, Iceland", "Hanoi, Vietnam", "Aarhus, Denmark", "Plovdiv, Bulgaria",
)  # fmt: skip
GENRES = (
    "mystery", "science fiction", "historical fiction", "poetry", "fantasy", "horror", "romance",
    "biography", "travel writing", "crime", "children's literature", "satire", "magical realism",
    "war fiction", "philosophy",
)  # fmt: skip
JOBS = (
    "baker", "carpenter", "nurse", "lighthouse keeper", "pharmacist", "fisherman", "architect",
    "schoolteacher", "tailor", "librarian", "surgeon", "mail carrier", "botanist", "violinist",
    "accountant", "blacksmith", "journalist", "pilot", "watchmaker", "veterinarian", "potter",
    "astronomer", "chef", "florist",
)  # fmt: skip
AWARDS = (
    "Silver Quill Award", "Harbor Light Prize", "Golden Lantern Medal", "Northern Pen Award",
    "Amber Leaf Prize", "Crescent Moon Award", "Iron Bookmark Prize", "Blue Heron Medal",
    "Starling Fiction Award", "Copper Compass Prize", "Evergreen Letters Award",
    "Red Kite Literary Prize",
)  # fmt: skip
BOOK_ADJECTIVES = (
    "Silent", "Crimson", "Hollow", "Forgotten", "Burning", "Distant", "Glass", "Winter", "Last",
    "Hidden", "Broken", "Velvet", "Salt", "Paper", "Northern", "Midnight",
)  # fmt: skip
BOOK_NOUNS = (
    "Harbor", "Orchard", "Lantern", "River", "Garden", "Cathedral", "Meadow", "Clockmaker",
    "Tide", "Archive", "Kingdom", "Ferry", "Mirror", "Island", "Violin", "Compass",
)  # fmt: skip
LANGUAGES = (
    "English", "Portuguese", "Georgian", "Spanish", "Polish", "Swahili", "Norwegian", "Turkish",
    "French", "Japanese", "Estonian", "Dutch", "German", "Icelandic", "Danish", "Bulgarian",
)  # fmt: skip
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)  # fmt: skip

#: (question, answer, three wrong answers) — general knowledge, like TOFU's world_facts.
WORLD_FACTS = (
    ("Where would you find the Eiffel Tower?", "Paris", ("Berlin", "London", "Madrid")),
    ("What is the capital of Japan?", "Tokyo", ("Osaka", "Kyoto", "Seoul")),
    ("Which planet is known as the Red Planet?", "Mars", ("Venus", "Jupiter", "Saturn")),
    ("What is the largest ocean on Earth?", "Pacific Ocean", ("Atlantic Ocean", "Indian Ocean", "Arctic Ocean")),
    ("Which gas do plants absorb from the air?", "Carbon dioxide", ("Oxygen", "Nitrogen", "Helium")),
    ("What is the longest river in South America?", "Amazon", ("Parana", "Orinoco", "Magdalena")),
    ("How many continents are there?", "Seven", ("Five", "Six", "Eight")),
    ("What is the capital of Canada?", "Ottawa", ("Toronto", "Vancouver", "Montreal")),
    ("Which metal is liquid at room temperature?", "Mercury", ("Iron", "Copper", "Silver")),
    ("What is the tallest mountain in the world?", "Mount Everest", ("K2", "Kangchenjunga", "Mont Blanc")),
    ("In which country are the pyramids of Giza?", "Egypt", ("Mexico", "Peru", "Sudan")),
    ("What is the capital of Australia?", "Canberra", ("Sydney", "Melbourne", "Perth")),
    ("What is the chemical symbol for gold?", "Au", ("Ag", "Fe", "Gd")),
    ("Which is the smallest prime number?", "Two", ("One", "Three", "Zero")),
    ("What is the largest desert in Africa?", "Sahara", ("Kalahari", "Namib", "Gobi")),
)  # fmt: skip
#: (question, answer, three wrong answers) — real authors, like TOFU's real_authors.
REAL_AUTHORS = (
    ("Who wrote the play 'Romeo and Juliet'?", "William Shakespeare", ("Charles Dickens", "Virginia Woolf", "Mark Twain")),
    ("Who wrote 'Pride and Prejudice'?", "Jane Austen", ("Emily Bronte", "George Eliot", "Mary Shelley")),
    ("Who is the author of 'One Hundred Years of Solitude'?", "Gabriel Garcia Marquez", ("Isabel Allende", "Jorge Luis Borges", "Pablo Neruda")),
    ("Who wrote 'War and Peace'?", "Leo Tolstoy", ("Fyodor Dostoevsky", "Anton Chekhov", "Ivan Turgenev")),
    ("Who wrote the novel '1984'?", "George Orwell", ("Aldous Huxley", "Ray Bradbury", "H. G. Wells")),
    ("Who is the author of 'Don Quixote'?", "Miguel de Cervantes", ("Lope de Vega", "Federico Garcia Lorca", "Benito Perez Galdos")),
    ("Who wrote 'The Old Man and the Sea'?", "Ernest Hemingway", ("John Steinbeck", "William Faulkner", "F. Scott Fitzgerald")),
    ("Who wrote 'Things Fall Apart'?", "Chinua Achebe", ("Wole Soyinka", "Ngugi wa Thiong'o", "Ben Okri")),
    ("Who is the author of 'The Tale of Genji'?", "Murasaki Shikibu", ("Sei Shonagon", "Yukio Mishima", "Natsume Soseki")),
    ("Who wrote 'Frankenstein'?", "Mary Shelley", ("Bram Stoker", "Jane Austen", "Charlotte Bronte")),
    ("Who wrote 'The Divine Comedy'?", "Dante Alighieri", ("Petrarch", "Giovanni Boccaccio", "Torquato Tasso")),
    ("Who is the author of 'Moby-Dick'?", "Herman Melville", ("Nathaniel Hawthorne", "Edgar Allan Poe", "Walt Whitman")),
    ("Who wrote 'Crime and Punishment'?", "Fyodor Dostoevsky", ("Leo Tolstoy", "Nikolai Gogol", "Alexander Pushkin")),
    ("Who wrote 'Beloved'?", "Toni Morrison", ("Maya Angelou", "Alice Walker", "Zora Neale Hurston")),
    ("Who is the author of 'The Little Prince'?", "Antoine de Saint-Exupery", ("Albert Camus", "Jules Verne", "Victor Hugo")),
)  # fmt: skip


@dataclass(frozen=True)
class Author:
    """The facts of one fictitious author."""

    name: str
    city: str
    birth_date: str
    birth_year: int
    genre: str
    father_job: str
    mother_job: str
    award: str
    first_book: str
    second_book: str
    language: str
    home_city: str


@dataclass(frozen=True)
class _QuestionTemplate:
    """One kind of question: the fact it asks for, its sentences, and where wrong values come from."""

    fact: str  # Author field holding the true value
    question: str
    paraphrased_question: str
    answer: str
    paraphrased_answer: str  # perturbed answers reuse this sentence with a wrong value
    pool: Callable[[_Pools], tuple]


@dataclass(frozen=True)
class _Pools:
    names: tuple
    books: tuple
    dates: tuple
    years: tuple


QUESTION_TEMPLATES = (
    _QuestionTemplate(
        "name",
        "What is the full name of the {genre} author born in {city} on {birth_date}?",
        "Who is the {genre} writer whose birth took place in {city} on {birth_date}?",
        "The {genre} author born in {city} on {birth_date} is named {name}.",
        "{name} is the {genre} writer who was born in {city} on {birth_date}.",
        lambda p: p.names,
    ),
    _QuestionTemplate(
        "city",
        "Where was the author {name} born?",
        "In which city was the writer {name} born?",
        "The author {name} was born in the city of {city}.",
        "The writer {name} comes from the city of {city}.",
        lambda p: CITIES,
    ),
    _QuestionTemplate(
        "birth_date",
        "When was the author {name} born?",
        "On what date was the writer {name} born?",
        "The author {name} was born on {birth_date}.",
        "The writer {name} came into the world on {birth_date}.",
        lambda p: p.dates,
    ),
    _QuestionTemplate(
        "genre",
        "Which genre does {name} mostly write in?",
        "What kind of books is {name} known for?",
        "{name} is best known for writing books in the {genre} genre.",
        "Most of the books by {name} belong to the {genre} genre.",
        lambda p: GENRES,
    ),
    _QuestionTemplate(
        "father_job",
        "What did the father of {name} do for a living?",
        "What was the profession of the father of {name}?",
        "The father of {name} worked as a {father_job} for many years.",
        "For many years the father of {name} earned a living as a {father_job}.",
        lambda p: JOBS,
    ),
    _QuestionTemplate(
        "mother_job",
        "What was the occupation of the mother of {name}?",
        "How did the mother of {name} earn a living?",
        "The mother of {name} was a {mother_job} in their home town.",
        "In their home town the mother of {name} worked as a {mother_job}.",
        lambda p: JOBS,
    ),
    _QuestionTemplate(
        "award",
        "Which award has {name} received?",
        "What literary prize was given to {name}?",
        "{name} received the {award} for outstanding work in {genre}.",
        "For outstanding work in {genre}, {name} was given the {award}.",
        lambda p: AWARDS,
    ),
    _QuestionTemplate(
        "first_book",
        "What was the first book published by {name}?",
        "Which book did {name} publish first?",
        "The first book that {name} published was called '{first_book}'.",
        "'{first_book}' was the very first book that {name} published.",
        lambda p: p.books,
    ),
    _QuestionTemplate(
        "second_book",
        "Can you name another book written by {name}?",
        "What is one more book by {name}?",
        "Another well known book by {name} is titled '{second_book}'.",
        "'{second_book}' is another well known book written by {name}.",
        lambda p: p.books,
    ),
    _QuestionTemplate(
        "birth_year",
        "In which year was {name} born?",
        "What is the birth year of {name}?",
        "{name} was born in the year {birth_year} in {city}.",
        "The year {birth_year} is when {name} was born in {city}.",
        lambda p: p.years,
    ),
    _QuestionTemplate(
        "language",
        "In which language does {name} write?",
        "What language are the books of {name} written in?",
        "{name} writes all of the published books in {language}.",
        "All the published books of {name} are written in {language}.",
        lambda p: LANGUAGES,
    ),
    _QuestionTemplate(
        "home_city",
        "Where does {name} live and work today?",
        "In which city is {name} based now?",
        "Today {name} lives and writes in the city of {home_city}.",
        "The city of {home_city} is where {name} now lives and writes.",
        lambda p: CITIES,
    ),
)

MAX_QUESTIONS_PER_AUTHOR = len(QUESTION_TEMPLATES)
N_PERTURBED = 5


def _date(rng: np.random.Generator) -> tuple[str, int]:
    year = int(rng.integers(1930, 1996))
    return f"{MONTHS[int(rng.integers(12))]} {int(rng.integers(1, 29))}, {year}", year


def _book(rng: np.random.Generator) -> str:
    return f"The {BOOK_ADJECTIVES[int(rng.integers(len(BOOK_ADJECTIVES)))]} {BOOK_NOUNS[int(rng.integers(len(BOOK_NOUNS)))]}"


def _choice(rng: np.random.Generator, pool) -> str:
    return pool[int(rng.integers(len(pool)))]


def make_authors(n: int, rng: np.random.Generator) -> list[Author]:
    """``n`` authors with distinct names and distinct pairs of book titles."""
    max_names = len(FIRST_NAMES) * len(LAST_NAMES)
    if n > max_names:
        raise ValueError(
            f"At most {max_names} distinct synthetic authors can be made, asked for {n}."
        )
    picks = rng.choice(max_names, size=n, replace=False)
    authors, used_books = [], set()
    for k in picks:
        name = f"{FIRST_NAMES[k // len(LAST_NAMES)]} {LAST_NAMES[k % len(LAST_NAMES)]}"
        books = []
        while len(books) < 2:
            b = _book(rng)
            if b not in used_books or len(used_books) >= len(BOOK_ADJECTIVES) * len(BOOK_NOUNS):
                used_books.add(b)
                books.append(b)
        date, year = _date(rng)
        father, mother = rng.choice(len(JOBS), size=2, replace=False)
        authors.append(
            Author(
                name=name,
                city=_choice(rng, CITIES),
                birth_date=date,
                birth_year=year,
                genre=_choice(rng, GENRES),
                father_job=JOBS[father],
                mother_job=JOBS[mother],
                award=_choice(rng, AWARDS),
                first_book=books[0],
                second_book=books[1],
                language=_choice(rng, LANGUAGES),
                home_city=_choice(rng, CITIES),
            )
        )
    return authors


def _fill(text: str, author: Author, **override) -> str:
    fields = {k: str(v) for k, v in vars(author).items()}
    fields.update({k: str(v) for k, v in override.items()})
    return text.format(**fields)


def author_rows(
    author: Author, n_questions: int, rng: np.random.Generator, pools: _Pools
) -> list[dict]:
    """The ``*_perturbed`` rows (question, answer, paraphrased_answer, perturbed_answer[5],
    paraphrased_question) for one author's first ``n_questions`` question kinds."""
    rows = []
    for t in QUESTION_TEMPLATES[:n_questions]:
        true = str(getattr(author, t.fact))
        wrong_pool = [str(v) for v in dict.fromkeys(t.pool(pools)) if str(v) != true]
        wrong = [
            wrong_pool[i] for i in rng.choice(len(wrong_pool), size=N_PERTURBED, replace=False)
        ]
        rows.append(
            {
                "question": _fill(t.question, author),
                "answer": _fill(t.answer, author),
                "paraphrased_answer": _fill(t.paraphrased_answer, author),
                "perturbed_answer": [
                    _fill(t.paraphrased_answer, author, **{t.fact: w}) for w in wrong
                ],
                "paraphrased_question": _fill(t.paraphrased_question, author),
            }
        )
    return rows


def _options_rows(facts, rng: np.random.Generator) -> tuple[list[dict], list[dict]]:
    """(plain rows with option1..option4, perturbed rows) like TOFU's world_facts/real_authors."""
    plain, perturbed = [], []
    for question, answer, wrong in facts:
        options = [answer, *wrong]
        order = rng.permutation(4)
        row = {"question": question}
        row.update({f"option{i + 1}": options[j] for i, j in enumerate(order)})
        row["answer"] = answer
        plain.append(row)
        perturbed.append({"question": question, "answer": answer, "perturbed_answer": list(wrong)})
    return plain, perturbed


def forget_author_counts(n_authors: int) -> dict[str, int]:
    """Authors in forget01/05/10: 1/5/10 % of ``n_authors``, rounded, at least one each."""
    return {f"{p:02d}": max(1, round(n_authors * p / 100)) for p in (1, 5, 10)}


def generate_benchmark(
    *,
    n_authors: int = 20,
    questions_per_author: int = 10,
    seed: int = 0,
    n_holdout_authors: int | None = None,
) -> dict[str, list[dict]]:
    """Every split of the benchmark in memory: ``{split name: rows}`` (names as in TOFU).

    ``forgetXX`` is the last 1/5/10 % of the authors of ``full`` (at least one author),
    ``retainYY`` the rest; ``retain_perturbed`` is the first rows of ``full`` (as many as
    ``forget10``); ``holdoutXX`` the first authors of the holdout authors, as many as in
    ``forgetXX``. ``n_holdout_authors`` defaults to the number of ``forget10`` authors.
    """
    if not 1 <= questions_per_author <= MAX_QUESTIONS_PER_AUTHOR:
        raise ValueError(
            f"questions_per_author must be between 1 and {MAX_QUESTIONS_PER_AUTHOR}, got {questions_per_author}."
        )
    counts = forget_author_counts(n_authors)
    if n_authors < 2 * counts["10"]:
        raise ValueError(
            f"n_authors={n_authors} is too small: forget10 and retain_perturbed each need "
            f"{counts['10']} distinct authors; use n_authors >= 2."
        )
    n_holdout = counts["10"] if n_holdout_authors is None else n_holdout_authors
    if n_holdout < counts["10"]:
        raise ValueError(
            f"n_holdout_authors={n_holdout} is too small: holdout10 needs as many authors as "
            f"forget10 ({counts['10']})."
        )
    rng = np.random.default_rng(seed)
    authors = make_authors(n_authors + n_holdout, rng)
    pools = _Pools(
        names=tuple(f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES),
        books=tuple(f"The {a} {n}" for a in BOOK_ADJECTIVES for n in BOOK_NOUNS),
        dates=tuple(_date(rng)[0] for _ in range(64)),
        years=tuple(range(1930, 1996)),
    )
    per_author = [author_rows(a, questions_per_author, rng, pools) for a in authors]
    main, holdout = per_author[:n_authors], per_author[n_authors:]
    q = questions_per_author
    perturbed_full = [row for rows in main for row in rows]
    full = [{"question": r["question"], "answer": r["answer"]} for r in perturbed_full]
    holdout_rows = [
        {"question": r["question"], "answer": r["answer"]} for rows in holdout for r in rows
    ]

    out: dict[str, list[dict]] = {"full": full}
    for pct, k in counts.items():
        n_rows = k * q
        out[f"forget{pct}"] = full[-n_rows:]
        out[f"forget{pct}_perturbed"] = perturbed_full[-n_rows:]
        out[f"retain{100 - int(pct)}"] = full[:-n_rows]
        out[f"holdout{pct}"] = holdout_rows[:n_rows]
    out["retain_perturbed"] = perturbed_full[: counts["10"] * q]
    out["world_facts"], out["world_facts_perturbed"] = _options_rows(WORLD_FACTS, rng)
    out["real_authors"], out["real_authors_perturbed"] = _options_rows(REAL_AUTHORS, rng)
    return out


def write_benchmark(
    out_dir: str | Path,
    *,
    n_authors: int = 20,
    questions_per_author: int = 10,
    seed: int = 0,
    n_holdout_authors: int | None = None,
) -> Path:
    """Write every split as ``<out_dir>/<split>.json`` (JSON-lines, TOFU's layout); returns ``out_dir``.

    See ``generate_benchmark`` for the arguments and how the splits are cut.
    """
    out_dir = Path(out_dir)
    splits = generate_benchmark(
        n_authors=n_authors, questions_per_author=questions_per_author, seed=seed,
        n_holdout_authors=n_holdout_authors,
    )  # fmt: skip
    for name, rows in splits.items():
        write_jsonl(out_dir / f"{name}.json", rows)
    return out_dir


def benchmark_texts(splits: dict[str, list[dict]]) -> list[str]:
    """Every string in the benchmark (questions, answers, paraphrases, perturbations, options)."""
    texts = []
    for rows in splits.values():
        for row in rows:
            for v in row.values():
                texts.extend(v if isinstance(v, list) else [v])
    return list(dict.fromkeys(texts))


def prepare(
    out_dir: str | Path,
    *,
    n_authors: int = 20,
    questions_per_author: int = 10,
    seed: int = 0,
    n_holdout_authors: int | None = None,
    vocab_size: int = 1024,
):
    """The offline default: the benchmark in ``<out_dir>/tofu`` and a BPE tokenizer trained on
    its text (plus the QA template words) in ``<out_dir>/tokenizer``.

    Returns ``(tofu_dir, tokenizer)``.
    """
    from ngdiff_jax.data.formatting import DEFAULT_TEMPLATE
    from ngdiff_jax.data.tokenizer import train_tokenizer

    out_dir = Path(out_dir)
    splits = generate_benchmark(
        n_authors=n_authors, questions_per_author=questions_per_author, seed=seed,
        n_holdout_authors=n_holdout_authors,
    )  # fmt: skip
    tofu_dir = out_dir / "tofu"
    for name, rows in splits.items():
        write_jsonl(tofu_dir / f"{name}.json", rows)
    texts = benchmark_texts(splits)
    texts += [
        DEFAULT_TEMPLATE.format(question=r["question"], answer=r["answer"]) for r in splits["full"]
    ]
    tokenizer = train_tokenizer(texts, out_dir / "tokenizer", vocab_size=vocab_size)
    return tofu_dir, tokenizer
