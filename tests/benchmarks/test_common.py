from pathlib import Path

from benchmarks.common import portable


def test_portable_rewrites_machine_paths() -> None:
    prefixes = [("/home/u/.cache/cdretrieval", "$CDRETRIEVAL_CACHE"), ("/work/main", "."), ("/work", "..")]
    got = portable({"a": ["/work/shared/data/pacs", "/work/main/runs/x"], "b": "/home/u/.cache/cdretrieval/f",
                    "n": 3}, prefixes)
    assert got == {"a": ["../shared/data/pacs", "./runs/x"], "b": "$CDRETRIEVAL_CACHE/f", "n": 3}
    assert str(Path(__file__).resolve()) not in portable(str(Path(__file__).resolve()))
