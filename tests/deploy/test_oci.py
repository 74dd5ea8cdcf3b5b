"""The module image (deploy/oci/build.py, `make oci`): an OCI image layout
that umoci reads and unpacks, whose compat image holds plugin.wasm byte for
byte and whose artifact image has the layers Istio's and Envoy Gateway's
fetchers look for; reproducible, and target/oci is the current build."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import pathlib
import subprocess
import tarfile
import tomllib

import pytest

from conftest import DEPLOY, ROOT, UMOCI, need

BUILD = DEPLOY / "oci/build.py"
VERSION = tomllib.loads((ROOT / "Cargo.toml").read_text())["package"]["version"]


def build(out: pathlib.Path, wasm: pathlib.Path, *args: str, env=None) -> dict[str, str]:
    run = subprocess.run(["python3", str(BUILD), "--wasm", str(wasm), "--out", str(out), *args],
                         capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0, run.stderr
    return {line.split()[0].rsplit(":", 1)[1]: line.split()[1] for line in run.stdout.splitlines()}


def umoci(*args: str, cwd=None) -> str:
    run = subprocess.run([str(need(UMOCI)), *args], capture_output=True, text=True, timeout=60, cwd=cwd)
    assert run.returncode == 0, f"umoci {' '.join(args)}:\n{run.stderr}"
    return run.stdout


class Layout:
    def __init__(self, root: pathlib.Path):
        self.root = root

    def blob(self, desc: dict) -> bytes:
        algo, hexd = desc["digest"].split(":")
        data = (self.root / "blobs" / algo / hexd).read_bytes()
        assert algo == "sha256" and hashlib.sha256(data).hexdigest() == hexd, desc
        assert len(data) == desc["size"], desc
        return data

    def index(self) -> dict:
        return json.loads((self.root / "index.json").read_text())

    def manifest(self, tag: str) -> dict:
        descs = [m for m in self.index()["manifests"]
                 if m["annotations"]["org.opencontainers.image.ref.name"] == tag]
        assert len(descs) == 1
        return json.loads(self.blob(descs[0]))


@pytest.fixture(scope="module")
def image(wasm, tmp_path_factory):
    out = tmp_path_factory.mktemp("oci") / "vlm-budget"
    digests = build(out, wasm)
    return out, digests


def test_layout_and_tags(image):
    out, digests = image
    assert set(digests) == {VERSION, f"{VERSION}-artifact"}
    assert json.loads((out / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    assert umoci("ls", "--layout", str(out)).split() == [VERSION, f"{VERSION}-artifact"]
    index = Layout(out).index()
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert [m["digest"] for m in index["manifests"]] == list(digests.values())


def test_compat_image_unpacks_to_the_module(image, wasm, tmp_path):
    out, _ = image
    stat = umoci("stat", "--image", f"{out}:{VERSION}")
    assert "COPY plugin.wasm ./" in stat
    umoci("unpack", "--rootless", "--image", f"{out}:{VERSION}", str(tmp_path / "bundle"))
    rootfs = tmp_path / "bundle/rootfs"
    assert sorted(p.name for p in rootfs.iterdir()) == ["plugin.wasm"]
    assert (rootfs / "plugin.wasm").read_bytes() == wasm.read_bytes()

    layout = Layout(out)
    m = layout.manifest(VERSION)
    assert m["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert m["annotations"]["module.wasm.image/variant"] == "compat"
    assert m["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    # The compat variant: exactly one tar+gzip layer with plugin.wasm.
    assert [layer["mediaType"] for layer in m["layers"]] == ["application/vnd.oci.image.layer.v1.tar+gzip"]
    tar_bytes = gzip.decompress(layout.blob(m["layers"][0]))
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        assert tar.getnames() == ["plugin.wasm"]
    config = json.loads(layout.blob(m["config"]))
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(tar_bytes).hexdigest()]
    assert (config["os"], config["architecture"]) == ("linux", "amd64")


def test_artifact_image_has_the_wasm_layers(image, wasm):
    out, _ = image
    layout = Layout(out)
    m = layout.manifest(f"{VERSION}-artifact")
    assert m["config"]["mediaType"] == "application/vnd.module.wasm.config.v1+json"
    runtime = json.loads(layout.blob(m["config"]))
    assert runtime["type"] == "envoy_proxy" and runtime["config"]["root_ids"] == ["vlm_budget"]
    # Istio's and Envoy Gateway's fetchers: exactly two layers, one of them
    # the raw module.
    types = [layer["mediaType"] for layer in m["layers"]]
    assert types == ["application/vnd.module.wasm.config.v1+json",
                     "application/vnd.module.wasm.content.layer.v1+wasm"]
    assert layout.blob(m["layers"][1]) == wasm.read_bytes()
    assert m["layers"][1]["annotations"]["org.opencontainers.image.title"] == "plugin.wasm"


def test_build_is_reproducible_and_make_oci_is_current(image, wasm, tmp_path):
    _, digests = image
    assert build(tmp_path / "again", wasm) == digests
    made = ROOT / "target/oci/vlm-budget"
    assert (made / "index.json").exists(), "run `make oci`"
    assert [m["digest"] for m in Layout(made).index()["manifests"]] == list(digests.values()), \
        "target/oci is older than the module: run `make oci`"
    other = build(tmp_path / "later", wasm, env={"SOURCE_DATE_EPOCH": "1700000000", "PATH": "/usr/bin:/bin"})
    assert other != digests, "the timestamp is recorded"


def test_refuses_a_file_that_is_not_a_module(tmp_path):
    bogus = tmp_path / "x.wasm"
    bogus.write_bytes(b"not wasm")
    run = subprocess.run(["python3", str(BUILD), "--wasm", str(bogus), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "not a WebAssembly" in run.stderr
    assert not (tmp_path / "o").exists()
