#!/usr/bin/env python3
"""Builds the module image: an OCI image layout holding vlm_budget.wasm as a
Wasm plugin image that Istio (WasmPlugin `url: oci://...`) and Envoy Gateway
(EnvoyExtensionPolicy `code.type: Image`) pull. No container daemon is used:
the blobs, manifests and index are written directly, with sha256 digests.

  build.py --wasm target/wasm32-wasip1/release/vlm_budget.wasm --out target/oci/vlm-budget

The layout gets two tagged images (`org.opencontainers.image.ref.name`):

  VERSION           the *compat* variant of the Wasm image specification: an
                    ordinary OCI image, as `FROM scratch` + `COPY plugin.wasm ./`
                    would build it: one `application/vnd.oci.image.layer.v1.tar+gzip`
                    layer holding `plugin.wasm`, a standard image config, and
                    the manifest annotation `module.wasm.image/variant=compat`.
                    Any registry and any tool (skopeo, crane, oras, docker)
                    handles it, and a Kubernetes image volume can mount it.
  VERSION-artifact  the *oci* variant: an OCI artifact with the config media
                    type `application/vnd.module.wasm.config.v1+json` and two
                    layers, the runtime config (same media type) and the raw
                    module (`application/vnd.module.wasm.content.layer.v1+wasm`).
                    Needs a registry that accepts custom media types.

Istio and Envoy Gateway accept both. The build is reproducible: every
timestamp is SOURCE_DATE_EPOCH (default 0), so the same module gives the same
digests.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gzip
import hashlib
import io
import json
import os
import pathlib
import shutil
import sys
import tarfile

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_TGZ = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_WASM_CONFIG = "application/vnd.module.wasm.config.v1+json"
MT_WASM_LAYER = "application/vnd.module.wasm.content.layer.v1+wasm"
VARIANT_ANNOTATION = "module.wasm.image/variant"
REF_NAME = "org.opencontainers.image.ref.name"
TITLE = "org.opencontainers.image.title"
WASM_MAGIC = b"\0asm\x01\0\0\0"
ROOT_ID = "vlm_budget"


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Layout:
    """An OCI image layout directory being written."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.manifests: list[dict] = []

    def blob(self, data: bytes, media_type: str, annotations: dict | None = None) -> dict:
        digest = sha256(data)
        path = self.blobs / digest.split(":", 1)[1]
        if not path.exists():
            path.write_bytes(data)
        desc = {"mediaType": media_type, "digest": digest, "size": len(data)}
        if annotations:
            desc["annotations"] = annotations
        return desc

    def write(self) -> None:
        (self.root / "oci-layout").write_bytes(canonical({"imageLayoutVersion": "1.0.0"}))
        index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": self.manifests}
        (self.root / "index.json").write_bytes(canonical(index))


def layer_tar(wasm: bytes, mtime: int) -> bytes:
    """An uncompressed tar with plugin.wasm at the root (as `COPY plugin.wasm ./`)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("plugin.wasm")
        info.size = len(wasm)
        info.mode = 0o644
        info.mtime = mtime
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(wasm))
    return buf.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    buf = io.BytesIO()
    # mtime=0 and no file name: the compressed bytes depend on the content only.
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as gz:
        gz.write(data)
    return buf.getvalue()


def build(wasm_path: pathlib.Path, out: pathlib.Path, version: str, platform: str,
          variant_annotation: str, epoch: int) -> dict[str, str]:
    wasm = wasm_path.read_bytes()
    if not wasm.startswith(WASM_MAGIC):
        raise SystemExit(f"{wasm_path}: not a WebAssembly 1.0 binary module")
    os_name, _, arch = platform.partition("/")
    if not os_name or not arch:
        raise SystemExit(f"--platform must be OS/ARCH, got {platform!r}")
    created = dt.datetime.fromtimestamp(epoch, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    common = {
        "org.opencontainers.image.title": "vlm-budget",
        "org.opencontainers.image.description":
            "vlm-budget proxy-wasm filter for Envoy (root_id vlm_budget)",
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.created": created,
        "org.opencontainers.image.licenses": "Apache-2.0",
    }

    if out.exists():
        shutil.rmtree(out)
    layout = Layout(out)
    layout.blobs.mkdir(parents=True)
    digests = {}

    # compat: an ordinary single-layer image.
    tar = layer_tar(wasm, epoch)
    layer = layout.blob(gzip_bytes(tar), MT_LAYER_TGZ)
    config = {
        "created": created,
        "architecture": arch,
        "os": os_name,
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [sha256(tar)]},
        "history": [{"created": created, "created_by": "COPY plugin.wasm ./"}],
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": layout.blob(canonical(config), MT_IMAGE_CONFIG),
        "layers": [layer],
        "annotations": {**common, VARIANT_ANNOTATION: variant_annotation},
    }
    desc = layout.blob(canonical(manifest), MT_MANIFEST, {REF_NAME: version})
    desc["platform"] = {"architecture": arch, "os": os_name}
    layout.manifests.append(desc)
    digests[version] = desc["digest"]

    # oci: the Wasm artifact (runtime config + raw module).
    runtime_config = {"type": "envoy_proxy", "abiVersions": ["v0.2.1"],
                      "config": {"root_ids": [ROOT_ID]}}
    rc_bytes = canonical(runtime_config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": layout.blob(rc_bytes, MT_WASM_CONFIG),
        "layers": [
            layout.blob(rc_bytes, MT_WASM_CONFIG, {TITLE: "runtime-config.json"}),
            layout.blob(wasm, MT_WASM_LAYER, {TITLE: "plugin.wasm"}),
        ],
        "annotations": common,
    }
    tag = f"{version}-artifact"
    desc = layout.blob(canonical(manifest), MT_MANIFEST, {REF_NAME: tag})
    layout.manifests.append(desc)
    digests[tag] = desc["digest"]

    layout.write()
    return digests


def cargo_version(root: pathlib.Path) -> str:
    import tomllib

    return tomllib.loads((root / "Cargo.toml").read_text())["package"]["version"]


def main(argv=None) -> int:
    root = pathlib.Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wasm", type=pathlib.Path, default=root / "target/wasm32-wasip1/release/vlm_budget.wasm")
    ap.add_argument("--out", type=pathlib.Path, default=root / "target/oci/vlm-budget")
    ap.add_argument("--version", default=None, help="image tag (default: the crate version)")
    ap.add_argument("--platform", default="linux/amd64",
                    help="OS/ARCH recorded in the compat image config (the module itself is "
                         "platform-neutral; set it to the nodes' platform when mounting the "
                         "image as a Kubernetes image volume)")
    ap.add_argument("--variant-annotation", default="compat", choices=["compat", "compat-smart"],
                    help="value of module.wasm.image/variant on the compat image: `compat` as the "
                         "Wasm image specification says; `compat-smart` only for crun-based "
                         "runtimes that should run the image as a Wasm container (Envoy ignores it)")
    args = ap.parse_args(argv)
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    version = args.version or cargo_version(root)
    digests = build(args.wasm, args.out, version, args.platform, args.variant_annotation, epoch)
    for tag, digest in digests.items():
        print(f"{args.out}:{tag} {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
