import hashlib
from pathlib import Path

from cdretrieval.data.demo import DEMO_DOMAINS, generate_demo_data
from cdretrieval.data.folders import scan_domains


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_demo_is_deterministic_and_well_formed(tmp_path: Path, demo_root: Path) -> None:
    again = generate_demo_data(tmp_path / "again", per_domain=120)
    assert _digest(again) == _digest(demo_root)
    data = scan_domains(demo_root)
    assert tuple(data) == tuple(sorted(DEMO_DOMAINS))
    for samples in data.values():
        assert len(samples) == 120
        assert {s.label for s in samples} == {str(d) for d in range(10)}
    # domains are rendered from disjoint digits: no shared source id
    ids = [{Path(s.path).stem.split("_")[1] for s in samples} for samples in data.values()]
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2])
    assert generate_demo_data(demo_root) == demo_root  # complete → reused
