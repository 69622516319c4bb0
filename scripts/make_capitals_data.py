#!/usr/bin/env python
"""Generate the offline "capitals" dataset of the real-model demo (recipes/demo.py).

The demo shows transfer from pretraining: the base (SmolLM2-135M-Instruct) already knows many
capitals but answers in full sentences ("The capital of Japan is Tokyo."). Training teaches
the answer format (the city name only) on some countries; the test split holds *other*
countries, whose capitals never appear in training, so a held-out answer can only be right if
the fact comes from pretraining. It measures format transfer of known facts, not learning facts.

* train: every country not held out, asked 4 ways (TRAIN_PHRASINGS), answer = the capital.
* test: HELD_OUT, asked the first way. HELD_OUT is 30 of the countries whose capital SmolLM2-
  135M-Instruct names in its own full-sentence answer to "What is the capital of X?" (greedy, no
  system prompt), so the before/after exact match measures the format, not missing facts.
  `--select /path/to/smollm2` re-runs that probe and prints the list (needs the model).
* Capitals are the seat of government as commonly given; countries whose capital is disputed
  or split (Bolivia, South Africa, Israel, ...) are left out.

Output is deterministic (compact JSON, ``\\n`` line endings). The system prompt ("Answer with
the city name only.") is set by the recipe (data.system_prompt), not stored in the rows.

`--pairs MODEL_DIR` writes the preference set of recipes/smollm2_135m_dpo.py instead, into
peftkit/assets/data/capitals_pairs/ (same split: train = the countries not held out, test =
HELD_OUT), one pair per country: prompt "What is the capital of X?", `chosen` the city name
only, `rejected` the base's own greedy answer to that prompt under the same system prompt
(on-policy: what the model does, e.g. "The capital of Japan is Tokyo."). The rule that ranks
them is the instruction itself: the city name only is preferred to anything else. Countries
where the base already answers with the city name only have no pair (counted). Needs the
model (MODEL_DIR: the converted SmolLM2-135M-Instruct directory, or "auto" to resolve it).

Usage: python scripts/make_capitals_data.py [--out-dir DIR] [--select MODEL_DIR]
       python scripts/make_capitals_data.py --pairs auto [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "peftkit" / "assets" / "data" / "capitals"
PAIRS_OUT = REPO_ROOT / "peftkit" / "assets" / "data" / "capitals_pairs"
SYSTEM_PROMPT = "Answer with the city name only."  # as recipes/demo.py sets it

CAPITALS = {
    "Afghanistan": "Kabul", "Albania": "Tirana", "Algeria": "Algiers",
    "Andorra": "Andorra la Vella",
    "Angola": "Luanda", "Argentina": "Buenos Aires", "Armenia": "Yerevan",
    "Australia": "Canberra", "Austria": "Vienna", "Azerbaijan": "Baku", "Bahrain": "Manama",
    "Bangladesh": "Dhaka", "Belarus": "Minsk", "Belgium": "Brussels", "Belize": "Belmopan",
    "Benin": "Porto-Novo", "Bhutan": "Thimphu", "Botswana": "Gaborone", "Brazil": "Brasilia",
    "Brunei": "Bandar Seri Begawan", "Bulgaria": "Sofia", "Burkina Faso": "Ouagadougou",
    "Burundi": "Gitega", "Cambodia": "Phnom Penh", "Cameroon": "Yaounde", "Canada": "Ottawa",
    "Chad": "N'Djamena", "Chile": "Santiago", "China": "Beijing", "Colombia": "Bogota",
    "Costa Rica": "San Jose", "Croatia": "Zagreb", "Cuba": "Havana", "Cyprus": "Nicosia",
    "Czech Republic": "Prague", "Denmark": "Copenhagen", "Djibouti": "Djibouti",
    "Dominican Republic": "Santo Domingo", "Ecuador": "Quito", "Egypt": "Cairo",
    "El Salvador": "San Salvador", "Eritrea": "Asmara", "Estonia": "Tallinn",
    "Ethiopia": "Addis Ababa", "Fiji": "Suva", "Finland": "Helsinki", "France": "Paris",
    "Gabon": "Libreville", "Georgia": "Tbilisi", "Germany": "Berlin", "Ghana": "Accra",
    "Greece": "Athens", "Guatemala": "Guatemala City", "Guinea": "Conakry", "Guyana": "Georgetown",
    "Haiti": "Port-au-Prince", "Honduras": "Tegucigalpa", "Hungary": "Budapest",
    "Iceland": "Reykjavik", "India": "New Delhi", "Indonesia": "Jakarta", "Iran": "Tehran",
    "Iraq": "Baghdad", "Ireland": "Dublin", "Italy": "Rome", "Jamaica": "Kingston",
    "Japan": "Tokyo", "Jordan": "Amman", "Kazakhstan": "Astana", "Kenya": "Nairobi",
    "Kuwait": "Kuwait City", "Kyrgyzstan": "Bishkek", "Laos": "Vientiane", "Latvia": "Riga",
    "Lebanon": "Beirut", "Liberia": "Monrovia", "Libya": "Tripoli",
    "Liechtenstein": "Vaduz", "Lithuania": "Vilnius", "Luxembourg": "Luxembourg",
    "Madagascar": "Antananarivo", "Malawi": "Lilongwe", "Malaysia": "Kuala Lumpur",
    "Mali": "Bamako", "Malta": "Valletta", "Mauritania": "Nouakchott", "Mexico": "Mexico City",
    "Moldova": "Chisinau", "Monaco": "Monaco", "Mongolia": "Ulaanbaatar",
    "Montenegro": "Podgorica", "Morocco": "Rabat", "Mozambique": "Maputo", "Namibia": "Windhoek",
    "Nepal": "Kathmandu", "New Zealand": "Wellington", "Nicaragua": "Managua", "Niger": "Niamey",
    "Nigeria": "Abuja", "North Korea": "Pyongyang", "Norway": "Oslo", "Oman": "Muscat",
    "Pakistan": "Islamabad", "Panama": "Panama City", "Paraguay": "Asuncion", "Peru": "Lima",
    "Philippines": "Manila", "Poland": "Warsaw", "Portugal": "Lisbon", "Qatar": "Doha",
    "Romania": "Bucharest", "Russia": "Moscow", "Rwanda": "Kigali", "Saudi Arabia": "Riyadh",
    "Senegal": "Dakar", "Serbia": "Belgrade", "Sierra Leone": "Freetown",
    "Singapore": "Singapore", "Slovakia": "Bratislava", "Slovenia": "Ljubljana",
    "Somalia": "Mogadishu", "South Korea": "Seoul", "Spain": "Madrid", "Sudan": "Khartoum",
    "Suriname": "Paramaribo", "Sweden": "Stockholm", "Switzerland": "Bern", "Syria": "Damascus",
    "Taiwan": "Taipei", "Tajikistan": "Dushanbe", "Tanzania": "Dodoma", "Thailand": "Bangkok",
    "Togo": "Lome", "Tunisia": "Tunis", "Turkey": "Ankara", "Turkmenistan": "Ashgabat",
    "Uganda": "Kampala", "Ukraine": "Kyiv", "United Arab Emirates": "Abu Dhabi",
    "United Kingdom": "London", "United States": "Washington, D.C.", "Uruguay": "Montevideo",
    "Uzbekistan": "Tashkent", "Venezuela": "Caracas", "Vietnam": "Hanoi", "Yemen": "Sanaa",
    "Zambia": "Lusaka", "Zimbabwe": "Harare",
}

TRAIN_PHRASINGS = (
    "What is the capital of {}?",
    "Which city is the capital of {}?",
    "Name the capital city of {}.",
    "{}: what is its capital?",
)

# 30 of the 78 countries whose capital the base names in its full-sentence answer (`--select`
# on SmolLM2-135M-Instruct; it misses e.g. Italy, Spain, Portugal, Belgium, Denmark, Finland).
HELD_OUT = (
    "Australia", "Austria", "Canada", "Chile", "China", "Cuba", "Egypt", "France", "Germany",
    "Greece", "Hungary", "India", "Indonesia", "Iran", "Iraq", "Ireland", "Japan", "Kenya",
    "Mexico", "Norway", "Pakistan", "Peru", "Philippines", "Poland", "Russia", "Saudi Arabia",
    "South Korea", "Sweden", "Thailand", "United Kingdom",
)


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


def select(model_dir: str) -> list[str]:
    """The countries whose capital the base names in its own greedy answer (no system prompt)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    known = []
    countries = sorted(CAPITALS)
    for start in range(0, len(countries), 32):
        chunk = countries[start:start + 32]
        texts = [tok.apply_chat_template([{"role": "user", "content": TRAIN_PHRASINGS[0]
                                           .format(c)}], tokenize=False,
                                         add_generation_prompt=True) for c in chunk]
        batch = tok(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=24, do_sample=False)
        answers = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        for country, answer in zip(chunk, answers):
            hit = CAPITALS[country].lower() in answer.lower()
            print(f"{'+' if hit else '-'} {country}: {answer.strip()!r}")
            known += [country] if hit else []
    return known


def base_answers(model_dir: str, countries: list[str]) -> dict[str, str]:
    """The base's greedy answer to each country's question under SYSTEM_PROMPT, one prompt at a
    time (no padding), rendered as peftkit renders a generation prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    answers = {}
    for country in countries:
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": TRAIN_PHRASINGS[0].format(country)}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        answers[country] = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    return answers


def follows_instruction(answer: str, capital: str) -> bool:
    """The rule: the answer is the city name only (a final period allowed)."""
    return answer.removesuffix(".").strip().lower() == capital.lower()


def pairs(model_dir: str, out_dir: Path) -> None:
    if model_dir == "auto":
        from peftkit.model.sources import resolve
        from peftkit.recipe import Model
        model_dir = resolve(Model("HuggingFaceTB/SmolLM2-135M-Instruct"))
    answers = base_answers(model_dir, sorted(CAPITALS))
    split = {"train": [c for c in sorted(CAPITALS) if c not in HELD_OUT], "test": list(HELD_OUT)}
    for name, countries in split.items():
        rows, skipped = [], []
        for country in countries:
            answer = answers[country]
            if follows_instruction(answer, CAPITALS[country]):
                skipped.append(country)
                continue
            rows.append({"prompt": TRAIN_PHRASINGS[0].format(country),
                         "chosen": CAPITALS[country], "rejected": answer})
        write_jsonl(out_dir / f"{name}.jsonl", rows)
        print(f"{out_dir / name}.jsonl: {len(rows)} pairs; {len(skipped)} countries skipped, the "
              f"base already answers with the city name only: {skipped}")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--select", metavar="MODEL_DIR", help="probe the base and print HELD_OUT")
    ap.add_argument("--pairs", metavar="MODEL_DIR",
                    help='write the preference set (capitals_pairs) from the base\'s answers '
                         '("auto": resolve SmolLM2-135M-Instruct offline)')
    args = ap.parse_args()
    if args.pairs:
        return pairs(args.pairs, args.out_dir if args.out_dir != DEFAULT_OUT else PAIRS_OUT)
    if args.select:
        known = select(args.select)
        print(f"{len(known)} of {len(CAPITALS)} known:\nHELD_OUT = {tuple(known)!r}")
        return
    assert set(HELD_OUT) <= set(CAPITALS), set(HELD_OUT) - set(CAPITALS)
    train = [chat(p.format(c), CAPITALS[c]) for c in sorted(CAPITALS) if c not in HELD_OUT
             for p in TRAIN_PHRASINGS]
    test = [chat(TRAIN_PHRASINGS[0].format(c), CAPITALS[c]) for c in HELD_OUT]
    # No held-out capital may appear anywhere in training (a city-state's name would).
    train_text = json.dumps(train)
    leaked = [c for c in HELD_OUT if CAPITALS[c] in train_text]
    assert not leaked, f"held-out capitals appear in train: {leaked}"
    write_jsonl(args.out_dir / "train.jsonl", train)
    write_jsonl(args.out_dir / "test.jsonl", test)
    print(f"{args.out_dir}: {len(train)} train rows ({len(CAPITALS) - len(HELD_OUT)} countries "
          f"x {len(TRAIN_PHRASINGS)}), {len(test)} test rows")


if __name__ == "__main__":
    main()
