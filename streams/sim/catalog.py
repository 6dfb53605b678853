"""The simulated shop's catalogue: categories, product nouns, items with fixed USD prices.

The catalogue is the same for every seed (like a real shop), so item ids and prices are
stable across runs; only the customers differ.
"""
from __future__ import annotations

import bisect
import itertools
import math
import random
from dataclasses import dataclass

# category -> (median list price in USD, product nouns used for item names and review text)
CATEGORIES: dict[str, tuple[float, tuple[str, ...]]] = {
    "electronics": (60.0, ("headphones", "charger", "speaker", "keyboard", "mouse", "webcam",
                           "power bank", "smartwatch", "tablet case", "monitor stand")),
    "books": (18.0, ("novel", "cookbook", "biography", "notebook", "travel guide", "comic",
                     "textbook", "journal")),
    "home": (40.0, ("lamp", "rug", "curtain", "cushion", "blanket", "mirror", "vase", "shelf")),
    "kitchen": (45.0, ("frying pan", "knife set", "blender", "coffee grinder", "kettle",
                       "mixing bowl", "cutting board", "toaster")),
    "beauty": (25.0, ("face cream", "shampoo", "perfume", "lipstick", "hair dryer", "serum",
                      "nail polish")),
    "toys": (25.0, ("puzzle", "board game", "teddy bear", "building set", "doll", "kite",
                    "toy car")),
    "sports": (45.0, ("yoga mat", "dumbbell set", "water bottle", "running shoes",
                      "tennis racket", "bike helmet", "jump rope")),
    "fashion": (55.0, ("jacket", "dress", "sneakers", "scarf", "handbag", "jeans", "sweater",
                       "belt")),
    "garden": (35.0, ("garden hose", "planter", "pruning shears", "seed kit", "garden chair",
                      "watering can")),
    "pets": (30.0, ("dog bed", "cat tree", "leash", "bag of pet food", "chew toy", "litter box")),
    "office": (35.0, ("desk chair", "stapler", "desk organizer", "pen set", "whiteboard",
                      "desk lamp")),
    "jewelry": (90.0, ("necklace", "bracelet", "pair of earrings", "ring", "watch")),
    "grocery": (15.0, ("bag of coffee beans", "tea sampler", "bottle of olive oil", "snack box",
                       "box of chocolates")),
    "baby": (70.0, ("stroller", "baby monitor", "onesie", "car seat", "bottle set")),
    "tools": (50.0, ("drill", "screwdriver set", "tool box", "tape measure", "work light")),
    "outdoor": (80.0, ("tent", "sleeping bag", "backpack", "camping stove", "headlamp",
                       "cooler")),
}
CATEGORY_NAMES: tuple[str, ...] = tuple(CATEGORIES)
# how often a category is someone's favourite (relative weights, same order as CATEGORY_NAMES)
CATEGORY_WEIGHTS: tuple[float, ...] = (
    1.6, 1.2, 1.3, 1.1, 1.2, 0.8, 0.9, 1.5, 0.6, 0.7, 0.6, 0.4, 0.9, 0.4, 0.5, 0.5,
)
ITEMS_PER_CATEGORY = 120
_PRICE_SIGMA = 0.7
_ZIPF = 0.9


@dataclass(frozen=True, slots=True)
class Item:
    item_id: str
    category: str
    noun: str
    price_usd: float


@dataclass(frozen=True, slots=True)
class Shelf:
    """One category: items sorted by price, plus popularity weights for browsing."""

    category: str
    items: tuple[Item, ...]  # sorted by price
    prices: tuple[float, ...]
    cum_popularity: tuple[float, ...]  # cumulative weights over ``items``

    def popular(self, r: random.Random) -> Item:
        """An item drawn by popularity (Zipf over a fixed random ranking)."""
        x = r.random() * self.cum_popularity[-1]
        return self.items[bisect.bisect_right(self.cum_popularity, x)]

    def near_price(self, r: random.Random, target_usd: float) -> Item:
        """An item priced close to ``target_usd`` (a few ranks of jitter either way)."""
        i = bisect.bisect_left(self.prices, target_usd) + r.randint(-3, 3)
        return self.items[min(max(i, 0), len(self.items) - 1)]


def _price(r: random.Random, median: float) -> float:
    p = median * math.exp(r.gauss(0.0, _PRICE_SIGMA))
    return max(0.99, round(p) - 0.01) if p >= 2 else 0.99


def _build() -> dict[str, Shelf]:
    r = random.Random("clv-catalog-v1")
    shelves = {}
    for category, (median, nouns) in CATEGORIES.items():
        raw = [
            Item(f"{category}-{k:03d}", category, nouns[k % len(nouns)], _price(r, median))
            for k in range(ITEMS_PER_CATEGORY)
        ]
        items = tuple(sorted(raw, key=lambda it: (it.price_usd, it.item_id)))
        ranks = list(range(len(items)))
        r.shuffle(ranks)
        weights = [1.0 / (rank + 1) ** _ZIPF for rank in ranks]
        shelves[category] = Shelf(
            category, items, tuple(it.price_usd for it in items),
            tuple(itertools.accumulate(weights)),
        )
    return shelves


SHELVES: dict[str, Shelf] = _build()
