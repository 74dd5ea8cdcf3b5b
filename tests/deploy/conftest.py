"""Fixtures of the deploy checks: the tools of tests/deploy/fetch-tools.sh,
the rendered kustomizations, and the integration harness (real Envoy)."""
from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
TOOLS = ROOT / ".cache/deploy-tools"
KUBECTL = TOOLS / "bin/kubectl"
UMOCI = TOOLS / "bin/umoci"
NPM = TOOLS / "npm"
WASM = ROOT / "target/wasm32-wasip1/release/vlm_budget.wasm"

sys.path.insert(0, str(ROOT / "tests/integration"))
sys.path.insert(0, str(pathlib.Path(__file__).parent))

# Every kustomization directory under deploy/, and what it is.
KUSTOMIZATIONS = [
    "kubernetes/namespace",
    "kubernetes/base",
    "kubernetes/vllm",
    "kubernetes/vllm-1e1p1d",
    "kubernetes/overlays/vanilla",
    "kubernetes/overlays/static",
    "kubernetes/overlays/dynamic",
    "kubernetes/transcoder",
    "kubernetes/overlays/offload",
    "istio",
    "envoy-gateway",
]


def need(path: pathlib.Path) -> pathlib.Path:
    if not path.exists():
        pytest.fail(f"{path} missing: run `make validate-deploy` (tests/deploy/fetch-tools.sh)")
    return path


def render(kdir: str) -> list[dict]:
    run = subprocess.run([str(need(KUBECTL)), "kustomize", str(DEPLOY / kdir)],
                         capture_output=True, text=True, timeout=60)
    if run.returncode != 0:
        raise AssertionError(f"kustomize {kdir} failed:\n{run.stderr}")
    return [d for d in yaml.safe_load_all(run.stdout) if d]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    return {k: render(k) for k in KUSTOMIZATIONS}


@pytest.fixture(scope="session")
def wasm() -> pathlib.Path:
    if not WASM.exists():
        pytest.fail(f"{WASM} missing: run `make wasm`")
    return WASM


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def node_validate(objs: list[dict]) -> list[dict]:
    """Runs the CRD-generated validators of tests/deploy/npm on objs."""
    need(NPM / "node_modules")
    shutil.copyfile(ROOT / "tests/deploy/npm/validate.mjs", NPM / "validate.mjs")
    run = subprocess.run(["node", str(NPM / "validate.mjs")], input=json.dumps(objs),
                         capture_output=True, text=True, timeout=60, cwd=NPM)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)
