//! Plugin configuration: typed, strict (`deny_unknown_fields`), validated
//! before the plugin accepts traffic. A bad configuration is refused with an
//! error naming the field; the plugin never runs on silent defaults.

use super::dynamic::DynamicParams;
use super::encode::{EncodeFailure, EncodeFanout};
use super::latency::{LatencyModel, H100_ENCODE, H100_PREFILL};
use super::offload::TranscodeMode;
use super::policy::PolicyKind;
use super::prefill::PrefillFailure;
use super::residual::MarginRule;
use super::sizing::SizingRule;
use super::transcode::{ResizeFilter, TranscodeOptions};
use serde::Deserialize;
use std::fmt;

/// The backend's sizing rule, as configured.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SizingConfig {
    pub patch_size: u32,
    pub merge_size: u32,
    pub min_pixels: u64,
    pub max_pixels: u64,
}

impl Default for SizingConfig {
    fn default() -> Self {
        let q = SizingRule::QWEN2_5_VL;
        Self {
            patch_size: q.patch_size,
            merge_size: q.merge_size,
            min_pixels: q.min_pixels,
            max_pixels: q.max_pixels,
        }
    }
}

/// The GPUs' token -> latency relation (`profile`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProfileConfig {
    /// Vision encoder time for n visual tokens.
    pub encode_ms: LatencyModel,
    /// Prefill time for n prompt tokens (visual + text).
    pub prefill_ms: LatencyModel,
    /// Encoder replicas serving the encode cluster.
    pub encode_replicas: u64,
    /// Prefill/decode replicas behind the route.
    pub pd_replicas: u64,
    /// The filter's transcode speed before it has measured its own, ms per
    /// input megapixel.
    pub transcode_ms_per_mpixel: f64,
    /// With `prefill_cluster`: the KV cache's transfer to decode and
    /// decode's first step, ms for a prompt of n tokens.
    pub kv_handoff_ms: LatencyModel,
}

impl Default for ProfileConfig {
    fn default() -> Self {
        Self {
            encode_ms: H100_ENCODE,
            prefill_ms: H100_PREFILL,
            encode_replicas: 1,
            pd_replicas: 1,
            transcode_ms_per_mpixel: 25.0,
            kv_handoff_ms: KV_HANDOFF,
        }
    }
}

/// The KV hand-off of a prefill/decode split before it is measured: a
/// decode step (6 ms) and a NIXL transfer of 1.5 ms per 1,000 prompt tokens
/// (~36 KiB of KV cache per token of a Qwen2.5-VL-3B-sized model at ~25 GB/s).
pub const KV_HANDOFF: LatencyModel = LatencyModel::Quadratic {
    a: 6.0,
    b: 0.0015,
    c: 0.0,
};

/// Online correction of the profile from observed encode and
/// forward-to-first-token times.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CalibrationConfig {
    pub enabled: bool,
    /// Weight of one observation (0..1).
    pub alpha: f64,
    /// Bounds of the correction factor.
    pub min_factor: f64,
    pub max_factor: f64,
}

impl Default for CalibrationConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            alpha: 0.1,
            min_factor: 0.5,
            max_factor: 4.0,
        }
    }
}

/// The plugin configuration (JSON). See README "Configuration".
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `vanilla`, `static` or `dynamic`.
    pub policy: PolicyKind,
    /// Per-image token budget of the `static` policy.
    pub static_budget_tokens: u64,
    /// No policy shrinks an image below this many tokens.
    pub min_tokens_per_image: u64,
    /// Images whose header claims more pixels are refused before decoding.
    pub max_image_pixels: u64,
    /// Largest request body the filter buffers and inspects.
    pub max_body_bytes: u64,
    /// Most images accepted in one request.
    pub max_images_per_request: u64,
    /// Quality of re-encoded JPEGs (1-100).
    pub jpeg_quality: u64,
    /// Resampling filter.
    pub resize_filter: ResizeFilter,
    /// On bad input, forward the original request instead of a 400.
    pub fail_open: bool,
    /// Also parse and check requests that cannot carry an image (no
    /// `image_url` in the body): malformed ones get the filter's 400 instead
    /// of the backend's. Off: they are forwarded untouched after one byte
    /// search, which keeps the filter's cost on text traffic low.
    pub validate_text_only: bool,
    /// Hold the request headers back from the upstream until the body is
    /// decided (header callback answers Pause). Needs Envoy's
    /// `allow_on_headers_stop_iteration: true` in the same plugin config:
    /// without it a header Pause also stops the body, and the filter, seeing
    /// no body, stops holding (see `shell::hold`).
    pub hold_headers: bool,
    /// Request paths (exact, query string ignored) the filter acts on.
    pub paths: Vec<String>,
    /// The backend's image sizing rule.
    pub sizing: SizingConfig,
    /// Envoy cluster of the encode (vision encoder) instances. Unset: the
    /// filter only resizes (a monolithic vLLM behind the route).
    pub encode_cluster: Option<String>,
    /// `:authority` of encode requests.
    pub encode_authority: String,
    /// Path of encode requests.
    pub encode_path: String,
    /// Timeout of one encode call.
    pub encode_timeout_ms: u64,
    /// Retries of a failed or timed-out encode call.
    pub encode_retries: u64,
    /// After the retries: `fallback` (forward to PD) or `fail` (502).
    pub encode_failure: EncodeFailure,
    /// `per_image` or `per_request`.
    pub encode_fanout: EncodeFanout,
    /// Envoy cluster of the prefill instances of a prefill/decode split
    /// (1E1P1D): each request is prefilled there first and goes on to the
    /// route's cluster (decode) with the prefill's `kv_transfer_params`.
    /// Unset: the route's cluster prefills and decodes.
    pub prefill_cluster: Option<String>,
    /// `:authority` of prefill requests.
    pub prefill_authority: String,
    /// Path of prefill requests.
    pub prefill_path: String,
    /// Timeout of one prefill call.
    pub prefill_timeout_ms: u64,
    /// Retries of a failed or timed-out prefill call.
    pub prefill_retries: u64,
    /// After the retries: `fail` (502) or `fallback` (decode alone).
    pub prefill_failure: PrefillFailure,
    /// Dynamic policy: time-to-first-token SLO, ms.
    pub ttft_slo_ms: u64,
    /// Bounds of a per-request SLO given in `x-slo-ttft-ms`.
    pub slo_min_ms: u64,
    pub slo_max_ms: u64,
    /// The budget aims at `ttft_slo_ms * slo_headroom` (0..1] minus the
    /// learned margin.
    pub slo_headroom: f64,
    /// Share of requests with images meant to be within the SLO: the
    /// margin is the observed-minus-predicted TTFT at this percentile.
    pub slo_percentile: f64,
    /// Time constant of the learned margin's memory, seconds.
    pub correction_window_s: f64,
    /// The margin before enough TTFT samples exist (cold start), ms.
    pub overhead_ms: f64,
    /// Encoder utilisation cap for queue stability (0..1).
    pub max_utilisation: f64,
    /// Text bytes per prompt token (prefill estimate).
    pub text_bytes_per_token: f64,
    /// Time constant of the arrival-rate estimates, seconds.
    pub rate_window_s: f64,
    /// The GPU latency profile.
    pub profile: ProfileConfig,
    /// Online calibration of the profile.
    pub calibration: CalibrationConfig,
    /// Poll the encode cluster's Prometheus metrics every this many ms (0: off).
    pub metrics_poll_ms: u64,
    /// Path of the encoders' metrics.
    pub metrics_path: String,
    /// Envoy cluster of the prefill/decode instances whose metrics are
    /// polled too (their queue); unset: only this proxy's own count.
    pub pd_metrics_cluster: Option<String>,
    /// `:authority` of that poll.
    pub pd_metrics_authority: String,
    /// A cluster reading older than this is ignored, ms.
    pub metrics_stale_ms: u64,
    /// Where images are shrunk: `in_filter` or `offload`.
    pub transcode: TranscodeMode,
    /// Envoy cluster of the `vlm-transcode` service (`offload`).
    pub transcode_cluster: Option<String>,
    /// `:authority` of offload calls.
    pub transcode_authority: String,
    /// Timeout of one offload call; past it the filter shrinks the image
    /// itself.
    pub transcode_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            policy: PolicyKind::Static,
            static_budget_tokens: 4096,
            min_tokens_per_image: 256,
            max_image_pixels: 40_000_000,
            max_body_bytes: 64 * 1024 * 1024,
            max_images_per_request: 64,
            jpeg_quality: 90,
            resize_filter: ResizeFilter::CatmullRom,
            fail_open: false,
            validate_text_only: false,
            hold_headers: false,
            paths: vec!["/v1/chat/completions".into()],
            sizing: SizingConfig::default(),
            encode_cluster: None,
            encode_authority: "vlm-encode".into(),
            encode_path: "/v1/chat/completions".into(),
            encode_timeout_ms: 30_000,
            encode_retries: 1,
            encode_failure: EncodeFailure::Fallback,
            encode_fanout: EncodeFanout::PerImage,
            prefill_cluster: None,
            prefill_authority: "vlm-prefill".into(),
            prefill_path: "/v1/chat/completions".into(),
            prefill_timeout_ms: 30_000,
            prefill_retries: 1,
            prefill_failure: PrefillFailure::Fail,
            ttft_slo_ms: 1000,
            slo_min_ms: 100,
            slo_max_ms: 60_000,
            slo_headroom: 1.0,
            slo_percentile: 0.99,
            correction_window_s: 10.0,
            overhead_ms: 100.0,
            max_utilisation: 0.85,
            text_bytes_per_token: 4.0,
            rate_window_s: 3.0,
            profile: ProfileConfig::default(),
            calibration: CalibrationConfig::default(),
            metrics_poll_ms: 1000,
            metrics_path: "/metrics".into(),
            pd_metrics_cluster: None,
            pd_metrics_authority: "vlm-pd".into(),
            metrics_stale_ms: 5000,
            transcode: TranscodeMode::InFilter,
            transcode_cluster: None,
            transcode_authority: "vlm-transcode".into(),
            transcode_timeout_ms: 10_000,
        }
    }
}

/// A configuration the plugin refuses, naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration: field `{}`: {}",
            self.field, self.message
        )
    }
}

impl std::error::Error for ConfigError {}

fn bad(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        message: message.into(),
    }
}

/// TTFT samples (since the histogram was created) needed before the learned
/// margin replaces the prior `overhead_ms`.
pub const MARGIN_MIN_SAMPLES: u64 = 3;

/// Hard ceiling on `max_body_bytes`: a VM's linear memory is capped near
/// 1 GiB and a rewrite holds the body about three times over.
pub const MAX_BODY_BYTES_CEILING: u64 = 256 * 1024 * 1024;

/// serde also reads a struct from a JSON array (fields by position, the
/// rest defaulted), so `[]` would load as every default: the configuration
/// and each of its sections must be JSON objects.
fn reject_positional(bytes: &[u8]) -> Result<(), ConfigError> {
    const OBJECTS: [(&str, &str); 6] = [
        ("", "(root)"),
        ("/sizing", "sizing"),
        ("/profile", "profile"),
        ("/profile/encode_ms", "profile.encode_ms"),
        ("/profile/prefill_ms", "profile.prefill_ms"),
        ("/calibration", "calibration"),
    ];
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| bad("(root)", e.to_string()))?;
    for (pointer, field) in OBJECTS {
        if value.pointer(pointer).is_some_and(serde_json::Value::is_array) {
            return Err(bad(field, "must be an object, not an array"));
        }
    }
    Ok(())
}

impl Config {
    /// Parses and validates. Empty input means all defaults.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Self::default().validated();
        }
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." || path.is_empty() {
                "(root)".to_string()
            } else {
                path
            };
            // Unknown fields are reported at their parent's path: name them.
            let message = e.into_inner().to_string();
            ConfigError { field, message }
        })?;
        reject_positional(bytes)?;
        cfg.validated()
    }

    /// Checks ranges and cross-field rules.
    pub fn validated(self) -> Result<Self, ConfigError> {
        let s = &self.sizing;
        if !(1..=64).contains(&s.patch_size) {
            return Err(bad("sizing.patch_size", "must be 1..=64"));
        }
        if !(1..=8).contains(&s.merge_size) {
            return Err(bad("sizing.merge_size", "must be 1..=8"));
        }
        let rule = self.sizing_rule();
        if s.min_pixels < rule.pixels_per_token() {
            return Err(bad(
                "sizing.min_pixels",
                format!("must be at least one token ({} px)", rule.pixels_per_token()),
            ));
        }
        if s.max_pixels < s.min_pixels {
            return Err(bad("sizing.max_pixels", "must be >= sizing.min_pixels"));
        }
        if self.min_tokens_per_image < rule.min_tokens() || self.min_tokens_per_image > rule.max_tokens() {
            return Err(bad(
                "min_tokens_per_image",
                format!(
                    "must be within the backend's {}..={} tokens",
                    rule.min_tokens(),
                    rule.max_tokens()
                ),
            ));
        }
        if self.static_budget_tokens < self.min_tokens_per_image
            || self.static_budget_tokens > rule.max_tokens()
        {
            return Err(bad(
                "static_budget_tokens",
                format!(
                    "must be within min_tokens_per_image ({})..={}",
                    self.min_tokens_per_image,
                    rule.max_tokens()
                ),
            ));
        }
        if self.max_image_pixels < rule.pixels_per_token() {
            return Err(bad("max_image_pixels", "must allow at least one visual token"));
        }
        if self.max_body_bytes == 0 || self.max_body_bytes > MAX_BODY_BYTES_CEILING {
            return Err(bad(
                "max_body_bytes",
                format!("must be 1..={MAX_BODY_BYTES_CEILING}"),
            ));
        }
        if self.max_images_per_request == 0 {
            return Err(bad("max_images_per_request", "must be at least 1"));
        }
        if !(1..=100).contains(&self.jpeg_quality) {
            return Err(bad("jpeg_quality", "must be 1..=100"));
        }
        if self.paths.is_empty() {
            return Err(bad("paths", "must list at least one path"));
        }
        if let Some(p) = self.paths.iter().find(|p| !p.starts_with('/')) {
            return Err(bad("paths", format!("`{p}` must start with '/'")));
        }
        if self
            .encode_cluster
            .as_deref()
            .is_some_and(|c| c.trim().is_empty())
        {
            return Err(bad(
                "encode_cluster",
                "must not be empty (omit it to disable encode routing)",
            ));
        }
        if self.encode_authority.is_empty() || self.encode_authority.contains(char::is_whitespace) {
            return Err(bad("encode_authority", "must be a host name"));
        }
        if !self.encode_path.starts_with('/') {
            return Err(bad("encode_path", "must start with '/'"));
        }
        if !(1..=600_000).contains(&self.encode_timeout_ms) {
            return Err(bad("encode_timeout_ms", "must be 1..=600000"));
        }
        if self.encode_retries > 10 {
            return Err(bad("encode_retries", "must be 0..=10"));
        }
        self.validate_prefill()?;
        self.validate_offload()?;
        self.validate_dynamic()?;
        Ok(self)
    }

    fn validate_prefill(&self) -> Result<(), ConfigError> {
        if self
            .prefill_cluster
            .as_deref()
            .is_some_and(|c| c.trim().is_empty())
        {
            return Err(bad(
                "prefill_cluster",
                "must not be empty (omit it when prefill and decode are one instance)",
            ));
        }
        if self.prefill_authority.is_empty() || self.prefill_authority.contains(char::is_whitespace) {
            return Err(bad("prefill_authority", "must be a host name"));
        }
        if !self.prefill_path.starts_with('/') {
            return Err(bad("prefill_path", "must start with '/'"));
        }
        if !(1..=600_000).contains(&self.prefill_timeout_ms) {
            return Err(bad("prefill_timeout_ms", "must be 1..=600000"));
        }
        if self.prefill_retries > 10 {
            return Err(bad("prefill_retries", "must be 0..=10"));
        }
        Ok(())
    }

    fn validate_offload(&self) -> Result<(), ConfigError> {
        match self.transcode_cluster.as_deref() {
            Some(c) if c.trim().is_empty() => {
                return Err(bad("transcode_cluster", "must not be empty"));
            }
            None if self.transcode == TranscodeMode::Offload => {
                return Err(bad(
                    "transcode_cluster",
                    "is required with transcode: \"offload\"",
                ));
            }
            _ => {}
        }
        if self.transcode_authority.is_empty() || self.transcode_authority.contains(char::is_whitespace) {
            return Err(bad("transcode_authority", "must be a host name"));
        }
        if !(1..=600_000).contains(&self.transcode_timeout_ms) {
            return Err(bad("transcode_timeout_ms", "must be 1..=600000"));
        }
        Ok(())
    }

    fn validate_dynamic(&self) -> Result<(), ConfigError> {
        let frac = |v: f64| v.is_finite() && v > 0.0 && v <= 1.0;
        if self.slo_min_ms == 0 || self.slo_min_ms > self.slo_max_ms {
            return Err(bad("slo_min_ms", "must be >= 1 and <= slo_max_ms"));
        }
        if !(self.slo_min_ms..=self.slo_max_ms).contains(&self.ttft_slo_ms) {
            return Err(bad("ttft_slo_ms", "must be within slo_min_ms..=slo_max_ms"));
        }
        if !frac(self.slo_headroom) {
            return Err(bad("slo_headroom", "must be in (0, 1]"));
        }
        if !frac(self.max_utilisation) {
            return Err(bad("max_utilisation", "must be in (0, 1]"));
        }
        if !(self.overhead_ms.is_finite() && self.overhead_ms >= 0.0) {
            return Err(bad("overhead_ms", "must be >= 0"));
        }
        if !(self.slo_percentile.is_finite() && (0.5..=0.9999).contains(&self.slo_percentile)) {
            return Err(bad("slo_percentile", "must be 0.5..=0.9999"));
        }
        if !(self.correction_window_s.is_finite() && (0.5..=3600.0).contains(&self.correction_window_s)) {
            return Err(bad("correction_window_s", "must be 0.5..=3600"));
        }
        if !(self.text_bytes_per_token.is_finite() && self.text_bytes_per_token >= 0.5) {
            return Err(bad("text_bytes_per_token", "must be >= 0.5"));
        }
        if !(self.rate_window_s.is_finite() && (0.1..=3600.0).contains(&self.rate_window_s)) {
            return Err(bad("rate_window_s", "must be 0.1..=3600"));
        }
        self.profile
            .encode_ms
            .validate()
            .map_err(|e| bad("profile.encode_ms", e.0))?;
        self.profile
            .prefill_ms
            .validate()
            .map_err(|e| bad("profile.prefill_ms", e.0))?;
        self.profile
            .kv_handoff_ms
            .validate()
            .map_err(|e| bad("profile.kv_handoff_ms", e.0))?;
        if !(1..=10_000).contains(&self.profile.encode_replicas) {
            return Err(bad("profile.encode_replicas", "must be 1..=10000"));
        }
        if !(1..=10_000).contains(&self.profile.pd_replicas) {
            return Err(bad("profile.pd_replicas", "must be 1..=10000"));
        }
        let t = self.profile.transcode_ms_per_mpixel;
        if !(t.is_finite() && (0.0..=10_000.0).contains(&t)) {
            return Err(bad("profile.transcode_ms_per_mpixel", "must be 0..=10000"));
        }
        if self
            .pd_metrics_cluster
            .as_deref()
            .is_some_and(|c| c.trim().is_empty())
        {
            return Err(bad(
                "pd_metrics_cluster",
                "must not be empty (omit it to poll only the encoders)",
            ));
        }
        if self.pd_metrics_authority.is_empty() || self.pd_metrics_authority.contains(char::is_whitespace) {
            return Err(bad("pd_metrics_authority", "must be a host name"));
        }
        let c = &self.calibration;
        if !(c.alpha.is_finite() && c.alpha > 0.0 && c.alpha <= 1.0) {
            return Err(bad("calibration.alpha", "must be in (0, 1]"));
        }
        if !(c.min_factor.is_finite() && c.min_factor > 0.0 && c.min_factor <= 1.0) {
            return Err(bad("calibration.min_factor", "must be in (0, 1]"));
        }
        if !(c.max_factor.is_finite() && c.max_factor >= 1.0 && c.max_factor <= 100.0) {
            return Err(bad("calibration.max_factor", "must be in [1, 100]"));
        }
        if self.metrics_poll_ms != 0 && !(100..=600_000).contains(&self.metrics_poll_ms) {
            return Err(bad("metrics_poll_ms", "must be 0 (off) or 100..=600000"));
        }
        if !self.metrics_path.starts_with('/') {
            return Err(bad("metrics_path", "must start with '/'"));
        }
        if self.metrics_stale_ms < self.metrics_poll_ms {
            return Err(bad("metrics_stale_ms", "must be >= metrics_poll_ms"));
        }
        Ok(())
    }

    /// The dynamic policy's parameters.
    pub fn dynamic_params(&self) -> DynamicParams {
        DynamicParams {
            encode: self.profile.encode_ms.clone(),
            prefill: self.profile.prefill_ms.clone(),
            encode_replicas: u32::try_from(self.profile.encode_replicas).unwrap_or(u32::MAX),
            pd_replicas: u32::try_from(self.profile.pd_replicas).unwrap_or(u32::MAX),
            slo_headroom: self.slo_headroom,
            max_utilisation: self.max_utilisation,
            min_tokens_per_image: self.min_tokens_per_image,
            text_bytes_per_token: self.text_bytes_per_token,
            fanout: self.encode_fanout,
            epd: self.encode_cluster.is_some(),
            transcode_prior_ms_per_mpixel: self.profile.transcode_ms_per_mpixel,
            handoff: self
                .prefill_cluster
                .is_some()
                .then(|| self.profile.kv_handoff_ms.clone()),
        }
    }

    /// How the learned TTFT margin is read.
    pub fn margin_rule(&self) -> MarginRule {
        MarginRule {
            percentile: self.slo_percentile,
            window_s: self.correction_window_s,
            min_samples: MARGIN_MIN_SAMPLES,
            prior_ms: self.overhead_ms,
        }
    }

    /// The SLO for a request: the `x-slo-ttft-ms` value within bounds, or
    /// the configured one (also for a value that does not parse).
    pub fn slo_for(&self, header: Option<&str>) -> f64 {
        let configured = self.ttft_slo_ms as f64;
        header
            .and_then(|h| h.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite())
            .map_or(configured, |v| {
                v.clamp(self.slo_min_ms as f64, self.slo_max_ms as f64)
            })
    }

    pub fn sizing_rule(&self) -> SizingRule {
        SizingRule {
            patch_size: self.sizing.patch_size,
            merge_size: self.sizing.merge_size,
            min_pixels: self.sizing.min_pixels,
            max_pixels: self.sizing.max_pixels,
        }
    }

    pub fn transcode_options(&self) -> TranscodeOptions {
        TranscodeOptions {
            // Validated to 1..=100.
            jpeg_quality: u8::try_from(self.jpeg_quality).unwrap_or(90),
            filter: self.resize_filter,
            max_pixels: self.max_image_pixels,
        }
    }

    /// Whether the filter acts on a request to `path` (query ignored).
    pub fn matches_path(&self, path: &str) -> bool {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        self.paths.iter().any(|p| p == path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> ConfigError {
        match Config::from_json(json.as_bytes()) {
            Err(e) => e,
            Ok(c) => panic!("accepted {json}: {c:?}"),
        }
    }

    #[test]
    fn empty_and_full_configs() {
        assert_eq!(Config::from_json(b""), Ok(Config::default()));
        let c = Config::from_json(
            br#"{"policy":"vanilla","static_budget_tokens":1024,"min_tokens_per_image":64,
                "max_image_pixels":1000000,"max_body_bytes":1048576,"max_images_per_request":4,
                "jpeg_quality":75,"resize_filter":"lanczos3","fail_open":true,"paths":["/a","/b"],
                "sizing":{"patch_size":14,"merge_size":2,"min_pixels":3136,"max_pixels":1003520}}"#,
        )
        .expect("valid");
        assert_eq!(c.policy, PolicyKind::Vanilla);
        assert_eq!(c.sizing_rule().max_tokens(), 1280);
        assert!(c.matches_path("/b?x=1") && !c.matches_path("/c"));
    }

    #[test]
    fn prefill_split_config() {
        let c = Config::from_json(
            br#"{"encode_cluster":"e","prefill_cluster":"p","prefill_authority":"pre","prefill_path":"/p",
                "prefill_timeout_ms":500,"prefill_retries":0,"prefill_failure":"fallback"}"#,
        )
        .expect("valid");
        assert_eq!(c.prefill_cluster.as_deref(), Some("p"));
        assert_eq!((c.prefill_timeout_ms, c.prefill_retries), (500, 0));
        assert_eq!(c.prefill_failure, PrefillFailure::Fallback);
        assert_eq!(c.dynamic_params().handoff, Some(KV_HANDOFF));
        assert_eq!(Config::default().dynamic_params().handoff, None);
        assert_eq!(
            err(r#"{"profile":{"kv_handoff_ms":{"a":-1,"b":0,"c":0}}}"#).field,
            "profile.kv_handoff_ms"
        );
        let d = Config::default();
        assert_eq!(
            (d.prefill_cluster, d.prefill_failure),
            (None, PrefillFailure::Fail)
        );
    }

    #[test]
    fn dynamic_config_and_slo_header() {
        let c = Config::from_json(
            br#"{"policy":"dynamic","ttft_slo_ms":800,"profile":{"encode_ms":{"table":[[0,10],[1000,40]]},
                "prefill_ms":{"a":1,"b":0.01,"c":0},"encode_replicas":2},"calibration":{"enabled":false}}"#,
        )
        .expect("valid");
        assert_eq!(c.policy, PolicyKind::Dynamic);
        assert_eq!(c.dynamic_params().encode_replicas, 2);
        assert_eq!(c.slo_for(None), 800.0);
        assert_eq!(c.slo_for(Some("1500")), 1500.0);
        assert_eq!(c.slo_for(Some("5")), 100.0);
        assert_eq!(c.slo_for(Some("1e9")), 60_000.0);
        assert_eq!(c.slo_for(Some("soon")), 800.0);
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(err(r#"{"polcy":"static"}"#).field, "polcy");
        assert!(err(r#"{"polcy":"static"}"#)
            .message
            .contains("unknown field `polcy`"));
        assert_eq!(err(r#"{"sizing":{"patch":1}}"#).field, "sizing.patch");
        assert_eq!(err(r#"{"jpeg_quality":"high"}"#).field, "jpeg_quality");
        assert_eq!(err(r#"{"jpeg_quality":101}"#).field, "jpeg_quality");
        assert_eq!(err(r#"{"policy":"fast"}"#).field, "policy");
        assert_eq!(
            err(r#"{"static_budget_tokens":100000}"#).field,
            "static_budget_tokens"
        );
        assert_eq!(
            err(r#"{"static_budget_tokens":100}"#).field,
            "static_budget_tokens"
        );
        assert_eq!(err(r#"{"paths":[]}"#).field, "paths");
        assert_eq!(err(r#"{"paths":["v1"]}"#).field, "paths");
        assert_eq!(err(r#"{"max_body_bytes":0}"#).field, "max_body_bytes");
        assert_eq!(err(r#"{"sizing":{"max_pixels":10}}"#).field, "sizing.max_pixels");
        assert_eq!(err(r#"not json"#).field, "(root)");
        assert_eq!(err(r#"{"encode_cluster":""}"#).field, "encode_cluster");
        assert_eq!(err(r#"{"encode_timeout_ms":0}"#).field, "encode_timeout_ms");
        assert_eq!(err(r#"{"encode_retries":11}"#).field, "encode_retries");
        assert_eq!(err(r#"{"transcode":"offload"}"#).field, "transcode_cluster");
        assert_eq!(err(r#"{"transcode":"elsewhere"}"#).field, "transcode");
        assert_eq!(err(r#"{"transcode_cluster":" "}"#).field, "transcode_cluster");
        assert_eq!(
            err(r#"{"transcode":"offload","transcode_cluster":"t","transcode_authority":"a b"}"#).field,
            "transcode_authority"
        );
        assert_eq!(
            err(r#"{"transcode":"offload","transcode_cluster":"t","transcode_timeout_ms":0}"#).field,
            "transcode_timeout_ms"
        );
        let offload = Config::from_json(br#"{"transcode":"offload","transcode_cluster":"t"}"#);
        assert!(
            offload.is_ok_and(|c| c.transcode == TranscodeMode::Offload && c.transcode_timeout_ms == 10_000)
        );
        assert_eq!(err(r#"{"encode_fanout":"all"}"#).field, "encode_fanout");
        assert_eq!(err(r#"{"encode_failure":"retry"}"#).field, "encode_failure");
        assert_eq!(err(r#"{"encode_path":"v1"}"#).field, "encode_path");
        assert_eq!(err(r#"{"prefill_cluster":" "}"#).field, "prefill_cluster");
        assert_eq!(err(r#"{"prefill_authority":"a b"}"#).field, "prefill_authority");
        assert_eq!(err(r#"{"prefill_path":"v1"}"#).field, "prefill_path");
        assert_eq!(err(r#"{"prefill_timeout_ms":0}"#).field, "prefill_timeout_ms");
        assert_eq!(err(r#"{"prefill_retries":11}"#).field, "prefill_retries");
        assert_eq!(err(r#"{"prefill_failure":"retry"}"#).field, "prefill_failure");
        assert_eq!(err(r#"{"slo_headroom":1.5}"#).field, "slo_headroom");
        assert_eq!(err(r#"{"ttft_slo_ms":10}"#).field, "ttft_slo_ms");
        assert_eq!(err(r#"{"max_utilisation":0}"#).field, "max_utilisation");
        assert_eq!(
            err(r#"{"profile":{"encode_ms":{"a":1,"b":0,"c":0}}}"#).field,
            "profile.encode_ms"
        );
        assert_eq!(
            err(r#"{"profile":{"prefill_ms":{"table":[[1,2]]}}}"#).field,
            "profile.prefill_ms"
        );
        assert_eq!(
            err(r#"{"profile":{"encode_replicas":0}}"#).field,
            "profile.encode_replicas"
        );
        assert_eq!(err(r#"{"profile":{"gpus":1}}"#).field, "profile.gpus");
        assert_eq!(err(r#"{"calibration":{"alpha":2}}"#).field, "calibration.alpha");
        assert_eq!(err(r#"{"metrics_poll_ms":5}"#).field, "metrics_poll_ms");
    }

    #[test]
    fn arrays_never_stand_for_sections() {
        // serde would fill a struct from an array by position, defaulting
        // the rest: `[]` must not load as every default.
        assert_eq!(err("[]").field, "(root)");
        assert_eq!(err(r#"["vanilla", 2048]"#).field, "(root)");
        assert_eq!(err(r#"{"calibration":[]}"#).field, "calibration");
        assert_eq!(err(r#"{"sizing":[14, 2]}"#).field, "sizing");
        assert_eq!(err(r#"{"profile":[]}"#).field, "profile");
        assert_eq!(
            err(r#"{"profile":{"encode_ms":[1, 0.1, 0]}}"#).field,
            "profile.encode_ms"
        );
        assert_eq!(
            err(r#"{"profile":{"prefill_ms":[1, 0.1, 0]}}"#).field,
            "profile.prefill_ms"
        );
        assert!(err(r#"{"calibration":[]}"#).message.contains("not an array"));
        // Arrays where arrays belong still load.
        assert!(
            Config::from_json(br#"{"paths":["/a"],"profile":{"encode_ms":{"table":[[0,1],[10,2]]}}}"#)
                .is_ok()
        );
    }
}
