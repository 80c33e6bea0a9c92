"""Writing world problems to disk (:mod:`acrl.world.export`): every problem's record and picture as they are in
memory, a human caption drawn from the given random stream, the clarification pairs, and a contact sheet."""

import json
import random

from PIL import Image

from acrl.world import clarification_pairs, human_caption_for, language, make_problems
from acrl.world.export import write_dataset


def test_records_and_pictures_are_the_problems_and_the_captions_follow_the_seed(tmp_path):
    problems = make_problems("val", 5)
    path = write_dataset(problems, str(tmp_path / "a"), rng=random.Random(4), fact_rate=1.0, sheet=2)
    assert path == str(tmp_path / "a" / "problems.jsonl")
    rows = [json.loads(x) for x in open(path)]
    rng = random.Random(4)
    for p, row in zip(problems, rows, strict=True):
        assert row["image"] == f"images/{p.id}.png"
        assert Image.open(tmp_path / "a" / row["image"]).convert("RGB").tobytes() == p.image.tobytes()
        assert {k: v for k, v in row.items() if k not in ("image", "human_caption", "clarifications")} == json.loads(
            json.dumps(p.to_json()))
        assert row["human_caption"] == human_caption_for(p, rng, 1.0)
        assert dict(language.parse_facts(row["human_caption"])) == p.facts             # fact_rate 1: every fact
        assert [tuple(c) for c in row["clarifications"]] == clarification_pairs(p)
    assert Image.open(tmp_path / "a" / "contact_sheet.png").size[0] > 200
    write_dataset(problems, str(tmp_path / "b"), rng=random.Random(4), fact_rate=1.0)
    assert (tmp_path / "b" / "problems.jsonl").read_text() == (tmp_path / "a" / "problems.jsonl").read_text()
