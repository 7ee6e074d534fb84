"""Serving gaps not in tests/app/test_ui.py: symlinks in a data folder must not open files outside it.

Layout (the run folder lives elsewhere)::

    tmp/data/photo/3/*.png             indexed images
    tmp/data/photo/3/link.png  ──────► tmp/private/secret.png   (an image: it gets indexed through the link)
    tmp/data/ink/3/*.png
    tmp/data/ink/3/ckpt.png    ──────► RUN/checkpoint.pt        (not an image: skipped when indexing)
    tmp/data/ink/3/up.png      ──────► tmp/private               (a folder)
    tmp/private/secret.txt, secret.png
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import free_port


@dataclass
class Site:
    url: str
    data: Path
    private: Path
    run: Path


@pytest.fixture(scope="module")
def site(tiny_run: Path, demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    from app.server import launch_app
    from cdretrieval.pipeline import build_indexes

    base = tmp_path_factory.mktemp("symlinks")
    data, private = base / "data", base / "private"
    for d in ("photo", "ink"):
        (data / d / "3").mkdir(parents=True)
        for p in sorted((demo_root / d / "3").glob("*.png"))[:4]:
            shutil.copy(p, data / d / "3" / p.name)
    private.mkdir()
    (private / "secret.txt").write_text("TOP-SECRET-CONTENT")
    shutil.copy(next((demo_root / "outline").rglob("*.png")), private / "secret.png")
    run = tmp_path_factory.mktemp("serve-run") / "run"
    shutil.copytree(tiny_run, run)
    (data / "photo" / "3" / "link.png").symlink_to(private / "secret.png")
    (data / "ink" / "3" / "ckpt.png").symlink_to(run / "checkpoint.pt")
    (data / "ink" / "3" / "up.png").symlink_to(private, target_is_directory=True)
    with pytest.warns(UserWarning, match="ckpt.png"):  # the checkpoint behind the link is not an image
        build_indexes(run, data, num_workers=0, progress=False, device="cpu")
    demo = launch_app(run, port=free_port(), prevent_thread_lock=True, device="cpu", examples_per_domain=0)
    url = str(demo.local_url)
    try:
        yield Site(url if url.endswith("/") else url + "/", data, private, run)
    finally:
        demo.close()


def test_served_folders_are_the_data_folders_not_where_links_point(site: Site) -> None:
    from app.server import indexed_folders
    from cdretrieval.retrieval import Retriever

    retriever = Retriever.from_run(site.run, device="cpu")
    assert any(it.path.endswith("link.png") for it in retriever.indexes["photo"].items)  # indexed via the link
    folders = indexed_folders(retriever)
    assert sorted(folders) == sorted(str(site.data.resolve() / d / "3") for d in ("ink", "photo")), folders


def test_symlinks_out_of_a_data_folder_are_not_served(site: Site) -> None:
    ok = next((site.data / "photo" / "3").glob("photo_*.png"))
    refused = [
        site.data / "photo" / "3" / "link.png",  # an indexed image whose file is outside the data folder
        site.private / "secret.png",
        site.private / "secret.txt",
        site.data / "ink" / "3" / "ckpt.png",  # → the run's checkpoint
        site.data / "ink" / "3" / "up.png" / "secret.txt",  # through a linked folder
        site.run / "checkpoint.pt",
        site.data / "photo" / "3" / ".." / ".." / ".." / "private" / "secret.txt",
    ]
    with httpx.Client(timeout=10) as http:
        r = http.get(f"{site.url}gradio_api/file={ok.resolve()}")
        assert r.status_code == 200 and r.content == ok.read_bytes()
        for path in refused:
            r = http.get(f"{site.url}gradio_api/file={path}")
            assert r.status_code in (403, 404), (path, r.status_code)
            assert b"TOP-SECRET-CONTENT" not in r.content
            assert r.content != (site.private / "secret.png").read_bytes()


def test_search_still_shows_linked_images_as_thumbnails(site: Site) -> None:
    from gradio_client import Client, handle_file

    client = Client(site.url, verbose=False)
    gallery, result = client.predict(handle_file(str(site.private / "secret.png")), "auto", ["photo"], 5,
                                     api_name="/search")
    files = [r["file"] for r in result["results"]]
    assert files[0] == "photo/3/link.png" and result["results"][0]["score"] > 0.9  # itself (re-ranked), relative name
    assert len(gallery) == 5 and all(Path(g["image"]).is_file() for g in gallery)
