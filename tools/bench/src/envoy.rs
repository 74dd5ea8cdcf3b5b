//! The Envoy configuration of a benchmark run: envoy/envoy.yaml's listener,
//! Wasm filter and clusters, with the run's ports, module, plugin
//! configuration and backend addresses, as JSON (Envoy reads either).

use crate::error::{BenchError, Result};
use crate::http::Url;
use serde_json::{json, Map, Value};
use std::net::IpAddr;
use std::path::Path;

/// The policies the filter knows.
pub const POLICIES: [&str; 3] = ["vanilla", "static", "dynamic"];

/// The plugin configuration for `policy`: EPD routing to `encode_cluster`,
/// the prefill/decode cluster's metrics polled too, the SLO and the static
/// budget, then `overrides` (dotted keys allowed:
/// `profile.encode_replicas=2`). Checked with the filter's own validation.
pub fn plugin_config(
    policy: &str,
    slo_ms: f64,
    static_budget: u64,
    overrides: &[(String, Value)],
) -> Result<Value> {
    if !(slo_ms.is_finite() && slo_ms >= 1.0) {
        return Err(BenchError::Usage(format!(
            "the SLO must be >= 1 ms, got {slo_ms}"
        )));
    }
    if !POLICIES.contains(&policy) {
        return Err(BenchError::Usage(format!(
            "unknown policy `{policy}` (vanilla, static, dynamic)"
        )));
    }
    let mut cfg = json!({
        "policy": policy,
        "encode_cluster": "encode_cluster",
        "encode_authority": "vlm-encode",
        "encode_fanout": "per_image",
        "encode_failure": "fallback",
        "pd_metrics_cluster": "pd_cluster",
        "pd_metrics_authority": "vlm-pd",
        "static_budget_tokens": static_budget,
        "ttft_slo_ms": slo_ms.round() as u64,
    });
    for (key, value) in overrides {
        set_dotted(&mut cfg, key, value.clone())?;
    }
    let text = serde_json::to_vec(&cfg).map_err(|e| BenchError::json("plugin configuration", e))?;
    vlm_budget::core::config::Config::from_json(&text)
        .map_err(|e| BenchError::Usage(format!("plugin configuration for {policy}: {e}")))?;
    Ok(cfg)
}

/// The plugin settings of a 1E1P1D run: the prefill cluster, whose
/// backlog is polled instead of decode's.
pub fn split_overrides() -> Vec<(String, Value)> {
    [
        ("prefill_cluster", "prefill_cluster"),
        ("prefill_authority", "vlm-prefill"),
        ("pd_metrics_cluster", "prefill_cluster"),
        ("pd_metrics_authority", "vlm-prefill"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), Value::from(v)))
    .collect()
}

fn set_dotted(cfg: &mut Value, key: &str, value: Value) -> Result<()> {
    let mut node = cfg;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() {
            return Err(BenchError::Usage(format!("bad plugin key `{key}`")));
        }
        let obj = node.as_object_mut().ok_or_else(|| {
            BenchError::Usage(format!("plugin key `{key}`: `{part}` is inside a non-object"))
        })?;
        if i + 1 == parts.len() {
            obj.insert((*part).to_string(), value);
            return Ok(());
        }
        node = obj
            .entry((*part).to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    Ok(())
}

/// Parses `KEY=JSON` (a bare word that is not JSON is taken as a string).
pub fn parse_override(s: &str) -> Result<(String, Value)> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| BenchError::Usage(format!("--plugin-set wants KEY=VALUE, got `{s}`")))?;
    let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
    Ok((k.trim().to_string(), value))
}

fn cluster(name: &str, url: &Url) -> Value {
    let kind = if url.host.parse::<IpAddr>().is_ok() {
        "STATIC"
    } else {
        "STRICT_DNS"
    };
    json!({
        "name": name,
        "type": kind,
        "connect_timeout": "5s",
        "per_connection_buffer_limit_bytes": 134217728,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": url.host, "port_value": url.port}}}}]}]
        }
    })
}

/// The whole bootstrap configuration.
pub fn config(
    listen_port: u16,
    admin_port: u16,
    wasm: &Path,
    plugin: &Value,
    pd: &Url,
    encode: &Url,
    prefill: Option<&Url>,
) -> Value {
    let plugin_text = plugin.to_string();
    let mut clusters = vec![cluster("pd_cluster", pd), cluster("encode_cluster", encode)];
    if let Some(url) = prefill {
        clusters.push(cluster("prefill_cluster", url));
    }
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "vlm_ingress",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                "per_connection_buffer_limit_bytes": 134217728,
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "vlm_ingress",
                        "codec_type": "AUTO",
                        "http2_protocol_options": {
                            "initial_stream_window_size": 134217728,
                            "initial_connection_window_size": 134217728
                        },
                        "route_config": {
                            "name": "vlm_routes",
                            "virtual_hosts": [{
                                "name": "vlm",
                                "domains": ["*"],
                                "routes": [{"match": {"prefix": "/"},
                                            "route": {"cluster": "pd_cluster", "timeout": "0s"}}]
                            }]
                        },
                        "http_filters": [
                            {
                                "name": "envoy.filters.http.wasm",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                                    "config": {
                                        "name": "vlm_budget",
                                        "root_id": "vlm_budget",
                                        "failure_policy": "FAIL_RELOAD",
                                        "configuration": {
                                            "@type": "type.googleapis.com/google.protobuf.StringValue",
                                            "value": plugin_text
                                        },
                                        "vm_config": {
                                            "vm_id": "vlm_budget",
                                            "runtime": "envoy.wasm.runtime.v8",
                                            "code": {"local": {"filename": wasm.to_string_lossy()}}
                                        }
                                    }
                                }
                            },
                            {
                                "name": "envoy.filters.http.router",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                                }
                            }
                        ]
                    }
                }]}]
            }],
            "clusters": clusters
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_configs_are_valid_and_overridable() {
        for p in POLICIES {
            let c = plugin_config(p, 800.0, 4096, &[]).unwrap();
            assert_eq!(c["policy"], p);
            assert_eq!(c["ttft_slo_ms"], 800);
        }
        let o = [
            parse_override("profile.encode_replicas=2").unwrap(),
            parse_override("rate_window_s=5").unwrap(),
        ];
        let c = plugin_config("dynamic", 1000.0, 4096, &o).unwrap();
        assert_eq!(c["profile"]["encode_replicas"], 2);
        assert_eq!(c["rate_window_s"], 5);
        // The filter's own validation applies.
        assert!(plugin_config(
            "dynamic",
            1000.0,
            4096,
            &[parse_override("jpeg_quality=0").unwrap()]
        )
        .is_err());
        assert!(plugin_config(
            "dynamic",
            1000.0,
            4096,
            &[parse_override("no_such_field=1").unwrap()]
        )
        .is_err());
        assert!(plugin_config("fancy", 1000.0, 4096, &[]).is_err());
        assert!(parse_override("novalue").is_err());
        assert_eq!(parse_override("resize_filter=lanczos3").unwrap().1, "lanczos3");
    }

    #[test]
    fn config_points_clusters_at_the_backends() {
        let pd = Url::parse("http://127.0.0.1:8200").unwrap();
        let enc = Url::parse("http://gpu-a:8100").unwrap();
        let plugin = plugin_config("static", 1000.0, 4096, &[]).unwrap();
        let c = config(10000, 9901, Path::new("/m.wasm"), &plugin, &pd, &enc, None);
        let clusters = c["static_resources"]["clusters"].as_array().unwrap();
        assert_eq!(clusters[0]["type"], "STATIC");
        assert_eq!(clusters[1]["type"], "STRICT_DNS");
        let addr = &clusters[1]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"];
        assert_eq!(addr["socket_address"]["address"], "gpu-a");
        let wasm = &c["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            ["http_filters"][0]["typed_config"]["config"];
        let inner: Value = serde_json::from_str(wasm["configuration"]["value"].as_str().unwrap()).unwrap();
        assert_eq!(inner, plugin);
        assert_eq!(wasm["vm_config"]["code"]["local"]["filename"], "/m.wasm");
        assert_eq!(clusters.len(), 2);
    }

    #[test]
    fn a_split_run_adds_the_prefill_cluster() {
        let pd = Url::parse("http://127.0.0.1:8200").unwrap();
        let enc = Url::parse("http://127.0.0.1:8100").unwrap();
        let pre = Url::parse("http://127.0.0.1:8300").unwrap();
        for p in POLICIES {
            let plugin = plugin_config(p, 1000.0, 4096, &split_overrides()).unwrap();
            assert_eq!(plugin["prefill_cluster"], "prefill_cluster");
            assert_eq!(plugin["pd_metrics_cluster"], "prefill_cluster");
            let c = config(10000, 9901, Path::new("/m.wasm"), &plugin, &pd, &enc, Some(&pre));
            let clusters = c["static_resources"]["clusters"].as_array().unwrap();
            assert_eq!(clusters[2]["name"], "prefill_cluster");
            let addr =
                &clusters[2]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"];
            assert_eq!(addr["socket_address"]["port_value"], 8300);
        }
    }
}
