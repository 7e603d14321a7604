"""A synthetic MMECInstruct-schema catalog with generated product images.

Every answer follows a rule that can be read in the text, so a model fine-tuned on it can be shown
to learn (the rules are documented on `RULES`). Images are generated with Pillow: mixed PNG/JPEG,
varied sizes and modes (RGB, RGBA, palette, grayscale); `broken_images` adds files that must fail
(truncated, not an image, missing).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .errors import UsageError
from .tasks import TASKS

CATEGORIES = {
    "Electronics": ["phone", "laptop", "camera", "speaker", "charger", "headset"],
    "Kitchen": ["kettle", "skillet", "blender", "toaster", "mug", "knife"],
    "Toys": ["puzzle", "robot", "doll", "kite", "blocks", "yoyo"],
    "Sports": ["racket", "helmet", "dumbbell", "ball", "sneaker", "bottle"],
}
CATEGORY_OPTIONS = ["A: Electronics", "B: Kitchen", "C: Toys", "D: Sports"]
COLORS = ["red", "blue", "green", "black", "white", "yellow", "purple", "orange"]
BRANDS = ["Acme", "Zenith", "Nova", "Orbit", "Polar", "Vertex", "Lumen", "Atlas"]
_CAT_COLORS = {"Electronics": (40, 60, 160), "Kitchen": (200, 80, 40), "Toys": (220, 200, 40), "Sports": (40, 160, 80)}
_COLOR_RGB = {
    "red": (220, 30, 30),
    "blue": (30, 60, 220),
    "green": (30, 170, 60),
    "black": (20, 20, 20),
    "white": (240, 240, 240),
    "yellow": (240, 220, 30),
    "purple": (130, 40, 170),
    "orange": (250, 140, 20),
}

RULES = {
    "AP": "yes if the question asks about the product's size, color or material; no if it asks about "
    "delivery, price changes or the seller",
    "CC": "the option of the category that the title's product noun belongs to (fixed option order)",
    "PRP": "A (bought together) if product 2 is a 'bundle', B (viewed together) if a 'gift', C (similar) if a 'refill'",
    "PSI": "yes if the product title says 'compatible', no if it says 'incompatible'",
    "MPC": "A (exact) if the title says 'official', B (substitute) 'generic', C (complement) 'accessory', "
    "D (irrelevant) 'unrelated'",
    "SA": "A (positive) if the review says love/great/excellent, B (neutral) okay/fine/average, C "
    "(negative) broken/terrible/awful",
    "SR": "the option whose title says 'bestseller'",
}

INSTRUCTIONS = {
    "AP": "Given a product question, decide whether it is answerable from the product information. Answer yes or no.",
    "CC": "Given a product title, choose the product's category from the options.",
    "PRP": "Given two products, choose how they are related.",
    "PSI": "Given a query and a product, decide whether the product is a functional substitute. Answer yes or no.",
    "MPC": "Given a query and a product, choose how relevant the product is.",
    "SA": "Given a product review, choose the user's sentiment.",
    "SR": "Given the user's purchase history, choose the product they will buy next.",
}
_AP_YES = ["What size is the {n}?", "What color is the {n}?", "What material is the {n} made of?"]
_AP_NO = ["When will the {n} be delivered?", "Will the price of the {n} drop?", "Who is the seller of the {n}?"]
_PRP = {"A": "bundle", "B": "gift", "C": "refill"}
_PRP_OPTIONS = ["A: bought together", "B: viewed together", "C: similar"]
_MPC = {"A": "official", "B": "generic", "C": "accessory", "D": "unrelated"}
_MPC_OPTIONS = ["A: exact", "B: substitute", "C: complement", "D: irrelevant"]
_SA = {"A": ["love", "great", "excellent"], "B": ["okay", "fine", "average"], "C": ["broken", "terrible", "awful"]}
_SA_OPTIONS = ["A: positive", "B: neutral", "C: negative"]
_ORDINALS = ["1st", "2nd", "3rd", "4th"]


class _Gen:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def product(self, category: str | None = None) -> tuple[str, str, str, str]:
        cat = category or self.rng.choice(list(CATEGORIES))
        noun = self.rng.choice(CATEGORIES[cat])
        color = self.rng.choice(COLORS)
        brand = self.rng.choice(BRANDS)
        return f"{brand} {color} {noun}", cat, noun, color


def _record(g: _Gen, abbr: str) -> tuple[dict, list[tuple[str, str]]]:
    """One record (without images) and the (category, color) of each image to draw."""
    rng = g.rng
    if abbr == "AP":
        title, cat, noun, color = g.product()
        answer = rng.choice(["yes", "no"])
        question = rng.choice(_AP_YES if answer == "yes" else _AP_NO).format(n=noun)
        return {"input": {"question": question}, "options": [], "output": answer}, [(cat, color)]
    if abbr == "CC":
        title, cat, noun, color = g.product()
        answer = "ABCD"[list(CATEGORIES).index(cat)]
        return {"input": {"title": title}, "options": CATEGORY_OPTIONS, "output": answer}, [(cat, color)]
    if abbr == "PRP":
        t1, c1, _, col1 = g.product()
        answer = rng.choice(list(_PRP))
        t2, c2, _, col2 = g.product()
        return (
            {
                "input": {"product 1": t1, "product 2": f"{t2} {_PRP[answer]}"},
                "options": _PRP_OPTIONS,
                "output": answer,
            },
            [(c1, col1), (c2, col2)],
        )
    if abbr == "PSI":
        title, cat, noun, color = g.product()
        answer = rng.choice(["yes", "no"])
        word = "compatible" if answer == "yes" else "incompatible"
        return (
            {
                "input": {"query": f"{noun} for home", "product title": f"{title} {word}"},
                "options": [],
                "output": answer,
            },
            [(cat, color)],
        )
    if abbr == "MPC":
        title, cat, noun, color = g.product()
        answer = rng.choice(list(_MPC))
        return (
            {
                "input": {"query": f"{color} {noun}", "product title": f"{title} {_MPC[answer]}"},
                "options": _MPC_OPTIONS,
                "output": answer,
            },
            [(cat, color)],
        )
    if abbr == "SA":
        title, cat, noun, color = g.product()
        answer = rng.choice(list(_SA))
        review = f"The {noun} is {rng.choice(_SA[answer])}."
        return {"input": {"review": review}, "options": _SA_OPTIONS, "output": answer}, [(cat, color)]
    # SR: 2-3 history items, 3 options, one of which is the 'bestseller'
    n_hist = rng.choice([2, 3])
    history, draws = [], []
    for i in range(n_hist):
        title, cat, _, color = g.product()
        history.append(f"{_ORDINALS[i]}: {title}")
        draws.append((cat, color))
    answer_idx = rng.randrange(3)
    options = []
    for j in range(3):
        title, cat, _, color = g.product()
        options.append(f"{'ABC'[j]}: {title}{' bestseller' if j == answer_idx else ''}")
        draws.append((cat, color))
    return {"input": history, "options": options, "output": "ABC"[answer_idx]}, draws


def draw_image(path: Path, category: str, color: str, rng: random.Random, *, fmt: str, mode: str) -> None:
    """A product-like picture: the category's background, a shape in the product's color."""
    from PIL import Image, ImageDraw

    w, h = rng.choice([(48, 48), (64, 40), (80, 96), (120, 90), (32, 32)])
    img = Image.new("RGB", (w, h), _CAT_COLORS[category])
    d = ImageDraw.Draw(img)
    fill = _COLOR_RGB[color]
    box = (w // 5, h // 5, 4 * w // 5, 4 * h // 5)
    shape = list(CATEGORIES).index(category)
    if shape == 0:
        d.rectangle(box, fill=fill)
    elif shape == 1:
        d.ellipse(box, fill=fill)
    elif shape == 2:
        d.polygon([(w // 2, h // 5), (w // 5, 4 * h // 5), (4 * w // 5, 4 * h // 5)], fill=fill)
    else:
        d.rectangle((w // 3, h // 6, 2 * w // 3, 5 * h // 6), fill=fill)
    if mode == "RGBA":
        img = img.convert("RGBA")
        img.putalpha(200)
    elif mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    elif mode == "L":
        img = img.convert("L")
    if fmt == "JPEG" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    img.save(path, fmt)


def write_catalog(
    out_dir: str | Path,
    n_records: int,
    *,
    seed: int = 0,
    tasks: list[str] | None = None,
    splits: dict[str, float] | None = None,
    broken_images: int = 0,
    base_url: str | None = None,
) -> dict:
    """Write `records.jsonl`, `records.parquet` and `images/` under `out_dir`; return a manifest.

    Tasks cycle through `tasks` (default all 7). Splits are drawn with `splits` weights (default
    train .7, val .1, test .1, ood_test .1; OOD only for tasks that have it). `base_url` replaces the
    local image directory in URLs (e.g. an HTTP server serving `images/`).
    """

    out = Path(out_dir)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    g = _Gen(seed)
    abbrs = [t.upper() for t in (tasks or list(TASKS))]
    unknown = [a for a in abbrs if a not in TASKS]
    if unknown:
        raise UsageError(f"unknown task(s) {unknown}; valid: {list(TASKS)}")
    weights = splits or {"train": 0.7, "val": 0.1, "test": 0.1, "ood_test": 0.1}
    prefix = base_url.rstrip("/") if base_url else str(img_dir.resolve())
    rows, image_count = [], 0
    modes = ["RGB", "RGB", "RGBA", "P", "L"]
    for i in range(n_records):
        abbr = abbrs[i % len(abbrs)]
        rec, draws = _record(g, abbr)
        split = pick_split(g.rng, weights, abbr)
        urls = []
        for category, color in draws:
            fmt = g.rng.choice(["PNG", "JPEG"])
            name = f"img{image_count:06d}.{'png' if fmt == 'PNG' else 'jpg'}"
            draw_image(img_dir / name, category, color, g.rng, fmt=fmt, mode=g.rng.choice(modes))
            urls.append(f"{prefix}/{name}")
            image_count += 1
        rows.append(catalog_row(f"syn-{seed}-{i:06d}", abbr, split, INSTRUCTIONS[abbr], rec, urls))
    broken = break_images(rows, img_dir, broken_images)
    write_records(out, rows)
    manifest = {
        "records": len(rows),
        "images": image_count,
        "seed": seed,
        "tasks": abbrs,
        "splits": {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test", "ood_test")},
        "broken_images": broken,
        "rules": {a: RULES[a] for a in abbrs},
        "jsonl": str(out / "records.jsonl"),
        "parquet": str(out / "records.parquet"),
        "image_dir": str(img_dir),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def pick_split(rng: random.Random, weights: dict[str, float], abbr: str) -> str:
    """A record's split drawn with `weights`; `ood_test` only for tasks that have an OOD split."""
    split = rng.choices(list(weights), weights=list(weights.values()))[0]
    return "test" if split == "ood_test" and not TASKS[abbr].has_ood else split


def catalog_row(rid: str, abbr: str, split: str, instruction: str, rec: dict, urls: list[str]) -> dict:
    """One MMECInstruct-schema row of a synthetic catalog (input, options and images as JSON strings)."""
    return {
        "id": rid,
        "task": TASKS[abbr].name,
        "split": split,
        "instruction": instruction,
        "input": json.dumps(rec["input"]),
        "options": json.dumps(rec["options"]),
        "output": rec["output"],
        "images": json.dumps(urls),
    }


def write_records(out: Path, rows: list[dict]) -> None:
    """`records.jsonl` and `records.parquet` of a synthetic catalog (the same rows in both)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(out / "records.jsonl", "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), out / "records.parquet")


def break_images(rows: list[dict], img_dir: Path, count: int) -> list[dict]:
    """Break the first image of `count` records on purpose (truncated, not an image, missing); say which."""
    broken = []
    kinds = ["truncated", "not_an_image", "missing"]
    for k in range(min(count, len(rows))):
        row = rows[(k * 7 + 3) % len(rows)]
        urls = json.loads(row["images"])
        kind = kinds[k % len(kinds)]
        name = urls[0].rsplit("/", 1)[1]
        path = img_dir / name
        if kind == "truncated":
            data = path.read_bytes()
            path.write_bytes(data[: max(16, len(data) // 3)])
        elif kind == "not_an_image":
            path.write_bytes(b"<html>this is not an image</html>")
        else:
            path.unlink()
        broken.append({"id": row["id"], "image": urls[0], "kind": kind})
    return broken


def corpus(n: int = 400, seed: int = 1) -> list[str]:
    """Text covering the synthetic vocabulary and the prompt templates (to train the tiny tokenizer)."""
    g = _Gen(seed)
    texts = list(INSTRUCTIONS.values()) + list(RULES.values())
    for cat, nouns in CATEGORIES.items():
        texts.append(f"{cat} " + " ".join(nouns))
    texts.append(" ".join(COLORS + BRANDS))
    abbrs = list(TASKS)
    for i in range(n):
        rec, _ = _record(g, abbrs[i % len(abbrs)])
        texts.append(json.dumps(rec["input"]) + " " + json.dumps(rec["options"]) + " " + rec["output"])
    return texts
