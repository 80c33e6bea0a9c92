import json

from acrl.backends.tiny import TinyCaptioner, TinyVLMConfig
from acrl.backends.world import OracleClarifier, WorldReasoner
from acrl.evaluate import evaluate, markdown_table
from acrl.world import make_problems


class CountingPolicy:
    def __init__(self, inner):
        self.inner, self.captioned = inner, []

    def generate(self, images, prompts, **kw):
        self.captioned += prompts
        return self.inner.generate(images, prompts, **kw)


def test_interrupted_evaluation_resumes_and_skips_finished_items(tmp_path):
    problems = make_problems("test", 10)
    cap = TinyCaptioner.create(TinyVLMConfig(d_model=32, n_heads=2, n_layers=1, cnn_width=8, max_new_tokens=6))
    path = tmp_path / "items.jsonl"
    full, full_items = evaluate(cap, WorldReasoner(), OracleClarifier(problems), problems, batch_size=4,
                                items_path=str(path))
    lines = path.read_text().splitlines()
    assert len(lines) == 10
    # an interruption after 4 items, the last line cut off mid-write, and one item that had failed
    rows = [json.loads(x) for x in lines[:5]]
    rows[1]["failed"] = True
    path.write_text("\n".join(json.dumps(r) for r in rows[:4]) + "\n" + lines[4][:20])
    counting = CountingPolicy(cap)
    again, items = evaluate(counting, WorldReasoner(), OracleClarifier(problems), problems, batch_size=4,
                            items_path=str(path))
    assert len(counting.captioned) == 7        # 10 - 3 finished (the failed one and the cut-off line are redone)
    assert [r["id"] for r in items] == [p.id for p in problems]
    assert len(path.read_text().splitlines()) == 10
    assert again["overall"]["n"] == full["overall"]["n"] == 10
    assert "single-pass acc" in markdown_table(again)
