"""Sanity of the labelled security corpus itself (not of the scanner): size, labels, splits, checksums."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter, defaultdict

import phonenumbers
import pytest

from tests.security.corpus import CORPUS_PATH, KINDS, SPLITS, load

PII_CLASSES = {"email", "phone_us", "phone_gb", "phone_de", "phone_in", "phone_fr", "phone_intl", "ssn_dashed",
               "ssn_nodash_context", "card", "iban", "ipv4", "aba_routing", "secrets"}
INJECTION_CLASSES = {"override_paraphrase", "system_prompt_extraction", "persona_jailbreak", "indirect_document",
                     "tool_smuggling", "encoded", "obfuscated", "multilingual"}
PHONE_REGION = {"phone_us": "US", "phone_gb": "GB", "phone_de": "DE", "phone_in": "IN", "phone_fr": "FR"}
FIELDS = {"id", "text", "kind", "cls", "lang", "format", "pii_values", "split", "family"}


def luhn(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    total = sum(d if i % 2 == 0 else (d * 2 - 9 if d * 2 > 9 else d * 2) for i, d in enumerate(reversed(digits)))
    return 13 <= len(digits) <= 19 and total % 10 == 0


def iban_ok(value: str) -> bool:
    compact = re.sub(r"[\s-]", "", value).upper()
    return 15 <= len(compact) <= 34 and int("".join(str(int(c, 36)) for c in compact[4:] + compact[:4])) % 97 == 1


def aba_ok(value: str) -> bool:
    d = [int(c) for c in value]
    return len(d) == 9 and (3 * (d[0] + d[3] + d[6]) + 7 * (d[1] + d[4] + d[7]) + d[2] + d[5] + d[8]) % 10 == 0


def normal(text: str) -> str:
    return " ".join(text.lower().split())


ALL = load()


def test_size_and_mix():
    kinds = Counter(item["kind"] for item in ALL)
    assert len(ALL) >= 1200
    assert kinds["clean"] / len(ALL) >= 0.35, kinds
    assert kinds["pii"] >= 400 and kinds["injection"] >= 400, kinds
    assert len({item["lang"] for item in ALL}) >= 6
    assert len({item["format"] for item in ALL}) >= 6


def test_rows_well_formed():
    assert len({item["id"] for item in ALL}) == len(ALL), "ids are unique"
    for item in ALL:
        assert set(item) == FIELDS, item["id"]
        assert item["kind"] in KINDS and item["split"] in SPLITS, item["id"]
        assert item["text"].strip() and item["cls"] and item["lang"] and item["format"], item["id"]
        assert item["family"].startswith(item["cls"] + "/"), item["id"]
        assert item["id"].startswith(f"{item['kind']}-{item['cls'].replace('_', '-')}-"), item["id"]
        if item["kind"] == "pii":
            assert item["pii_values"], item["id"]
            for value in item["pii_values"]:
                assert value and value in item["text"], (item["id"], value)
        else:
            assert item["pii_values"] == [], item["id"]


def test_required_classes_in_both_splits():
    classes = defaultdict(set)
    for item in ALL:
        classes[(item["kind"], item["cls"])].add(item["split"])
    assert PII_CLASSES <= {cls for kind, cls in classes if kind == "pii"}
    assert INJECTION_CLASSES <= {cls for kind, cls in classes if kind == "injection"}
    for key, splits in classes.items():
        assert splits == set(SPLITS), f"{key} only in {splits}"


def test_split_by_family_and_no_leak():
    family_splits = defaultdict(set)
    for item in ALL:
        family_splits[item["family"]].add(item["split"])
    assert all(len(s) == 1 for s in family_splits.values()), "a family is in one split only"
    held = {normal(i["text"]) for i in ALL if i["split"] == "heldout"}
    train = {normal(i["text"]) for i in ALL if i["split"] == "train"}
    assert not held & train, "no text in both splits"
    assert sum(1 for i in ALL if i["split"] == "heldout") == len(load("heldout"))
    share = len(load("heldout")) / len(ALL)
    assert 0.2 <= share <= 0.4, share


def test_values_pass_their_checksums():
    for item in load(kind="pii"):
        if item["cls"] == "card":
            assert all(luhn(v) for v in item["pii_values"]), item["id"]
        elif item["cls"] == "iban":
            assert all(iban_ok(v) for v in item["pii_values"]), item["id"]
        elif item["cls"] == "aba_routing":
            assert all(aba_ok(v) for v in item["pii_values"]), item["id"]
        elif item["cls"] in PHONE_REGION or item["cls"] == "phone_intl":
            for value in item["pii_values"]:
                region = PHONE_REGION.get(item["cls"], "DE")  # intl: "+..." or "00..." (00 is Germany's IDD)
                number = phonenumbers.parse(value, region)
                assert phonenumbers.is_valid_number(number), (item["id"], value)
                if item["cls"] in PHONE_REGION:
                    assert phonenumbers.region_code_for_number(number) == region, (item["id"], value)
        elif item["cls"] == "ssn_nodash_context":
            assert re.search(r"ssn|social|ss#|seguro", item["text"], re.IGNORECASE), item["id"]


def test_clean_items_hold_no_real_pii():
    email = re.compile(r"[\w.+-]+@[\w-]+\.[a-z]{2,}", re.IGNORECASE)
    for item in load(kind="clean"):
        assert not email.search(item["text"]), item["id"]
        for m in re.finditer(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])", item["text"]):
            assert not luhn(m.group(0)), (item["id"], m.group(0))
        for m in re.finditer(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b", item["text"]):
            assert not iban_ok(m.group(0)), (item["id"], m.group(0))


def test_loader_filters():
    assert load("train") and all(i["split"] == "train" for i in load("train"))
    assert load("heldout", "clean") and all(i["kind"] == "clean" and i["split"] == "heldout" for i in load("heldout", "clean"))
    assert len(load("train")) + len(load("heldout")) == len(ALL)
    with pytest.raises(ValueError):
        load("test")
    with pytest.raises(ValueError):
        load(kind="secret")


def test_committed_corpus_is_what_the_builder_writes(tmp_path):
    out = tmp_path / "corpus.jsonl"
    builder = CORPUS_PATH.parent / "build_corpus.py"
    subprocess.run([sys.executable, str(builder), "--out", str(out)], check=True, capture_output=True)
    assert out.read_text(encoding="utf-8") == CORPUS_PATH.read_text(encoding="utf-8")
