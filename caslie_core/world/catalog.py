"""Catalog v2: a synthetic MMECInstruct-schema catalog whose labels live in the images.

Every product picture shows one shape, in one colour, plain or striped, on a grey ground. The text never
names these attributes. Three tasks are decided by the picture alone (`DRIVES`): the category (CC) by the
shape, the query relevance (MPC) by the colour, the substitute question (PSI) by the pattern; from the text
alone they are at chance. SA and AP are decided by the text alone (the review's words, the question's kind),
as are PRP and SR (a word in the second title, the 'bestseller' candidate): their pictures are irrelevant.
A share of pictures is uninformative (blank, noise, a "no image" placeholder), as in real catalogs; a record
whose deciding picture is uninformative cannot be answered better than chance.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..tasks import TASKS

WORLD_VERSION = "world-v2"
SHAPES = ("square", "ring", "triangle", "bar")
COLOURS = ("red", "green", "blue", "yellow")
PATTERNS = ("plain", "striped")
UNINFORMATIVE = ("blank", "noise", "placeholder")
NO_PRODUCT = "no product shown"  # what the trained captioner says of an uninformative picture
_RGB = {"red": (215, 35, 35), "green": (35, 165, 60), "blue": (35, 70, 215), "yellow": (235, 215, 30)}
_GROUND = (128, 128, 128)

CC_OPTIONS = ["A: Electronics", "B: Kitchen", "C: Toys", "D: Sports"]
MPC_OPTIONS = ["A: exact", "B: substitute", "C: complement", "D: irrelevant"]
PRP_OPTIONS = ["A: bought together", "B: viewed together", "C: similar"]
SA_OPTIONS = ["A: positive", "B: neutral", "C: negative"]
_CC = dict(zip(SHAPES, "ABCD"))  # square: Electronics, ring: Kitchen, triangle: Toys, bar: Sports
_MPC = dict(zip(COLOURS, "ABCD"))  # red: exact, green: substitute, blue: complement, yellow: irrelevant
_PSI = {"striped": "yes", "plain": "no"}
_PRP = {"A": "bundle", "B": "gift", "C": "refill"}
_SA = {"A": ["love", "great", "excellent"], "B": ["okay", "fine", "average"], "C": ["broken", "terrible", "awful"]}
_AP_YES = ["What size is the {t}?", "What material is the {t} made of?", "How heavy is the {t}?"]
_AP_NO = ["When will the {t} be delivered?", "Will the price of the {t} drop?", "Who is the seller of the {t}?"]
BRANDS = ["Acme", "Zenith", "Nova", "Orbit", "Polar", "Vertex", "Lumen", "Atlas"]
_ORDINALS = ["1st", "2nd", "3rd"]

DRIVES = {
    "CC": {"by": "image", "attribute": "shape", "rule": {s: CC_OPTIONS["ABCD".index(a)] for s, a in _CC.items()}},
    "MPC": {"by": "image", "attribute": "colour", "rule": {c: MPC_OPTIONS["ABCD".index(a)] for c, a in _MPC.items()}},
    "PSI": {"by": "image", "attribute": "pattern", "rule": _PSI},
    "SA": {"by": "text", "attribute": "review words", "rule": {a: ws for a, ws in _SA.items()}},
    "AP": {
        "by": "text",
        "attribute": "question kind",
        "rule": "yes for size/material/weight, no for delivery/price/seller",
    },
    "PRP": {"by": "text", "attribute": "product 2's last word", "rule": {a: w for a, w in _PRP.items()}},
    "SR": {"by": "text", "attribute": "the candidate titled 'bestseller'", "rule": "its option letter"},
}
# Chance level of each task's primary metric for a model that sees only the text (labels drawn uniformly):
# accuracy 1/k for k options; F1 of 'yes' for a coin flip at a 0.5 positive rate: 0.5.
_FOCUS = {"CC": "a {shape}", "MPC": "a {colour} product", "PSI": "a {pattern} product"}
CHANCE = {"CC": 0.25, "MPC": 0.25, "PSI": 0.5, "SA": 1 / 3, "AP": 0.5, "PRP": 1 / 3, "SR": 1 / 3}
INSTRUCTIONS = {
    "AP": "Given a product question, decide whether it is answerable from the product information. Answer yes or no.",
    "CC": "Given a product, choose the product's category from the options.",
    "PRP": "Given two products, choose how they are related.",
    "PSI": "Given a query and a product, decide whether the product is a functional substitute. Answer yes or no.",
    "MPC": "Given a query and a product, choose how relevant the product is.",
    "SA": "Given a product review, choose the user's sentiment.",
    "SR": "Given the user's purchase history, choose the product they will buy next.",
}


@dataclass(frozen=True)
class Look:
    """What one picture shows: a product (shape, colour, pattern) or, with `blank` set, nothing useful."""

    shape: str = ""
    colour: str = ""
    pattern: str = ""
    blank: str = ""  # one of UNINFORMATIVE, or "" for a product picture

    @property
    def caption(self) -> str:
        """The true caption: what a captioner that reads the picture right says."""
        return NO_PRODUCT if self.blank else f"a {self.colour} {self.pattern} {self.shape}"

    def caption_for(self, abbr: str) -> str:
        """The true context-conditioned caption: asked in the context of a task decided by the picture, a
        captioner that reads the picture right says what that task turns on ("a ring", "a blue product",
        "a striped product"); in any other context it describes the whole picture."""
        if self.blank or abbr not in _FOCUS:
            return self.caption
        return _FOCUS[abbr].format(shape=self.shape, colour=self.colour, pattern=self.pattern)


class World:
    """Draws records and pictures for one seed; `uninformative` is the share of uninformative pictures."""

    def __init__(self, seed: int, uninformative: float = 0.1) -> None:
        self.rng, self.uninformative = random.Random(seed), uninformative

    def look(self, **fixed) -> Look:
        r = self.rng
        if not fixed and r.random() < self.uninformative:
            return Look(blank=r.choice(UNINFORMATIVE))
        return Look(
            fixed.get("shape") or r.choice(SHAPES),
            fixed.get("colour") or r.choice(COLOURS),
            fixed.get("pattern") or r.choice(PATTERNS),
        )

    def title(self) -> str:
        return f"{self.rng.choice(BRANDS)} {self.rng.randrange(1000, 9999)}"

    def record(self, abbr: str) -> tuple[dict, list[Look]]:
        """One record's `input`, `options`, `output` and the looks of its pictures, in order."""
        r = self.rng
        if abbr in ("CC", "MPC", "PSI"):
            look = self.look()
            attr = {"CC": "shape", "MPC": "colour", "PSI": "pattern"}[abbr]
            value = getattr(look, attr) or r.choice({"shape": SHAPES, "colour": COLOURS, "pattern": PATTERNS}[attr])
            title = self.title()
            if abbr == "CC":
                return {"input": {"title": title}, "options": CC_OPTIONS, "output": _CC[value]}, [look]
            query = f"{r.choice(BRANDS)} {r.choice(['set', 'kit', 'pack', 'model', 'edition'])}"
            inp = {"query": query, "product title": title}
            if abbr == "MPC":
                return {"input": inp, "options": MPC_OPTIONS, "output": _MPC[value]}, [look]
            return {"input": inp, "options": [], "output": _PSI[value]}, [look]
        if abbr == "SA":
            answer = r.choice(list(_SA))
            review = f"The {self.title()} is {r.choice(_SA[answer])}."
            return {"input": {"review": review}, "options": SA_OPTIONS, "output": answer}, [self.look()]
        if abbr == "AP":
            answer = r.choice(["yes", "no"])
            question = r.choice(_AP_YES if answer == "yes" else _AP_NO).format(t=self.title())
            return {"input": {"question": question}, "options": [], "output": answer}, [self.look()]
        if abbr == "PRP":
            answer = r.choice(list(_PRP))
            inp = {"product 1": self.title(), "product 2": f"{self.title()} {_PRP[answer]}"}
            return {"input": inp, "options": PRP_OPTIONS, "output": answer}, [self.look(), self.look()]
        # SR: two history items and three candidates, one of them the 'bestseller'
        history = [f"{_ORDINALS[i]}: {self.title()}" for i in range(2)]
        best = r.randrange(3)
        options = [f"{'ABC'[j]}: {self.title()}{' bestseller' if j == best else ''}" for j in range(3)]
        return {"input": history, "options": options, "output": "ABC"[best]}, [self.look() for _ in range(5)]


def draw(look: Look, rng: random.Random):
    """A PIL picture of `look`, at a random size and scale."""
    from PIL import Image, ImageDraw

    w, h = rng.choice([(48, 48), (64, 56), (80, 88), (96, 96), (120, 120), (64, 64)])
    ground = tuple(max(0, min(255, c + rng.randint(-12, 12))) for c in _GROUND)
    img = Image.new("RGB", (w, h), ground)
    d = ImageDraw.Draw(img)
    if look.blank == "noise":
        return Image.frombytes("RGB", (w, h), bytes(rng.getrandbits(8) for _ in range(w * h * 3)))
    if look.blank == "blank":
        return Image.new("RGB", (w, h), rng.choice([(255, 255, 255), ground, (235, 235, 235)]))
    if look.blank == "placeholder":
        img = Image.new("RGB", (w, h), (236, 236, 236))
        d = ImageDraw.Draw(img)
        d.rectangle((2, 2, w - 3, h - 3), outline=(170, 170, 170), width=2)
        d.line((2, 2, w - 3, h - 3), fill=(170, 170, 170), width=2)
        d.line((2, h - 3, w - 3, 2), fill=(170, 170, 170), width=2)
        d.text((w // 2 - 20, h // 2 - 5), "NO IMAGE", fill=(120, 120, 120))
        return img
    side = int(min(w, h) * rng.uniform(0.7, 0.9))  # centred, as product photos are, give or take a little
    x0 = max(0, min(w - side, (w - side) // 2 + rng.randint(-2, 2)))
    y0 = max(0, min(h - side, (h - side) // 2 + rng.randint(-2, 2)))
    x1, y1, cx, cy = x0 + side, y0 + side, x0 + side // 2, y0 + side // 2
    shape = {
        "square": lambda dd, fill: dd.rectangle((x0, y0, x1, y1), fill=fill),
        "ring": lambda dd, fill: dd.ellipse((x0, y0, x1, y1), outline=fill, width=max(3, side // 6)),
        "triangle": lambda dd, fill: dd.polygon([(cx, y0), (x0, y1), (x1, y1)], fill=fill),
        "bar": lambda dd, fill: dd.rectangle((x0, cy - side // 5, x1, cy + side // 5), fill=fill),
    }[look.shape]
    shape(d, _RGB[look.colour])
    if look.pattern == "striped":  # white bands across the shape only, wide enough to survive a 32-pixel resize
        mask = Image.new("L", (w, h), 0)
        shape(ImageDraw.Draw(mask), 255)
        bands = Image.new("L", (w, h), 0)
        period = max(6, side // 4)
        bd = ImageDraw.Draw(bands)
        for y in range(y0, y1, period):
            bd.rectangle((0, y, w, y + period // 2 - 1), fill=255)
        from PIL import ImageChops

        img.paste((250, 250, 250), mask=ImageChops.multiply(mask, bands))
    return img


def encode(img, rng: random.Random) -> tuple[bytes, str]:
    """The picture as PNG or JPEG bytes (a product photo's usual formats); (bytes, extension)."""
    fmt = rng.choice(["PNG", "JPEG"])
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue(), "png" if fmt == "PNG" else "jpg"


DEFAULT_SPLITS = {"train": 0.55, "val": 0.05, "test": 0.3, "ood_test": 0.1}


def write_world_catalog(
    out_dir: str | Path,
    n_records: int,
    *,
    seed: int = 0,
    tasks: list[str] | None = None,
    splits: dict[str, float] | None = None,
    uninformative: float = 0.1,
    broken_images: int = 0,
    base_url: str | None = None,
) -> dict:
    """Write `records.jsonl`, `records.parquet`, `images/` and `manifest.json` under `out_dir`; return the
    manifest (which attribute drives which task, each task's chance level, the looks of every picture)."""

    out = Path(out_dir)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    abbrs = [t.upper() for t in (tasks or list(TASKS))]
    unknown = [a for a in abbrs if a not in TASKS]
    if unknown:
        raise UsageError(f"unknown task(s) {unknown}; valid: {list(TASKS)}")
    from ..synthetic import break_images, catalog_row, pick_split, write_records

    world = World(seed, uninformative)
    weights = splits or DEFAULT_SPLITS
    prefix = base_url.rstrip("/") if base_url else str(img_dir.resolve())
    rows, looks, n_images = [], {}, 0
    for i in range(n_records):
        abbr = abbrs[i % len(abbrs)]
        rec, pictures = world.record(abbr)
        split = pick_split(world.rng, weights, abbr)
        urls = []
        for look in pictures:
            data, ext = encode(draw(look, world.rng), world.rng)
            name = f"img{n_images:06d}.{ext}"
            (img_dir / name).write_bytes(data)
            urls.append(f"{prefix}/{name}")
            looks[name] = look.caption_for(abbr)  # what a right captioner says in this record's context
            n_images += 1
        rows.append(catalog_row(f"w{seed}-{i:06d}", abbr, split, INSTRUCTIONS[abbr], rec, urls))

    broken = break_images(rows, img_dir, broken_images)
    write_records(out, rows)
    manifest = {
        "version": WORLD_VERSION,
        "records": len(rows),
        "images": n_images,
        "seed": seed,
        "tasks": abbrs,
        "splits": {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test", "ood_test")},
        "test_records_per_task": {
            a: sum(r["split"] == "test" and r["task"] == TASKS[a].name for r in rows) for a in abbrs
        },
        "drives": {a: DRIVES[a] for a in abbrs},
        "chance": {a: round(CHANCE[a], 4) for a in abbrs},
        "uninformative_share": uninformative,
        "uninformative_images": sum(v == NO_PRODUCT for v in looks.values()),
        "broken_images": broken,
        "true_captions": looks,
        "jsonl": str(out / "records.jsonl"),
        "parquet": str(out / "records.parquet"),
        "image_dir": str(img_dir),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
