"""Serving gaps not in tests/app/test_ui.py: the server serves exactly the indexed image files (each from the
copy it makes in its one allowed folder; the originals' own paths are never an allowed path).

Layout (the run folder lives elsewhere)::

    tmp/data/photo/3/*.png             indexed images
    tmp/data/photo/3/notes.txt         not an image: never served
    tmp/data/photo/3/link.png  ──────► tmp/private/secret.png   (an image outside the data root: not indexed)
    tmp/data/ink/3/*.png
    tmp/data/ink/3/ckpt.png    ──────► RUN/checkpoint.pt        (not an image: skipped when indexing)
    tmp/data/ink/3/up.png      ──────► tmp/private               (a folder)
    tmp/private/secret.txt, secret.png
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from conftest import free_port

if TYPE_CHECKING:
    from app.server import ServedFiles


@dataclass
class Site:
    url: str
    data: Path
    private: Path
    run: Path
    files: ServedFiles  # the running server's


@pytest.fixture(scope="module")
def site(tiny_run: Path, demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    from app.server import launch_app
    from cdretrieval.indexing import build_indexes

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
    (data / "photo" / "3" / "notes.txt").write_text("NOTES-NOT-AN-IMAGE")
    (data / "ink" / "3" / "ckpt.png").symlink_to(run / "checkpoint.pt")
    (data / "ink" / "3" / "up.png").symlink_to(private, target_is_directory=True)
    with pytest.warns(UserWarning) as caught:
        build_indexes(run, data, num_workers=0, progress=False, device="cpu")
    messages = [str(w.message) for w in caught]
    assert any("ckpt.png" in m for m in messages), messages  # the checkpoint behind the link is not an image
    assert any("link(s) pointing outside the data root" in m and "link.png" in m for m in messages), messages
    demo = launch_app(run, port=free_port(), prevent_thread_lock=True, device="cpu", examples_per_domain=0)
    url = str(demo.local_url)
    try:
        yield Site(url if url.endswith("/") else url + "/", data, private, run, demo.served_files)
    finally:
        demo.close()


def _refused_by_serve(site: Site) -> list[Path]:
    """Paths that are not indexed image files (or lead to none), for :meth:`ServedFiles.serve`."""
    return [
        site.data / "photo" / "3" / "link.png",  # a linked image whose file is outside the data root
        site.data / "photo" / "3" / "notes.txt",  # beside the indexed images, but not one of them
        site.data / "photo" / "3",  # a folder
        site.private / "secret.png",
        site.private / "secret.txt",
        site.data / "ink" / "3" / "ckpt.png",  # → the run's checkpoint
        site.data / "ink" / "3" / "up.png" / "secret.txt",  # through a linked folder
        site.run / "checkpoint.pt",
        site.data / "photo" / "3" / ".." / ".." / ".." / "private" / "secret.txt",
    ]


def test_served_files_are_exactly_the_indexed_images(site: Site) -> None:
    from app.server import ServedFiles, blocked_paths, launch_options
    from cdretrieval.retrieval import Retriever

    retriever = Retriever.from_run(site.run, device="cpu")
    assert not any(it.path.endswith("link.png") for it in retriever.indexes["photo"].items)  # skipped at scan time
    indexed = sorted(str(Path(it.path).resolve()) for d in retriever.domains for it in retriever.indexes[d].items)
    files = ServedFiles.of(retriever, protected=blocked_paths(site.run))
    try:
        assert sorted(files.files) == indexed and all(Path(p).is_file() for p in files.files)  # never a folder
        assert launch_options(site.run, served=files)["allowed_paths"] == [str(files.folder)]  # one folder
        for path in indexed:
            copy = files.serve(path)
            assert copy is not None and copy.parent.parent == files.folder and copy.name == Path(path).name
            assert copy.read_bytes() == Path(path).read_bytes()
        for path in _refused_by_serve(site):
            assert files.serve(path) is None, path
        assert sorted(files.files) == sorted(site.files.files)  # what the running server holds
    finally:
        files.close()


def test_symlinks_out_of_a_data_folder_are_not_served(site: Site) -> None:
    """Over HTTP: the server's copy of an indexed image is sent; its original path, the files beside it, links
    out of the data root, the run and the folders (the allowed one included) are refused."""
    ok = next((site.data / "photo" / "3").glob("photo_*.png"))
    copy = site.files.serve(ok)
    assert copy is not None
    refused: list[Path | str] = [
        *_refused_by_serve(site),
        ok,  # indexed, but only its copy is in the allowed folder
        ok.resolve(),
        copy.parent,
        site.files.folder,
    ]
    out_of_folder = os.path.relpath(site.private / "secret.txt", copy.parent)  # ../../… from the allowed folder
    refused += [f"{copy.parent}/{out_of_folder}", f"{copy.parent}/{out_of_folder.replace('/', '%2F')}"]
    with httpx.Client(timeout=10) as http:
        r = http.get(f"{site.url}gradio_api/file={copy}")
        assert r.status_code == 200 and r.content == ok.read_bytes()
        for path in refused:
            r = http.get(f"{site.url}gradio_api/file={path}")
            assert r.status_code in (403, 404), (path, r.status_code)
            assert b"TOP-SECRET-CONTENT" not in r.content
            assert r.content != (site.private / "secret.png").read_bytes()


def test_search_never_shows_images_behind_links_out_of_the_data_root(site: Site) -> None:
    from gradio_client import Client, handle_file

    client = Client(site.url, verbose=False)
    gallery, result = client.predict(handle_file(str(site.private / "secret.png")), "auto", ["photo"], 5,
                                     api_name="/search")
    files = [r["file"] for r in result["results"]]
    assert "photo/3/link.png" not in files and all("secret" not in f for f in files)
    assert len(gallery) == len(files) and all(Path(g["image"]).is_file() for g in gallery)


def test_index_add_outside_the_data_root_serves_that_file_only(site: Site, tmp_path: Path) -> None:
    """``index --add /x/a/extra/new.png`` must not open up ``/x/a`` (issue: ``/x/a/private.txt`` was served)."""
    from app.server import ServedFiles, blocked_paths
    from cdretrieval.indexing import add_to_index
    from cdretrieval.retrieval import Retriever

    run = tmp_path / "run"
    shutil.copytree(site.run, run)
    extra = site.data.parent / "extra"
    extra.mkdir(exist_ok=True)
    new = extra / "new.png"
    shutil.copy(next((site.data / "ink" / "3").glob("ink_*.png")), new)
    (extra / "private.txt").write_text("TOP-SECRET-CONTENT")
    add_to_index(run, "photo", [new], num_workers=0, progress=False, device="cpu")
    files = ServedFiles.of(Retriever.from_run(run, device="cpu"), protected=blocked_paths(run))
    try:
        assert str(new.resolve()) in files.files and all(Path(p).is_file() for p in files.files)
        assert not any(p == str(extra.resolve()) or p == str(site.data.parent.resolve()) for p in files.files)
        copy = files.serve(new)
        assert copy is not None and copy.read_bytes() == new.read_bytes()
        for refused in (extra / "private.txt", extra, site.data.parent):
            assert files.serve(refused) is None, refused
    finally:
        files.close()


def test_an_old_index_holding_a_link_out_of_the_data_root_never_shows_it(site: Site, tmp_path: Path) -> None:
    """An index built before such links were skipped: the item is never served, shown or made a query."""
    import hashlib
    import json

    from app.server import ServedFiles, blocked_paths
    from app.ui import SearchService
    from cdretrieval.retrieval import Retriever

    run = tmp_path / "run"
    shutil.copytree(site.run, run)
    folder = run / "index" / "photo"
    lines = (folder / "items.jsonl").read_text().splitlines()
    link = str(site.data / "photo" / "3" / "link.png")
    lines[0] = json.dumps({**json.loads(lines[0]), "path": link})
    blob = ("\n".join(lines) + "\n").encode()
    (folder / "items.jsonl").write_bytes(blob)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["items.jsonl"] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))

    retriever = Retriever.from_run(run, device="cpu")
    assert retriever.indexes["photo"].items[0].path == link and retriever.resolve_item_path(link) is None
    files = ServedFiles.of(retriever, protected=blocked_paths(run))
    try:
        assert str((site.private / "secret.png").resolve()) not in files.files and link not in files.files
        assert files.serve(link) is None and files.serve(site.private / "secret.png") is None
        service = SearchService(retriever, served=files)
        secret = (site.private / "secret.png").read_bytes()
        from PIL import Image

        tile_file = service._thumbnail(link)  # a file the app wrote (issue 14: no PIL image handed to Gradio)
        assert isinstance(tile_file, str) and Path(tile_file).parent == files.folder / "generated"
        tile = Image.open(tile_file)
        assert tile.getextrema() == ((200, 200), (200, 200), (200, 200))  # the grey placeholder, not its pixels
        assert service.query_from_item(link, "photo", None, "the example")[0] is None
        assert service.example_tile(link) is not None and service.served_copy(link) is None
        assert Image.open(site.private / "secret.png").tobytes() != tile.tobytes() and secret
    finally:
        files.close()
