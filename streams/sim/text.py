"""English review text from templates and vocabulary.

``review_text`` renders a review whose tone matches its star rating and which mentions the
*cues* the generative model chose from the customer's hidden traits (about to churn, loyal,
a delivery incident, a gift buyer, a bargain hunter, a big spender). The cues are what lets
text carry signal beyond the rating: a 3-star review that says "I cancelled my account" is
from a customer who is about to leave. This module only renders; ``world.py`` decides.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

POS_ADJ = ("great", "excellent", "sturdy", "lovely", "well made", "comfortable", "reliable",
           "beautiful", "fantastic", "solid", "gorgeous", "handy", "perfect", "impressive",
           "elegant", "durable", "cozy", "brilliant")
NEG_ADJ = ("flimsy", "disappointing", "poorly made", "cheaply made", "useless", "overpriced",
           "uncomfortable", "noisy", "faulty", "fragile", "awful", "defective", "terrible",
           "scratched", "wobbly")
MIX_ADJ = ("okay", "decent", "average", "fine", "acceptable", "so-so", "passable", "alright",
           "ordinary")
STRONG = ("really", "very", "incredibly", "super", "truly", "absolutely")
MILD = ("pretty", "quite", "fairly", "reasonably", "")
ASPECTS = ("the quality", "the finish", "the design", "the material", "the size", "the color",
           "the packaging", "the price", "the instructions", "the fit")
WHO = ("wife", "husband", "mom", "dad", "son", "daughter", "sister", "brother", "best friend",
       "boss", "grandmother", "colleague", "girlfriend", "boyfriend")

POSITIVE = (
    "The {noun} is {int} {adj}.",
    "{Int} {adj} {noun}, exactly as described.",
    "Love this {noun}!",
    "Very happy with the {noun}; {aspect} is {adj}.",
    "Does exactly what I needed.",
    "{Aspect} is {int} {adj} for the price.",
    "Solid purchase, the {noun} feels {adj}.",
    "Exceeded my expectations.",
    "I use the {noun} every day and it is {adj}.",
    "Better than the {noun} I had before.",
    "Highly recommend this {noun}.",
    "Good value and {aspect} is {adj}.",
    "Arrived quickly and works perfectly.",
    "The {noun} looks even better in person.",
    "Exactly the {adj} {noun} I was looking for.",
)
NEGATIVE = (
    "The {noun} is {int} {adj}.",
    "{Adj} {noun}, would not recommend.",
    "Stopped working after {n} days.",
    "Very disappointed with this {noun}.",
    "Returned it the same week.",
    "Not worth the money.",
    "{Aspect} is {adj} and the {noun} feels cheap.",
    "Customer service never answered my emails.",
    "Nothing like the photos.",
    "The {noun} broke the first time I used it.",
    "Complete waste of money.",
    "I regret buying this {noun}.",
    "Asked for a refund and I am still waiting.",
    "The {noun} is {adj}, avoid.",
)
MIXED = (
    "The {noun} is {adj}, nothing special.",
    "It's {adj} for the price, but {aspect} could be better.",
    "Decent {noun}, though {aspect} is a bit {neg_adj}.",
    "Does the job.",
    "Not bad, not great.",
    "The {noun} works, but I expected more.",
    "{Aspect} is {adj}.",
    "Mixed feelings about this {noun}.",
    "Fine for occasional use.",
    "Smaller than I expected, otherwise {adj}.",
)
OPENERS = {
    "pos": ("Wow.", "So glad I bought this.", "Update after a month of use.", "Quick review.",
            "Second one I own."),
    "neg": ("Ugh.", "Where do I start.", "Update after a week.", "Quick review.",
            "Buyer beware."),
    "mix": ("Quick review.", "Hard to say.", "Update after a few weeks.", "Well."),
}
EXTREME = {5: ("Five stars!", "Best purchase this year."),
           1: ("Would give zero stars if I could.", "One star is too many.")}

LOYAL = ("Will order again.", "Will definitely order again.", "This shop is my go-to now.",
         "Already planning my next order.", "I keep coming back to this store.",
         "Ordering another one for sure.", "Another great order from my favorite shop.",
         "Been a customer for a while and never disappointed.", "Will be back for more.",
         "Already added the next one to my cart.")
CHURN = ("I've cancelled my account.", "I cancelled my account after this.",
         "Done with this store.", "Won't be ordering from here again.", "Closing my account.",
         "This was my last order here.", "Deleted my account and unsubscribed.",
         "Taking my business elsewhere.", "Never shopping here again.",
         "I'm switching to another shop.")
INCIDENTS = {
    "late": ("Shipping took forever.", "It arrived {n} weeks late.",
             "Tracking never updated and delivery took ages.",
             "Delivery was delayed three times.", "Took almost a month to arrive."),
    "damaged": ("The box arrived crushed and the {noun} was damaged.", "Arrived broken.",
                "The {noun} came scratched and dented.",
                "Packaging was torn and the {noun} was cracked."),
    "wrong_item": ("They sent the wrong {noun}.", "Received the wrong color.",
                   "Got a completely different item.",
                   "The size was wrong and the return was a hassle."),
    "missing": ("Half the order was missing.", "The package arrived empty.",
                "Parts were missing from the box.", "Only one of the items showed up."),
}
INCIDENT_KINDS = tuple(INCIDENTS)
GIFT = ("Bought it as a gift for my {who}.", "Gift for my {who}.",
        "Got this for my {who}'s birthday.", "Picked it up as a present for my {who}.",
        "A Christmas gift for my {who}.")
GIFT_HAPPY = ("My {who} loved it.", "My {who} was thrilled.")
BUDGET = ("Waited for the sale to buy it.", "Used a coupon so it was a bargain.",
          "Bought it on discount.", "Cheapest one I could find.",
          "Got it with the free shipping code.",
          "On a tight budget, so I picked the basic one.")
LOYAL_DESPITE = ("Normally I love this shop, so this was a surprise.",
                 "Still a fan of the store, just not of this product.",
                 "I order here all the time and this is the first miss.",
                 "I'll keep shopping here, but skip this one.")
PREMIUM = ("Ordered {k} of them for the office.", "Picked up a few extra for the family.",
           "Got the deluxe version along with a few other things.",
           "Paid extra for express shipping.")
PREMIUM_HAPPY = ("Worth the premium price.", "Bought the top model, no regrets.",
                 "Price doesn't matter to me when the quality is right.")
# a latent plan told in passing, whatever the rating (no tone adjectives)
PLAN = {
    "switch": ("We are moving overseas next month, so this is one of my last orders.",
               "Relocating soon and will not be able to order from here after that.",
               "Mostly buying from a local store these days.",
               "My company now gets these supplies through another vendor.",
               "Cutting back on online shopping from now on.",
               "Last purchase before we leave the country."),
    "commit": ("We just signed up for the annual membership.",
               "Furnishing our new house, so expect many more orders from me.",
               "Starting a small business and will restock here regularly.",
               "Switching all our household shopping to this store.",
               "Just opened a store account for the whole office.",
               "Setting up a subscription for the monthly restock."),
}
PREMIUM_ANGRY = ("Paid for the premium version and still got this.",
                 "At this price I expected much better.")


@dataclass(frozen=True, slots=True)
class Cues:
    """What the text mentions besides the product (decided from hidden traits)."""

    loyal: bool = False
    churning: bool = False
    incident: str | None = None  # one of INCIDENT_KINDS
    gift: bool = False
    budget: bool = False
    premium: bool = False
    plan: str | None = None  # "switch" or "commit": the customer's latent plan (any rating)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _fill(r: random.Random, template: str, noun: str, tone: str, rating: int) -> str:
    adj = r.choice(POS_ADJ if tone == "pos" else NEG_ADJ if tone == "neg" else MIX_ADJ)
    intens = r.choice(STRONG if rating in (1, 5) else MILD)
    aspect = r.choice(ASPECTS)
    s = template.format(
        noun=noun, adj=adj, Adj=_cap(adj), int=intens, Int=_cap(intens) or "Really",
        aspect=aspect, Aspect=_cap(aspect), neg_adj=r.choice(NEG_ADJ), n=r.randint(2, 9),
        who=r.choice(WHO), k=r.randint(3, 12),
    )
    return " ".join(s.split())  # an empty intensifier leaves a double space


def review_text(r: random.Random, rating: int, noun: str, cues: Cues = Cues()) -> str:
    """One review of ``noun`` with ``rating`` stars mentioning ``cues``."""
    tone = "pos" if rating >= 4 else "neg" if rating <= 2 else "mix"
    bank = POSITIVE if tone == "pos" else NEGATIVE if tone == "neg" else MIXED
    n_core = 1 + (r.random() < 0.55) + (r.random() < 0.2)
    core = [_fill(r, t, noun, tone, rating) for t in r.sample(bank, n_core)]
    parts: list[str] = []
    if r.random() < 0.2:
        parts.append(r.choice(OPENERS[tone]))
    if cues.incident:
        parts.append(_fill(r, r.choice(INCIDENTS[cues.incident]), noun, tone, rating))
    parts += core
    if rating in EXTREME and r.random() < 0.25:
        parts.append(r.choice(EXTREME[rating]))
    if cues.gift:
        pool = GIFT + GIFT_HAPPY if rating >= 4 else GIFT
        parts.append(_fill(r, r.choice(pool), noun, tone, rating))
    if cues.budget:
        parts.append(r.choice(BUDGET))
    if cues.premium:
        extra = PREMIUM_HAPPY if tone == "pos" else PREMIUM_ANGRY if tone == "neg" else ()
        parts.append(_fill(r, r.choice(PREMIUM + extra), noun, tone, rating))
    if cues.plan:
        parts.insert(r.randint(0, len(parts)), r.choice(PLAN[cues.plan]))
    if cues.churning:
        parts.append(r.choice(CHURN))
    elif cues.loyal:
        parts.append(r.choice(LOYAL_DESPITE if tone == "neg" else LOYAL))
    return " ".join(parts)
