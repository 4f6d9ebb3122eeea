"""`nanochat data core-bundle`: the CORE eval bundle is downloaded over HTTP (here from a server on
loopback), unpacked, validated, and only then put in place."""

import functools
import http.server
import threading
import zipfile

import pytest
from test_core_eval import TASKS, write_bundle

from nanochat.cli import main
from nanochat.data.core_bundle import download_core_bundle, load_bundle
from nanochat.errors import NanochatError


@pytest.fixture
def web(tmp_path):
    """A static file server on 127.0.0.1 over tmp_path/www; yields its base URL."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def zip_bundle(tmp_path, zip_path, top="eval_bundle"):
    src = tmp_path / "src" / top
    src.mkdir(parents=True)
    write_bundle(src)
    with zipfile.ZipFile(zip_path, "w") as z:
        for f in sorted(src.rglob("*")):
            z.write(f, f.relative_to(src.parent))


def test_download_unpacks_a_valid_bundle(tmp_path, web, monkeypatch):
    root, url = web
    zip_bundle(tmp_path, root / "eval_bundle.zip")
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path / "home"))
    assert main(["data", "core-bundle", "--url", f"{url}/eval_bundle.zip"]) == 0
    dest = tmp_path / "home" / "data" / "eval_bundle"
    assert {t.label for t in load_bundle(dest)} == set(TASKS)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["eval_bundle"]  # no .part / .tmp debris


def test_a_bad_download_keeps_the_bundle_already_there(tmp_path, web):
    root, url = web
    dest = tmp_path / "eval_bundle"
    dest.mkdir()
    write_bundle(dest)
    before = sorted(p.relative_to(dest) for p in dest.rglob("*"))

    (root / "junk.zip").write_bytes(b"<html>not a zip</html>")
    with pytest.raises(NanochatError, match="not a zip file"):
        download_core_bundle(dest, f"{url}/junk.zip", force=True)
    with zipfile.ZipFile(root / "empty.zip", "w") as z:
        z.writestr("readme.txt", "no bundle here")
    with pytest.raises(NanochatError, match="holds no core.yaml"):
        download_core_bundle(dest, f"{url}/empty.zip", force=True)
    with zipfile.ZipFile(root / "evil.zip", "w") as z:
        z.writestr("../outside.txt", "escape")
    with pytest.raises(NanochatError, match="outside the bundle"):
        download_core_bundle(dest, f"{url}/evil.zip", force=True)
    assert not (tmp_path / "outside.txt").exists()
    with pytest.raises(NanochatError, match="could not download"):
        download_core_bundle(dest, f"{url}/missing.zip", force=True)

    assert sorted(p.relative_to(dest) for p in dest.rglob("*")) == before
    assert len(load_bundle(dest)) == len(TASKS)


def test_a_bundle_in_place_is_checked_not_fetched(tmp_path):
    dest = tmp_path / "eval_bundle"
    dest.mkdir()
    write_bundle(dest)
    assert download_core_bundle(dest, "http://127.0.0.1:9/never-asked.zip") == dest
    (dest / "eval_meta_data.csv").unlink()
    with pytest.raises(NanochatError, match="eval_meta_data.csv is missing"):
        download_core_bundle(dest, "http://127.0.0.1:9/never-asked.zip")
