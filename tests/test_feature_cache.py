"""The frozen/partial-mode feature cache: one decode per image for all views, reload, key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _train_setup import small_config

from cdretrieval.feature_cache import build_feature_cache, feature_cache_key


def test_feature_cache_views(demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One decode per image for all views: the same cache for 0 and 2 workers, view 0 = the plain clean
    features, augmented views distinct, a reload gives the same numbers, the key carries the format."""
    import shutil

    from cdretrieval import feature_cache
    from cdretrieval.data.folders import scan_domain
    from cdretrieval.data.images import load_image
    from cdretrieval.data.transforms import eval_transform
    from cdretrieval.run import encoder_from_config

    root = tmp_path / "data"
    shutil.copytree(demo_root / "ink" / "3", root / "ink" / "3")
    (root / "ink" / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    samples = scan_domain(root, "ink")[:15]
    cfg = small_config(root)
    encoder = encoder_from_config(cfg)
    cpu = torch.device("cpu")
    built = {}
    for workers in (0, 2):
        cfg.data.num_workers = workers
        with pytest.warns(UserWarning, match="skipped 1 unreadable image.*broken.png"):
            built[workers] = build_feature_cache(encoder, samples, cfg, cpu, tmp_path / f"w{workers}", "ink", False)
    (feats, kept), (feats2, kept2) = built[0], built[2]
    assert feats.shape == (3, len(samples) - 1, 1280) and kept == kept2 and all("broken" not in s.path for s in kept)
    assert torch.equal(feats, feats2)
    x = torch.stack([eval_transform(64)(load_image(s.path)) for s in kept])
    with torch.no_grad():
        clean = encoder.backbone.eval()(x)
    torch.testing.assert_close(feats[0], clean, rtol=1e-3, atol=1e-4)  # fp16 storage: ~5e-4 relative
    assert not torch.allclose(feats[1], feats[0], atol=1e-2) and not torch.allclose(feats[1], feats[2], atol=1e-2)
    again, kept3 = build_feature_cache(encoder, samples, cfg, cpu, tmp_path / "w0", "ink", False)
    assert torch.equal(again, feats) and kept3 == kept
    key = feature_cache_key(cfg, samples)
    monkeypatch.setattr(feature_cache, "FEATURE_CACHE_FORMAT", feature_cache.FEATURE_CACHE_FORMAT + 1)
    assert feature_cache_key(cfg, samples) != key
