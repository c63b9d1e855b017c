#!/usr/bin/env python3
"""Write a synthetic AgentSociety/AgentRecBench release (user.json, item.json, review.json,
JSON Lines in the Yelp schema of the reference's data_process.py) of about SIZE_GB gigabytes,
deterministically (half the reviews on items drawn from an exponential over the first few
thousand, the most reviewed with about a thousand reviews, the rest uniform), to measure `rudder bench agentrec store` build time and peak memory.

usage: bench/agentrec_corpus.py OUT_DIR [SIZE_GB=2]
"""
import json, os, random, sys

out = sys.argv[1]
size = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
os.makedirs(out, exist_ok=True)
rng = random.Random(7)
words = ("great food service place staff friendly order time good back love nice "
         "price menu wait table drink chicken pizza coffee clean fresh amazing").split()
n_items = 150_000
n_users = 1_000_000
with open(os.path.join(out, "item.json"), "w") as f:
    for i in range(n_items):
        f.write(json.dumps({"item_id": f"b{i:07d}", "name": f"Business {i}", "address": f"{i} Main St",
            "city": rng.choice(["Philadelphia", "Tampa", "Tucson"]), "state": "PA", "postal_code": "19103",
            "latitude": 39.9 + rng.random(), "longitude": -75.1 + rng.random(), "stars": rng.choice([2.5, 3.5, 4.0, 4.5]),
            "review_count": rng.randint(5, 900), "is_open": 1,
            "attributes": {"WiFi": "free", "RestaurantsPriceRange2": str(rng.randint(1, 4))},
            "categories": "Restaurants, Food", "hours": {"Monday": "8:0-22:0"}, "source": "yelp", "type": "business"}) + "\n")
with open(os.path.join(out, "user.json"), "w") as f:
    for u in range(n_users):
        f.write(json.dumps({"user_id": f"u{u:08d}", "name": f"User{u}", "review_count": rng.randint(1, 300),
            "yelping_since": "2015-03-02 10:00:00", "friends": ", ".join(f"u{rng.randrange(n_users):08d}" for _ in range(5)),
            "useful": rng.randint(0, 99), "fans": rng.randint(0, 9), "average_stars": round(rng.uniform(1, 5), 2),
            "elite": "", "source": "yelp"}) + "\n")
target = size * (1 << 30) - sum(os.path.getsize(os.path.join(out, x)) for x in ("item.json", "user.json"))
written = 0
k = 0
with open(os.path.join(out, "review.json"), "w") as f:
    while written < target:
        day = rng.randrange(3650)
        line = json.dumps({"review_id": f"r{k:010d}", "user_id": f"u{rng.randrange(n_users):08d}",
            "item_id": f"b{min(int(rng.expovariate(1 / 3000)), n_items - 1) if rng.random() < 0.5 else rng.randrange(n_items):07d}",
            "stars": float(rng.randint(1, 5)), "useful": rng.randint(0, 5), "funny": 0, "cool": 0,
            "text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 60))),
            "date": f"{2012 + day // 365}-{1 + (day % 365) // 31:02d}-{1 + day % 28:02d} 12:00:00",
            "source": "yelp", "type": "business"}) + "\n"
        f.write(line)
        written += len(line)
        k += 1
print(f"{out}: {n_users} users, {n_items} items, {k} reviews")
