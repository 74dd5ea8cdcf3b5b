"""Every Envoy configuration in the repository passes `envoy --mode validate`
with the real module (the filter parses its configuration during
validation): the bootstraps under envoy/, the bootstrap and filter
configuration inside each overlay's ConfigMaps, the cluster the Envoy Gateway
patch adds, and the plugin configurations of the Istio WasmPlugins and the
EnvoyExtensionPolicy. Then, through a running Envoy: the plain-Kubernetes
policy switch without a restart, and the mesh configurations reaching the
encoders under the cluster names Istio and Envoy Gateway use."""
from __future__ import annotations

import copy
import json
import os
import pathlib
import subprocess
import time

import pytest
import yaml

import harness
from conftest import ROOT, find, one

WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"


def validate(config: dict | pathlib.Path, tmp_path: pathlib.Path, name: str) -> str:
    if isinstance(config, dict):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(config))
    else:
        path = config
    run = subprocess.run([harness.envoy_binary(), "--mode", "validate", "-c", str(path), "--concurrency", "2",
                          "--log-level", "info", "--component-log-level", "wasm:info"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    out = run.stdout + run.stderr
    assert run.returncode == 0 and f"configuration '{path}' OK" in out, out[-3000:]
    return out


def repo_bootstraps() -> list[pathlib.Path]:
    """Envoy bootstraps kept as files outside deploy/ (envoy/...)."""
    files = subprocess.run(["git", "ls-files", "*.yaml", "*.yml", "*.json"], capture_output=True, text=True,
                           cwd=ROOT, check=True).stdout.split()
    out = []
    for f in files:
        if f.startswith(("deploy/", "tests/")):
            continue
        try:
            doc = yaml.safe_load((ROOT / f).read_text())
        except yaml.YAMLError:
            continue
        if isinstance(doc, dict) and ("static_resources" in doc or "dynamic_resources" in doc):
            out.append(ROOT / f)
    return out


def test_repository_bootstraps_validate(wasm, tmp_path):
    boots = repo_bootstraps()
    assert ROOT / "envoy/envoy.yaml" in boots and ROOT / "envoy/xds/bootstrap.yaml" in boots
    for b in boots:
        validate(b, tmp_path, b.stem)


# ------------------------------------------------------------ plain Kubernetes


def configmaps(docs) -> tuple[dict, dict]:
    boot = [d for d in find(docs, "ConfigMap") if d["metadata"]["name"].startswith("vlm-budget-envoy-")]
    assert len(boot) == 1
    policy = one(docs, "ConfigMap", "vlm-budget-policy")
    return yaml.safe_load(boot[0]["data"]["envoy.yaml"]), yaml.safe_load(policy["data"]["vlm-budget.yaml"])


def localise(boot: dict, policy_dir: pathlib.Path, ports: dict[str, int], admin: int) -> dict:
    """The in-pod bootstrap with local paths and ports: the ECDS file in
    policy_dir, the clusters on 127.0.0.1."""
    boot = copy.deepcopy(boot)
    boot["admin"]["address"]["socket_address"]["port_value"] = admin
    listeners = {lst["name"]: lst for lst in boot["static_resources"]["listeners"]}
    for name, lst in listeners.items():
        lst["address"]["socket_address"].update(address="127.0.0.1", port_value=ports[name])
    hcm = listeners["vlm_ingress"]["filter_chains"][0]["filters"][0]["typed_config"]
    src = harness.wasm_filter(hcm)["config_discovery"]["config_source"]["path_config_source"]
    src["path"] = str(policy_dir / "vlm-budget.yaml")
    src["watched_directory"]["path"] = str(policy_dir)
    for c in boot["static_resources"]["clusters"]:
        addr = c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        if c["name"] == "admin":
            addr["port_value"] = admin
        else:
            addr.update(address="127.0.0.1", port_value=ports[c["name"]])
    return boot


def local_policy(policy: dict, wasm: pathlib.Path) -> dict:
    policy = copy.deepcopy(policy)
    policy["resources"][0]["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = str(wasm)
    return policy


def inline(boot: dict, policy: dict) -> dict:
    """The bootstrap with the ECDS filter configuration in place (what Envoy
    runs once it has loaded the file)."""
    boot = copy.deepcopy(boot)
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    ext = policy["resources"][0]
    at = hcm["http_filters"].index(harness.wasm_filter(hcm))
    assert hcm["http_filters"][at]["name"] == ext["name"]
    assert ext["typed_config"]["@type"] in hcm["http_filters"][at]["config_discovery"]["type_urls"]
    hcm["http_filters"][at] = {"name": ext["name"], "typed_config": ext["typed_config"]}
    return boot


def some_ports() -> dict[str, int]:
    return {"vlm_ingress": harness.free_port(), "metrics": harness.free_port(),
            "pd_cluster": harness.free_port(), "encode_cluster": harness.free_port(),
            "transcode_cluster": harness.free_port()}


@pytest.mark.parametrize("overlay", ["vanilla", "static", "dynamic"])
def test_overlay_configmaps_validate(rendered, wasm, tmp_path, overlay):
    boot, policy = configmaps(rendered[f"kubernetes/overlays/{overlay}"])
    (tmp_path / "vlm-budget.yaml").write_text(yaml.safe_dump(local_policy(policy, wasm)))
    ports = some_ports()
    local = localise(boot, tmp_path, ports, harness.free_port())
    validate(local, tmp_path, "bootstrap")
    out = validate(inline(local, local_policy(policy, wasm)), tmp_path, "inlined")
    assert f"vlm-budget: configured: policy={overlay}" in out


def test_offload_overlay_validates_and_names_the_transcode_cluster(rendered, wasm, tmp_path):
    boot, policy = configmaps(rendered["kubernetes/overlays/offload"])
    cfg = json.loads(policy["resources"][0]["typed_config"]["config"]["configuration"]["value"])
    assert cfg["transcode"] == "offload"
    assert cfg["transcode_cluster"] in {c["name"] for c in boot["static_resources"]["clusters"]}
    ports = some_ports()
    local = localise(boot, tmp_path, ports, harness.free_port())
    out = validate(inline(local, local_policy(policy, wasm)), tmp_path, "offload")
    assert "vlm-budget: configured: policy=static" in out


def kubelet_configmap(dir_: pathlib.Path, files: dict[str, str]) -> None:
    """Writes files as the kubelet lays out a ConfigMap volume and updates it:
    a timestamped directory, the `..data` link renamed over atomically, and
    per-key links through `..data`."""
    stamp = dir_ / f"..{time.time_ns()}"
    stamp.mkdir()
    for name, text in files.items():
        (stamp / name).write_text(text)
    old = os.readlink(dir_ / "..data") if (dir_ / "..data").is_symlink() else None
    tmp = dir_ / "..data_tmp"
    tmp.symlink_to(stamp.name)
    os.replace(tmp, dir_ / "..data")
    for name in files:
        if not (dir_ / name).is_symlink():
            (dir_ / name).symlink_to(f"..data/{name}")
    if old:
        for f in (dir_ / old).iterdir():
            f.unlink()
        (dir_ / old).rmdir()


def test_configmap_update_switches_policy_without_restart(rendered, wasm, tmp_path):
    """Plain Kubernetes: `kubectl apply -k overlays/dynamic` over the static
    overlay changes the policy ConfigMap; the kubelet swaps the mounted file
    and the running Envoy serves the new policy."""
    boot, static_policy = configmaps(rendered["kubernetes/overlays/static"])
    _, dynamic_policy = configmaps(rendered["kubernetes/overlays/dynamic"])
    policy_dir = tmp_path / "policy"
    policy_dir.mkdir()
    kubelet_configmap(policy_dir, {"vlm-budget.yaml": yaml.safe_dump(local_policy(static_policy, wasm))})
    pd, encoder = harness.Recorder(), harness.Recorder()
    ports = {**some_ports(), "pd_cluster": pd.port, "encode_cluster": encoder.port}
    admin = harness.free_port()
    env = harness.Envoy(localise(boot, policy_dir, ports, admin), tmp_path, admin, ports["vlm_ingress"])
    try:
        env.wait_ready()
        body = harness.chat_body([harness.data_url(harness.image_bytes(3000, 2000, "JPEG"), "image/jpeg")])
        status, headers, _ = harness.post(env.url, body)
        assert status == 200 and headers["x-vlm-policy"] == "static"
        assert headers["x-vlm-budget-tokens"] == "4096"
        assert len(encoder.requests) == 1, "the image goes to the encoders first"
        pid = env.proc.pid

        kubelet_configmap(policy_dir, {"vlm-budget.yaml": yaml.safe_dump(local_policy(dynamic_policy, wasm))})
        deadline = time.time() + 15
        while True:
            status, headers, _ = harness.post(env.url, body)
            assert status == 200
            if headers["x-vlm-policy"] == "dynamic":
                break
            assert time.time() < deadline, "the new policy never took effect"
            time.sleep(0.2)
        assert env.proc.pid == pid and env.proc.poll() is None, "Envoy restarted"
        stats = env.stats()
        assert stats["extension_config_discovery.http_filter.vlm_budget.config_reload"] >= 2
        assert stats.get("extension_config_discovery.http_filter.vlm_budget.config_fail", 0) == 0
        # The metrics listener serves Prometheus text from the admin port.
        with harness.urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/stats/prometheus") as r:
            assert b"\nvlm_budget_" in r.read()
    finally:
        env.stop()
        pd.close()
        encoder.close()


def test_envoy_gateway_patch_cluster_validates(rendered, wasm, tmp_path):
    """The cluster the EnvoyPatchPolicy adds is a valid Envoy Cluster, and the
    EnvoyExtensionPolicy's config is accepted by the filter beside it."""
    docs = rendered["envoy-gateway"]
    cluster = copy.deepcopy(one(docs, "EnvoyPatchPolicy", "vlm-budget-encode-cluster")["spec"]["jsonPatches"][0][
        "operation"]["value"])
    config = one(docs, "EnvoyExtensionPolicy", "vlm-budget")["spec"]["wasm"][0]["config"]
    cfg = harness.render_config(config, harness.free_port(), harness.free_port(), harness.free_port(), wasm)
    clusters = cfg["static_resources"]["clusters"]
    clusters[:] = [c for c in clusters if c["name"] != cluster["name"]] + [cluster]
    out = validate(cfg, tmp_path, "envoy-gateway")
    assert "vlm-budget: configured: policy=dynamic" in out


def mesh_configs(rendered) -> list[tuple[str, dict]]:
    istio = rendered["istio"]
    eg = rendered["envoy-gateway"]
    return [(p["metadata"]["name"], p["spec"]["pluginConfig"]) for p in find(istio, "WasmPlugin")] + \
           [("envoy-gateway", one(eg, "EnvoyExtensionPolicy", "vlm-budget")["spec"]["wasm"][0]["config"])]


def test_mesh_plugin_configs_reach_the_named_encode_cluster(rendered, wasm, tmp_path):
    """Each Istio/Envoy Gateway plugin configuration, in a real Envoy whose
    encoders' cluster has the name the mesh gives it (`outbound|8000||...`
    for Istio): the filter loads it, sends the image to that cluster first,
    then forwards to prefill/decode."""
    configs = mesh_configs(rendered)
    assert len(configs) == 3
    pd, encoder = harness.Recorder(), harness.Recorder()
    try:
        for name, plugin in configs:
            listen, admin = harness.free_port(), harness.free_port()
            cfg = harness.render_config(plugin, pd.port, listen, admin, wasm, encoder.port)
            for c in cfg["static_resources"]["clusters"]:
                if c["name"] == "encode_cluster":
                    c["name"] = c["load_assignment"]["cluster_name"] = plugin["encode_cluster"]
            env = harness.Envoy(cfg, tmp_path, admin, listen)
            try:
                env.wait_ready()
                before = len(encoder.requests)
                body = harness.chat_body([harness.data_url(harness.image_bytes(1600, 1200, "PNG"), "image/png")])
                status, headers, _ = harness.post(env.url, body)
                assert status == 200, name
                assert headers["x-vlm-policy"] == plugin["policy"], name
                assert len(encoder.requests) == before + 1, f"{name}: no call to {plugin['encode_cluster']}"
                assert encoder.requests[-1]["headers"]["host"] == plugin["encode_authority"]
                assert pd.last()["at"] >= encoder.requests[-1]["at"]
            finally:
                env.stop()
    finally:
        pd.close()
        encoder.close()


def test_request_path_patches_validate(rendered, wasm, tmp_path):
    """Every shipped request path puts Envoy's gzip decompressor in front of
    the filter, and holds headers only where Envoy's flag is set: the
    decompressor of each Istio EnvoyFilter and of the Envoy Gateway patch is
    a valid Envoy filter in front of the filter, and the patched Wasm flag is
    the one Envoy reads."""
    eg = rendered["envoy-gateway"]
    patches = one(eg, "EnvoyPatchPolicy", "vlm-budget-request-path")["spec"]["jsonPatches"]
    (flag,) = [p["operation"] for p in patches if p["operation"]["path"] == "/allow_on_headers_stop_iteration"]
    assert flag["value"] is True and WASM_TYPE in flag["jsonPath"]
    assert one(eg, "EnvoyExtensionPolicy", "vlm-budget")["spec"]["wasm"][0]["config"]["hold_headers"] is True
    decompressors = [("envoy-gateway", p["operation"]["value"]) for p in patches
                     if p["operation"]["path"].endswith("/http_filters/0")]
    for ef in find(rendered["istio"], "EnvoyFilter"):
        for patch in ef["spec"]["configPatches"]:
            if patch["applyTo"] == "HTTP_FILTER":
                assert patch["patch"]["operation"] == "INSERT_FIRST"
                decompressors.append((ef["metadata"]["name"], patch["patch"]["value"]))
    assert len(decompressors) == 3
    # Istio cannot set the flag on a WasmPlugin: its configs do not hold.
    for wp in find(rendered["istio"], "WasmPlugin"):
        assert wp["spec"]["pluginConfig"]["hold_headers"] is False
    for name, dec in decompressors:
        assert dec["name"] == harness.DECOMPRESSOR
        cfg = harness.render_config({"policy": "static", "hold_headers": True}, harness.free_port(),
                                    harness.free_port(), harness.free_port(), wasm)
        hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        assert hcm["http_filters"][0]["name"] == harness.DECOMPRESSOR
        hcm["http_filters"][0] = dec
        harness.wasm_filter(hcm)["typed_config"]["config"]["allow_on_headers_stop_iteration"] = flag["value"]
        validate(cfg, tmp_path, name)


def test_shipped_envoy_configs_decompress_and_hold(rendered):
    """The plain Envoy configs: decompressor first, and the filter's
    hold_headers matching Envoy's allow_on_headers_stop_iteration."""
    boots = [yaml.safe_load(p.read_text()) for p in repo_bootstraps()]
    boots.append(yaml.safe_load((ROOT / "envoy/xds/lds.yaml").read_text())["resources"][0])
    k8s = rendered["kubernetes/overlays/static"]
    boot = yaml.safe_load(next(d for d in find(k8s, "ConfigMap") if d["metadata"]["name"].startswith(
        "vlm-budget-envoy-"))["data"]["envoy.yaml"])
    boots.append(boot)
    seen = 0
    for doc in boots:
        listeners = doc.get("static_resources", {}).get("listeners", []) if "static_resources" in doc else [doc]
        for lst in listeners:
            hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
            names = [f["name"] for f in hcm.get("http_filters", [])]
            if len(names) < 2:
                continue
            assert names[0] == harness.DECOMPRESSOR, names
            seen += 1
    assert seen >= 3
    for overlay in ("vanilla", "static", "dynamic"):
        docs = rendered[f"kubernetes/overlays/{overlay}"]
        policy = yaml.safe_load(one(docs, "ConfigMap", "vlm-budget-policy")["data"]["vlm-budget.yaml"])
        wasm_cfg = policy["resources"][0]["typed_config"]["config"]
        plugin = json.loads(wasm_cfg["configuration"]["value"])
        assert plugin["hold_headers"] is wasm_cfg["allow_on_headers_stop_iteration"] is True, overlay
