"""Every manifest under deploy/ renders and passes schema validation:
built-in kinds against Kubernetes' OpenAPI schemas (kubernetes-validate,
strict), CRD kinds against deploy/schemas/ (closed objects) and, for the
Istio and Gateway API kinds, also against the validators generated from the
projects' CRDs (npm @kubernetes-models). Plus the cross-references a schema
cannot see: cluster names, Services, volumes, the overlays' policies."""
from __future__ import annotations

import copy
import json
import pathlib
import tomllib

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import DEPLOY, KUSTOMIZATIONS, ROOT, find, node_validate, one

K8S_VERSION = "1.35.0"
SCHEMAS = {
    (s["properties"]["apiVersion"]["const"], s["properties"]["kind"]["const"]): s
    for s in (json.loads(p.read_text()) for p in sorted((DEPLOY / "schemas").glob("*.json")))
}
PUBLISHED = {("extensions.istio.io/v1alpha1", "WasmPlugin"), ("networking.istio.io/v1alpha3", "EnvoyFilter"),
             ("gateway.networking.k8s.io/v1", "Gateway"), ("gateway.networking.k8s.io/v1", "GatewayClass"),
             ("gateway.networking.k8s.io/v1", "HTTPRoute")}


def gvk(doc: dict) -> tuple[str, str]:
    return doc["apiVersion"], doc["kind"]


def all_docs(rendered) -> list[tuple[str, dict]]:
    return [(k, d) for k in KUSTOMIZATIONS for d in rendered[k]]


def k8s_errors(doc: dict) -> list[str]:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        return []
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path))}: {e.message}"]


def crd_errors(doc: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(SCHEMAS[gvk(doc)])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS)
def test_kustomization_renders(rendered, kdir):
    docs = rendered[kdir]
    assert docs, f"{kdir} rendered nothing"
    names = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), f"{kdir}: duplicate objects"
    for d in docs:
        if d["kind"] not in ("Namespace", "GatewayClass"):
            assert d["metadata"].get("namespace") == "vlm", f"{kdir}: {d['kind']}/{d['metadata']['name']}"


def test_every_kind_has_a_validator(rendered):
    for kdir, d in all_docs(rendered):
        if gvk(d) in SCHEMAS:
            continue
        # kubernetes-validate refuses kinds it has no schema for.
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{kdir}: no schema for {gvk(d)}")
        except kubernetes_validate.ValidationError:
            pass


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS)
def test_builtin_kinds_pass_kubernetes_schemas(rendered, kdir):
    checked = 0
    for d in rendered[kdir]:
        if gvk(d) in SCHEMAS:
            continue
        assert not k8s_errors(d), (d["kind"], d["metadata"]["name"], k8s_errors(d))
        checked += 1
    assert checked or kdir in ("istio", "envoy-gateway")


@pytest.mark.parametrize("kdir", ["istio", "envoy-gateway"])
def test_crd_kinds_pass_repo_schemas(rendered, kdir):
    crds = [d for d in rendered[kdir] if gvk(d) in SCHEMAS]
    assert len(crds) >= 4
    for d in crds:
        assert not crd_errors(d), (d["kind"], d["metadata"]["name"], crd_errors(d))


def test_istio_and_gateway_api_kinds_pass_published_validators(rendered):
    objs = [d for k in ("istio", "envoy-gateway") for d in rendered[k] if gvk(d) in PUBLISHED]
    results = node_validate(objs)
    assert len(results) == len(objs) and all(r["checked"] for r in results)
    assert {r["kind"] for r in results} == {k for _, k in PUBLISHED}
    bad = [r for r in results if r["errors"]]
    assert not bad, bad


# The validators must be able to fail: broken copies of real objects.
def test_validators_catch_mistakes(rendered):
    istio = rendered["istio"]
    wp = one(istio, "WasmPlugin", "vlm-budget-gateway")

    typo = copy.deepcopy(wp)
    typo["spec"]["failStratgy"] = typo["spec"].pop("failStrategy")
    assert any("failStratgy" in e for e in crd_errors(typo))

    bad_phase = copy.deepcopy(wp)
    bad_phase["spec"]["phase"] = "AUTHX"
    assert crd_errors(bad_phase)
    assert node_validate([bad_phase])[0]["errors"]

    both = copy.deepcopy(wp)
    both["spec"]["selector"] = {"matchLabels": {"a": "b"}}
    assert crd_errors(both), "selector and targetRefs together must be refused"

    eg = rendered["envoy-gateway"]
    eep = copy.deepcopy(one(eg, "EnvoyExtensionPolicy", "vlm-budget"))
    eep["spec"]["wasm"][0]["code"]["type"] = "HTTP"
    assert crd_errors(eep), "type HTTP without code.http must be refused"
    ctp = copy.deepcopy(one(eg, "ClientTrafficPolicy", "vlm-budget-buffers"))
    ctp["spec"]["connection"]["bufferLimit"] = "128 MiB"
    assert crd_errors(ctp)

    dep = copy.deepcopy(one(rendered["kubernetes/base"], "Deployment", "vlm-budget"))
    dep["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    assert k8s_errors(dep), "strict validation refuses unknown fields"
    dep = copy.deepcopy(one(rendered["kubernetes/base"], "Deployment", "vlm-budget"))
    dep["spec"]["replicas"] = "two"
    assert k8s_errors(dep)


# ------------------------------------------------------------ cross-references


def services(docs) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in find(docs, "Service")}


def test_istio_encode_cluster_is_the_name_istio_gives(rendered):
    docs = rendered["istio"]
    svc = services(docs)["vllm-encode"]
    port = svc["spec"]["ports"][0]["port"]
    host = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"
    assert svc["spec"].get("clusterIP") != "None", "Istio gives headless Services original-destination clusters"
    plugins = find(docs, "WasmPlugin")
    assert {p["metadata"]["name"] for p in plugins} == {"vlm-budget-gateway", "vlm-budget-sidecar"}
    for p in plugins:
        cfg = p["spec"]["pluginConfig"]
        assert cfg["encode_cluster"] == f"outbound|{port}||{host}"
        assert p["spec"]["pluginName"] == "vlm_budget"
    gw = one(docs, "Gateway", "vlm-gateway")
    assert one(docs, "WasmPlugin", "vlm-budget-gateway")["spec"]["targetRefs"][0]["name"] == gw["metadata"]["name"]
    # The sidecar plugin and its buffer patch select the prefill/decode pods.
    pd = one(docs, "Deployment", "vllm-pd")["spec"]["template"]["metadata"]["labels"]
    for sel in (one(docs, "WasmPlugin", "vlm-budget-sidecar")["spec"]["selector"]["matchLabels"],
                one(docs, "EnvoyFilter", "vlm-budget-sidecar-buffers")["spec"]["workloadSelector"]["labels"]):
        assert sel.items() <= pd.items()
    assert one(docs, "Namespace", "vlm")["metadata"]["labels"]["istio-injection"] == "enabled"


def test_envoy_gateway_encode_cluster_is_patched_in(rendered):
    docs = rendered["envoy-gateway"]
    cfg = one(docs, "EnvoyExtensionPolicy", "vlm-budget")["spec"]["wasm"][0]["config"]
    patch = one(docs, "EnvoyPatchPolicy", "vlm-budget-encode-cluster")["spec"]["jsonPatches"][0]
    assert patch["operation"] == {**patch["operation"], "op": "add", "path": ""}
    cluster = patch["operation"]["value"]
    assert cfg["encode_cluster"] == patch["name"] == cluster["name"]
    addr = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    svc = services(docs)[addr["address"].split(".")[0]]
    assert addr["address"] == f"{svc['metadata']['name']}.vlm.svc.cluster.local"
    assert addr["port_value"] == svc["spec"]["ports"][0]["port"]
    # Every policy targets an object of this kustomization.
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for d in docs:
        spec = d.get("spec") or {}
        refs = spec.get("targetRefs") or ([spec["targetRef"]] if "targetRef" in spec else [])
        for r in refs:
            assert (r["kind"], r["name"]) in names, (d["kind"], r)
    # 64 MiB bodies fit the buffer limits on both sides.
    for kind in ("ClientTrafficPolicy", "BackendTrafficPolicy"):
        assert one(docs, kind, "vlm-budget-buffers")["spec"]["connection"]["bufferLimit"] == "128Mi"
    assert cfg["max_body_bytes"] <= 128 * 2**20


def test_plain_envoy_points_at_the_vllm_services(rendered):
    docs = rendered["kubernetes/overlays/static"]
    svcs = services(docs)
    boot = bootstrap_of(docs)
    for c in boot["static_resources"]["clusters"]:
        if c["name"] == "admin":
            continue
        addr = c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        name = addr["address"].split(".")[0]
        assert name in svcs, name
        assert svcs[name]["spec"]["clusterIP"] == "None", "STRICT_DNS needs the headless Service"
        assert addr["port_value"] == svcs[name]["spec"]["ports"][0]["port"]
    # The Deployment mounts what the bootstrap and the ECDS file name.
    dep = one(docs, "Deployment", "vlm-budget")
    pod = dep["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (ecds,) = [f["config_discovery"]["config_source"]["path_config_source"] for f in hcm["http_filters"]
               if "config_discovery" in f]
    assert ecds["path"] == f"{mounts['policy']}/vlm-budget.yaml"
    assert ecds["watched_directory"]["path"] == mounts["policy"]
    assert volumes["policy"]["configMap"]["name"] == "vlm-budget-policy"
    assert volumes["bootstrap"]["configMap"]["name"] == bootstrap_cm(docs)["metadata"]["name"]
    wasm_cfg = policy_of(docs)["resources"][0]["typed_config"]["config"]
    assert wasm_cfg["vm_config"]["code"]["local"]["filename"] == f"{mounts['module']}/plugin.wasm"
    version = tomllib.loads((ROOT / "Cargo.toml").read_text())["package"]["version"]
    assert volumes["module"]["image"]["reference"].endswith(f"/vlm-budget:{version}")
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"] == "/stats/prometheus"
    probe = pod["containers"][0]["readinessProbe"]["httpGet"]
    assert probe["path"] == "/ready"


def bootstrap_cm(docs) -> dict:
    cms = [d for d in find(docs, "ConfigMap") if d["metadata"]["name"].startswith("vlm-budget-envoy-")]
    assert len(cms) == 1
    return cms[0]


def bootstrap_of(docs) -> dict:
    return yaml.safe_load(bootstrap_cm(docs)["data"]["envoy.yaml"])


def policy_of(docs) -> dict:
    return yaml.safe_load(one(docs, "ConfigMap", "vlm-budget-policy")["data"]["vlm-budget.yaml"])


def plugin_config(docs) -> dict:
    return json.loads(policy_of(docs)["resources"][0]["typed_config"]["config"]["configuration"]["value"])


def test_overlays_toggle_only_the_policy(rendered):
    static = rendered["kubernetes/overlays/static"]
    seen = {}
    for name in ("vanilla", "static", "dynamic"):
        docs = rendered[f"kubernetes/overlays/{name}"]
        assert plugin_config(docs)["policy"] == name
        seen[name] = plugin_config(docs)
        # Apart from the policy ConfigMap the overlays are the same objects.
        strip = lambda ds: [d for d in ds if d["metadata"]["name"] != "vlm-budget-policy"]  # noqa: E731
        assert strip(docs) == strip(static)
        # And apart from the plugin configuration, the same filter.
        a, b = policy_of(docs), policy_of(static)
        for p in (a, b):
            p["resources"][0]["typed_config"]["config"]["configuration"]["value"] = None
        assert a == b
    assert seen["dynamic"]["metrics_poll_ms"] > 0
    encoders = one(static, "Deployment", "vllm-encode")["spec"]["replicas"]
    assert seen["dynamic"]["profile"]["encode_replicas"] == encoders
    for cfg in seen.values():
        assert cfg["encode_cluster"] == "encode_cluster"


def test_vllm_deployments_share_the_encoder_cache(rendered):
    docs = rendered["kubernetes/vllm"]
    roles = {}
    for name in ("vllm-encode", "vllm-pd"):
        pod = one(docs, "Deployment", name)["spec"]["template"]
        c = pod["spec"]["containers"][0]
        args = c["args"]
        ec = json.loads(args[args.index("--ec-transfer-config") + 1])
        assert ec["ec_connector"] == "ECSharedStorageConnector"
        roles[name] = ec["ec_role"]
        path = ec["ec_connector_extra_config"]["shared_storage_path"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        vols = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert vols[mounts[path]]["persistentVolumeClaim"]["claimName"] == "vllm-ec-cache"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert c["readinessProbe"]["httpGet"]["path"] == "/health"
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
        assert c["image"].startswith("vllm/vllm-openai:v")
    assert roles == {"vllm-encode": "ec_producer", "vllm-pd": "ec_consumer"}
    pvc = one(docs, "PersistentVolumeClaim", "vllm-ec-cache")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_vllm_1e1p1d_hands_the_kv_cache_from_prefill_to_decode(rendered):
    docs = rendered["kubernetes/vllm-1e1p1d"]
    deployments = {d["metadata"]["name"] for d in find(docs, "Deployment")}
    assert deployments == {"vllm-encode", "vllm-prefill", "vllm-decode"}, "vllm-pd replaced"
    assert "vllm-pd" not in services(docs) and "vllm-pd-headless" not in services(docs)
    roles = {}
    for name in sorted(deployments):
        pod = one(docs, "Deployment", name)["spec"]["template"]
        c = pod["spec"]["containers"][0]
        args = c["args"]
        ec = json.loads(args[args.index("--ec-transfer-config") + 1])
        kv = json.loads(args[args.index("--kv-transfer-config") + 1]) if "--kv-transfer-config" in args else {}
        roles[name] = (ec["ec_role"], kv.get("kv_connector"), kv.get("kv_role"))
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        vols = {v["name"]: v for v in pod["spec"]["volumes"]}
        path = ec["ec_connector_extra_config"]["shared_storage_path"]
        assert vols[mounts[path]]["persistentVolumeClaim"]["claimName"] == "vllm-ec-cache"
        env = {e["name"]: e for e in c.get("env", [])}
        if kv:
            assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
            assert int(env["VLLM_NIXL_SIDE_CHANNEL_PORT"]["value"]) > 0
        svc = services(docs)[name]
        assert svc["spec"]["selector"] == pod["metadata"]["labels"]
    assert roles == {"vllm-encode": ("ec_producer", None, None),
                     "vllm-prefill": ("ec_consumer", "NixlConnector", "kv_producer"),
                     "vllm-decode": ("ec_consumer", "NixlConnector", "kv_consumer")}


def test_schemas_name_their_sources():
    for (gv, kind), schema in SCHEMAS.items():
        assert schema["$comment"].startswith("Written for this repository from"), kind
        jsonschema.Draft202012Validator.check_schema(schema)
    readme = (DEPLOY / "schemas/README.md").read_text()
    for p in (DEPLOY / "schemas").glob("*.json"):
        assert p.name in readme, f"{p.name} not described in deploy/schemas/README.md"


def test_manifest_files_are_all_in_a_kustomization():
    """No manifest under deploy/ escapes the checks above."""
    listed = set()
    for kdir in KUSTOMIZATIONS:
        k = yaml.safe_load((DEPLOY / kdir / "kustomization.yaml").read_text())
        for r in k.get("resources", []):
            listed.add((DEPLOY / kdir / r).resolve())
        for g in k.get("configMapGenerator", []):
            for f in g.get("files", []):
                listed.add((DEPLOY / kdir / f).resolve())
    files = {p.resolve() for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert files - listed == set()
    assert not list(pathlib.Path(DEPLOY).rglob("*.yml"))


def test_transcode_service_matches_its_image_and_the_envoy_cluster(rendered):
    """deploy/kubernetes/transcoder: the Deployment runs the image that
    tools/transcoder/Dockerfile builds, on the port its headless Service and
    the bootstrap's transcode_cluster use; the HPA scales that Deployment."""
    docs = rendered["kubernetes/transcoder"]
    dep = one(docs, "Deployment", "vlm-transcode")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    version = tomllib.loads((ROOT / "tools/transcoder/Cargo.toml").read_text())["package"]["version"]
    assert c["image"].endswith(f"/vlm-transcode:{version}")
    args = c["args"]
    port = int(args[args.index("--listen") + 1].rsplit(":", 1)[1])
    assert c["ports"][0]["containerPort"] == port
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    threads = int(args[args.index("--threads") + 1])
    assert int(c["resources"]["requests"]["cpu"]) >= threads
    svc = one(docs, "Service", "vlm-transcode-headless")
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["ports"][0]["port"] == port
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    hpa = one(docs, "HorizontalPodAutoscaler", "vlm-transcode")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "vlm-transcode"}
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    # The image: the service's binary, its port, the pod's user.
    dockerfile = (ROOT / "tools/transcoder/Dockerfile").read_text()
    assert "cargo build --release --locked -p vlm-transcode" in dockerfile
    assert f"EXPOSE {port}" in dockerfile
    user = pod["securityContext"]["runAsUser"]
    assert f"USER {user}:{pod['securityContext']['runAsGroup']}" in dockerfile
    for line in dockerfile.splitlines():
        if line.startswith("FROM "):
            assert ":" in line.split()[1], f"unpinned base image: {line}"
    # Every stack's Envoy reaches it through transcode_cluster.
    boot = bootstrap_of(rendered["kubernetes/overlays/static"])
    (cluster,) = [c for c in boot["static_resources"]["clusters"] if c["name"] == "transcode_cluster"]
    addr = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert addr == {"address": "vlm-transcode-headless.vlm.svc.cluster.local", "port_value": port}
    offload = plugin_config(rendered["kubernetes/overlays/offload"])
    assert offload["transcode"] == "offload" and offload["transcode_cluster"] == "transcode_cluster"
    assert offload["transcode_authority"] == addr["address"]
