"""The shared output rule and the one-owner lock (acrl.outdir)."""

import errno
import json
import os
import subprocess
import sys

import pytest

from acrl import outdir


def test_strict_json_writes_null_for_nan_and_inf(tmp_path):
    p = tmp_path / "s.json"
    outdir.write_json(str(p), {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}, "e": 0.5})
    text = p.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": {"d": None}, "e": 0.5}


@pytest.mark.parametrize("content, message", [(None, "does not exist"), ("", "is empty"),
                                              ("{bad", "is not valid JSON")])
def test_read_json_names_the_file(tmp_path, content, message):
    p = tmp_path / "x.json"
    if content is not None:
        p.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as e:
        outdir.read_json(str(p))
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_leaves_the_old_file_whole(tmp_path, monkeypatch):
    p = tmp_path / "report.html"
    p.write_text("old page")
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(OSError, match="no space left.*report.html"):
        outdir.write_text(str(p), "new page " * 1000)
    assert p.read_text() == "old page"
    assert os.listdir(tmp_path) == ["report.html"]


def test_publish_dir_refuses_replaces_and_never_mixes(tmp_path, monkeypatch):
    out = tmp_path / "data"

    def build(files):
        def fn(d):
            for f in files:
                (open(os.path.join(d, f), "w")).write(f)
        return fn

    outdir.publish_dir(str(out), build(["a", "b"]))
    with pytest.raises(outdir.OutputExists, match="--overwrite"):
        outdir.publish_dir(str(out), build(["c"]))
    outdir.publish_dir(str(out), build(["c"]), overwrite=True)
    assert sorted(os.listdir(out)) == ["c"]                      # no stale a, b
    monkeypatch.setattr(os, "fsync", _enospc)                    # a full disk while building: the old one stays
    with pytest.raises(OSError, match="no space left"):
        outdir.publish_dir(str(out), build(["d"]), overwrite=True)
    assert sorted(os.listdir(out)) == ["c"]
    assert sorted(os.listdir(tmp_path)) == ["data"]             # no temporary leftovers


def test_prepare_table(tmp_path):
    out = str(tmp_path / "o")
    spec = {"captioner": "a", "n": 4}
    assert outdir.prepare(out, spec=spec, lock=False) is False
    open(os.path.join(out, "items.jsonl"), "w").write("{}\n")
    with pytest.raises(outdir.OutputExists, match="--resume.*--overwrite"):
        outdir.prepare(out, spec=spec, lock=False)
    assert outdir.prepare(out, resume=True, spec=spec, lock=False) is True
    with pytest.raises(ValueError, match="differs in: captioner"):
        outdir.prepare(out, resume=True, spec={**spec, "captioner": "b"}, lock=False)
    with pytest.raises(ValueError, match="contradict"):
        outdir.prepare(out, resume=True, overwrite=True, lock=False)
    outdir.prepare(out, overwrite=True, spec={**spec, "captioner": "b"}, lock=False)
    assert sorted(os.listdir(out)) == [outdir.SPEC]


HOLD = ("import sys, time; sys.path.insert(0, {src!r}); from acrl import outdir; outdir.own(sys.argv[1], 'holder'); "
        "print('held', flush=True); time.sleep(60)")


def test_one_owner_per_directory_and_the_lock_dies_with_its_process(tmp_path):
    import acrl

    src = os.path.dirname(os.path.dirname(acrl.__file__))
    d = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(src=src), d], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert "holder" in (outdir.owner(d) or "")
        with pytest.raises(outdir.Busy, match=f"in use by pid {proc.pid}: holder"):
            outdir.own(d)
        assert not outdir.wait_free(d, poll=0.05, timeout=0.2)
    finally:
        proc.kill()
        proc.wait()
    assert outdir.wait_free(d, poll=0.05, timeout=5)             # SIGKILL released it
    outdir.own(d)
    outdir.own(d)                                                # re-entrant in one process
    outdir.release(d)
    assert outdir.owner(d) is not None
    outdir.release(d)
    assert outdir.owner(d) is None
