//! Command-line flags.

use lexopt::prelude::*;
use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;

/// Which vLLM instance(s) the process stands in for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The encode-only instance (vision encoder, answers with one token).
    Encode,
    /// The prefill/decode instance.
    Pd,
    /// Both, on two ports, sharing the encoder cache in memory.
    Both,
    /// The prefill instance of a prefill/decode split: prefills requests
    /// that open vLLM's KV-transfer handshake and answers with the
    /// `kv_transfer_params` decode needs.
    Prefill,
    /// The decode instance of a split: takes a prefilled request's KV
    /// cache (refusing transfer ids it does not know), then decodes.
    Decode,
    /// Encode, prefill and decode on three ports, sharing the encoder cache
    /// and the KV transfers in memory.
    Split,
}

impl Role {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "encode" => Some(Self::Encode),
            "pd" => Some(Self::Pd),
            "both" => Some(Self::Both),
            "prefill" => Some(Self::Prefill),
            "decode" => Some(Self::Decode),
            "split" => Some(Self::Split),
            _ => None,
        }
    }

    pub fn has_encode(self) -> bool {
        matches!(self, Self::Encode | Self::Both | Self::Split)
    }

    /// Whether an instance listens on `--pd-port` (prefill/decode, or the
    /// decode instance of a split).
    pub fn has_pd(self) -> bool {
        matches!(self, Self::Pd | Self::Both | Self::Decode | Self::Split)
    }

    /// Whether the `--pd-port` instance is a split's decode instance.
    pub fn pd_is_decode(self) -> bool {
        matches!(self, Self::Decode | Self::Split)
    }

    pub fn has_prefill(self) -> bool {
        matches!(self, Self::Prefill | Self::Split)
    }
}

/// How the PD instance times output tokens after the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeModel {
    /// Decode steps are PD GPU work: each step serves every running request
    /// and costs `--decode-step-ms + --decode-step-ms-per-request x running`;
    /// a free GPU takes a waiting prefill before the next step.
    Queued,
    /// Every running request emits a token each `--decode-ms-per-token`,
    /// whatever else the GPU does.
    Free,
}

impl DecodeModel {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "queued" => Some(Self::Queued),
            "free" => Some(Self::Free),
            _ => None,
        }
    }
}

/// Value of [`Config::preprocess_ms_per_mpixel`] that leaves the per-role
/// rates in force.
pub const PER_ROLE_PREPROCESS: f64 = -1.0;

/// Everything the emulator is configured with.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub role: Role,
    pub host: String,
    pub encode_port: u16,
    pub pd_port: u16,
    /// Port of the prefill instance of a split.
    pub prefill_port: u16,
    /// Shared KV-transfer directory for prefill and decode in separate
    /// processes (one empty file per transfer id).
    pub kv_transfer_dir: Option<PathBuf>,
    /// KV-transfer time charged by decode per 1,000 prompt tokens.
    pub kv_transfer_ms_per_ktoken: f64,
    /// Served model name (`/v1/models`, the `model_name` metric label).
    pub model: String,
    /// Shared encoder-cache directory (one empty file per image hash).
    pub ec_cache_dir: Option<PathBuf>,
    /// Latency measurements to use instead of the built-in H100 data.
    pub latency_data: Option<PathBuf>,
    pub encoder_variant: String,
    pub speed_factor: f64,
    /// CPU preprocessing per megapixel on the encode instance.
    pub encode_preprocess_ms_per_mpixel: f64,
    /// CPU preprocessing per megapixel on the PD instance.
    pub pd_preprocess_ms_per_mpixel: f64,
    /// One preprocessing rate for both roles, replacing the two above when
    /// it is not negative ([`PER_ROLE_PREPROCESS`] by default). For callers
    /// that build a `Config` directly; the command line's
    /// `--preprocess-ms-per-mpixel` writes the two per-role rates instead.
    pub preprocess_ms_per_mpixel: f64,
    pub jitter_sigma: f64,
    pub seed: u64,
    pub encode_gpus: usize,
    pub pd_gpus: usize,
    pub max_num_batched_tokens: u64,
    pub decode_model: DecodeModel,
    /// Fixed cost of one decode step (queued model).
    pub decode_step_ms: f64,
    /// Cost of one decode step per running request (queued model).
    pub decode_step_ms_per_request: f64,
    /// Time between output tokens (free model).
    pub decode_ms_per_token: f64,
    pub default_output_tokens: u64,
    pub max_output_tokens: u64,
    pub time_scale: f64,
    /// The Qwen processor's pixel bounds (as vLLM's `--mm-processor-kwargs`).
    pub min_pixels: u64,
    pub max_pixels: u64,
    /// Largest decoded image accepted, in pixels.
    pub max_image_pixels: u64,
    pub max_body_bytes: usize,
    /// Entries kept by `GET /debug/requests` (oldest dropped first).
    pub debug_log_capacity: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            role: Role::Both,
            host: "127.0.0.1".into(),
            encode_port: 8100,
            pd_port: 8200,
            prefill_port: 8300,
            kv_transfer_dir: None,
            kv_transfer_ms_per_ktoken: 1.5,
            model: "Qwen/Qwen2.5-VL-3B-Instruct".into(),
            ec_cache_dir: None,
            latency_data: None,
            encoder_variant: "batched_sdpa".into(),
            speed_factor: 1.0,
            encode_preprocess_ms_per_mpixel: 28.0,
            pd_preprocess_ms_per_mpixel: 18.0,
            preprocess_ms_per_mpixel: PER_ROLE_PREPROCESS,
            jitter_sigma: 0.05,
            seed: 0,
            encode_gpus: 1,
            pd_gpus: 1,
            max_num_batched_tokens: 16_384,
            decode_model: DecodeModel::Queued,
            decode_step_ms: 6.0,
            decode_step_ms_per_request: 0.37,
            decode_ms_per_token: 8.0,
            default_output_tokens: 64,
            max_output_tokens: 512,
            time_scale: 1.0,
            min_pixels: 3_136,
            max_pixels: 12_845_056,
            // PIL refuses images above twice its decompression-bomb limit.
            max_image_pixels: 178_956_970,
            max_body_bytes: 256 << 20,
            debug_log_capacity: 100_000,
        }
    }
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Run(Box<Config>),
    Help,
    Version,
}

/// A command-line error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError(pub String);

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CliError {}

impl From<lexopt::Error> for CliError {
    fn from(e: lexopt::Error) -> Self {
        Self(e.to_string())
    }
}

pub const USAGE: &str = "\
vlm-emulator: an OpenAI-compatible stand-in for vLLM's disaggregated-encoder
deployment of Qwen2.5-VL-3B, timed from H100 measurements (not a GPU).

USAGE: vlm-emulator [FLAGS]

Roles and addresses:
  --role encode|pd|both|prefill|decode|split
                                   instance(s) to serve; split: encode,
                                   prefill and decode (on --pd-port) [both]
  --host ADDR                      listen address [127.0.0.1]
  --encode-port PORT               encode instance port, 0 = any free port [8100]
  --pd-port PORT                   prefill/decode instance port, 0 = any [8200]
  --prefill-port PORT              prefill instance port of a split [8300]
  --kv-transfer-dir DIR            shared KV-transfer directory (prefill and
                                   decode in separate processes)
  --kv-transfer-ms-per-ktoken MS   KV-transfer time at decode per 1,000
                                   prompt tokens [1.5]
  --model NAME                     served model name [Qwen/Qwen2.5-VL-3B-Instruct]
  --ec-cache-dir DIR               shared encoder-cache directory (separate
                                   processes); default: in-process map

Time model:
  --latency-data PATH              measurements JSON [built-in H100 data]
  --encoder-variant NAME           vision_encoder table [batched_sdpa]
  --speed-factor F                 multiplies GPU times [1.0]
  --encode-preprocess-ms-per-mpixel MS
                                   encode instance CPU preprocessing per
                                   megapixel [28.0]
  --pd-preprocess-ms-per-mpixel MS PD instance CPU preprocessing per
                                   megapixel [18.0]
  --preprocess-ms-per-mpixel MS    sets both of the above (compatibility)
  --jitter-sigma S                 log-normal jitter of GPU times [0.05]
  --seed N                         seed of jitter and generated text [0]
  --encode-gpus N                  encode instance GPUs [1]
  --pd-gpus N                      prefill/decode instance GPUs [1]
  --max-num-batched-tokens N       encoder batch token budget [16384]
  --decode-model queued|free       queued: decode steps are PD GPU work,
                                   prefills first; free: a token every
                                   --decode-ms-per-token, not queued [queued]
  --decode-step-ms MS              fixed cost of a decode step [6.0]
  --decode-step-ms-per-request MS  decode step cost per running request [0.37]
  --decode-ms-per-token MS         time per output token, free model [8.0]
  --default-output-tokens N        output length without max_tokens [64]
  --max-output-tokens N            output length cap [512]
  --time-scale F                   multiplies every sleep (tests) [1.0]

Images:
  --min-pixels N                   Qwen processor min_pixels [3136]
  --max-pixels N                   Qwen processor max_pixels [12845056]
  --max-image-pixels N             largest decoded image [178956970]
  --max-body-bytes N               largest request body [268435456]

Other:
  --debug-log-capacity N           requests kept for /debug/requests [100000]
  -h, --help                       this text
  -V, --version                    version
";

fn num<T: std::str::FromStr>(flag: &str, v: OsString) -> Result<T, CliError> {
    let s = v
        .into_string()
        .map_err(|_| CliError(format!("{flag}: value is not valid UTF-8")))?;
    s.parse()
        .map_err(|_| CliError(format!("{flag}: invalid value `{s}`")))
}

fn text(flag: &str, v: OsString) -> Result<String, CliError> {
    v.into_string()
        .map_err(|_| CliError(format!("{flag}: value is not valid UTF-8")))
}

/// Parses flags (without the program name).
pub fn parse<I>(args: I) -> Result<Command, CliError>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    let mut c = Config::default();
    let mut p = lexopt::Parser::from_args(args);
    while let Some(arg) = p.next()? {
        let flag = match &arg {
            Short('h') | Long("help") => return Ok(Command::Help),
            Short('V') | Long("version") => return Ok(Command::Version),
            Long(name) => format!("--{name}"),
            _ => return Err(arg.unexpected().into()),
        };
        let value = p.value()?;
        match flag.as_str() {
            "--role" => {
                let s = text(&flag, value)?;
                c.role = Role::parse(&s)
                    .ok_or_else(|| CliError(format!("--role: expected encode, pd or both, not `{s}`")))?;
            }
            "--host" => c.host = text(&flag, value)?,
            "--encode-port" => c.encode_port = num(&flag, value)?,
            "--pd-port" => c.pd_port = num(&flag, value)?,
            "--prefill-port" => c.prefill_port = num(&flag, value)?,
            "--kv-transfer-dir" => c.kv_transfer_dir = Some(PathBuf::from(value)),
            "--kv-transfer-ms-per-ktoken" => c.kv_transfer_ms_per_ktoken = num(&flag, value)?,
            "--model" => c.model = text(&flag, value)?,
            "--ec-cache-dir" => c.ec_cache_dir = Some(PathBuf::from(value)),
            "--latency-data" => c.latency_data = Some(PathBuf::from(value)),
            "--encoder-variant" => c.encoder_variant = text(&flag, value)?,
            "--speed-factor" => c.speed_factor = num(&flag, value)?,
            "--encode-preprocess-ms-per-mpixel" => c.encode_preprocess_ms_per_mpixel = num(&flag, value)?,
            "--pd-preprocess-ms-per-mpixel" => c.pd_preprocess_ms_per_mpixel = num(&flag, value)?,
            "--preprocess-ms-per-mpixel" => {
                let ms = num(&flag, value)?;
                c.encode_preprocess_ms_per_mpixel = ms;
                c.pd_preprocess_ms_per_mpixel = ms;
            }
            "--jitter-sigma" => c.jitter_sigma = num(&flag, value)?,
            "--seed" => c.seed = num(&flag, value)?,
            "--encode-gpus" => c.encode_gpus = num(&flag, value)?,
            "--pd-gpus" => c.pd_gpus = num(&flag, value)?,
            "--max-num-batched-tokens" => c.max_num_batched_tokens = num(&flag, value)?,
            "--decode-model" => {
                let s = text(&flag, value)?;
                c.decode_model = DecodeModel::parse(&s)
                    .ok_or_else(|| CliError(format!("--decode-model: expected queued or free, not `{s}`")))?;
            }
            "--decode-step-ms" => c.decode_step_ms = num(&flag, value)?,
            "--decode-step-ms-per-request" => c.decode_step_ms_per_request = num(&flag, value)?,
            "--decode-ms-per-token" => c.decode_ms_per_token = num(&flag, value)?,
            "--default-output-tokens" => c.default_output_tokens = num(&flag, value)?,
            "--max-output-tokens" => c.max_output_tokens = num(&flag, value)?,
            "--time-scale" => c.time_scale = num(&flag, value)?,
            "--min-pixels" => c.min_pixels = num(&flag, value)?,
            "--max-pixels" => c.max_pixels = num(&flag, value)?,
            "--max-image-pixels" => c.max_image_pixels = num(&flag, value)?,
            "--max-body-bytes" => c.max_body_bytes = num(&flag, value)?,
            "--debug-log-capacity" => c.debug_log_capacity = num(&flag, value)?,
            _ => return Err(CliError(format!("unknown flag {flag} (see --help)"))),
        }
    }
    c.validate()?;
    Ok(Command::Run(Box::new(c)))
}

impl Config {
    /// CPU preprocessing per megapixel of the (encode, PD) instances.
    pub fn preprocess_rates(&self) -> (f64, f64) {
        match self.preprocess_ms_per_mpixel {
            ms if ms >= 0.0 => (ms, ms),
            _ => (
                self.encode_preprocess_ms_per_mpixel,
                self.pd_preprocess_ms_per_mpixel,
            ),
        }
    }

    /// Checks ranges the time model and the servers rely on.
    pub fn validate(&self) -> Result<(), CliError> {
        let positive = [
            ("--speed-factor", self.speed_factor),
            ("--time-scale", self.time_scale),
        ];
        for (flag, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return Err(CliError(format!("{flag} must be a positive number")));
            }
        }
        let non_negative = [
            (
                "--encode-preprocess-ms-per-mpixel",
                self.encode_preprocess_ms_per_mpixel,
            ),
            ("--pd-preprocess-ms-per-mpixel", self.pd_preprocess_ms_per_mpixel),
            ("--jitter-sigma", self.jitter_sigma),
            ("--decode-step-ms", self.decode_step_ms),
            ("--decode-step-ms-per-request", self.decode_step_ms_per_request),
            ("--decode-ms-per-token", self.decode_ms_per_token),
            ("--kv-transfer-ms-per-ktoken", self.kv_transfer_ms_per_ktoken),
        ];
        for (flag, v) in non_negative {
            if !(v.is_finite() && v >= 0.0) {
                return Err(CliError(format!("{flag} must be a non-negative number")));
            }
        }
        if !self.preprocess_ms_per_mpixel.is_finite() {
            return Err(CliError("--preprocess-ms-per-mpixel must be a number".into()));
        }
        let at_least_one = [
            ("--encode-gpus", self.encode_gpus as u64),
            ("--pd-gpus", self.pd_gpus as u64),
            ("--max-num-batched-tokens", self.max_num_batched_tokens),
            ("--default-output-tokens", self.default_output_tokens),
            ("--max-output-tokens", self.max_output_tokens),
            ("--max-image-pixels", self.max_image_pixels),
            ("--debug-log-capacity", self.debug_log_capacity as u64),
        ];
        for (flag, v) in at_least_one {
            if v == 0 {
                return Err(CliError(format!("{flag} must be at least 1")));
            }
        }
        if self.encode_gpus > 1024 || self.pd_gpus > 1024 {
            return Err(CliError("at most 1024 GPUs per role".into()));
        }
        if self.min_pixels == 0 || self.min_pixels > self.max_pixels {
            return Err(CliError(
                "--min-pixels must be positive and at most --max-pixels".into(),
            ));
        }
        if self.role == Role::Both && self.encode_port == self.pd_port && self.encode_port != 0 {
            return Err(CliError("--encode-port and --pd-port must differ".into()));
        }
        if self.role == Role::Split {
            let ports = [self.encode_port, self.prefill_port, self.pd_port];
            let clash = ports
                .iter()
                .enumerate()
                .any(|(i, p)| *p != 0 && ports[..i].contains(p));
            if clash {
                return Err(CliError(
                    "--encode-port, --prefill-port and --pd-port must differ".into(),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Config, CliError> {
        match parse(args.iter().copied())? {
            Command::Run(c) => Ok(*c),
            other => Err(CliError(format!("{other:?}"))),
        }
    }

    #[test]
    fn defaults_match_the_documentation() {
        let c = run(&[]).expect("defaults");
        assert_eq!(c, Config::default());
        assert_eq!((c.role, c.encode_port, c.pd_port), (Role::Both, 8100, 8200));
        assert_eq!(c.encoder_variant, "batched_sdpa");
        assert_eq!(c.max_num_batched_tokens, 16_384);
        // The rates measured on the GPUs (bench/results/gpu/README.md).
        assert_eq!(
            (c.encode_preprocess_ms_per_mpixel, c.pd_preprocess_ms_per_mpixel),
            (28.0, 18.0)
        );
        assert_eq!(c.preprocess_rates(), (28.0, 18.0));
        assert_eq!(c.decode_model, DecodeModel::Queued);
        assert_eq!((c.decode_step_ms, c.decode_step_ms_per_request), (6.0, 0.37));
        assert_eq!(c.decode_ms_per_token, 8.0);
        // The usage text states the same defaults.
        for text in [
            "--encode-preprocess-ms-per-mpixel MS",
            "megapixel [28.0]",
            "--pd-preprocess-ms-per-mpixel MS PD instance CPU preprocessing per",
            "megapixel [18.0]",
            "--preprocess-ms-per-mpixel MS    sets both of the above",
            "--decode-ms-per-token, not queued [queued]",
            "--decode-step-ms MS              fixed cost of a decode step [6.0]",
            "--decode-step-ms-per-request MS  decode step cost per running request [0.37]",
            "--decode-ms-per-token MS         time per output token, free model [8.0]",
        ] {
            assert!(USAGE.contains(text), "{text}");
        }
    }

    #[test]
    fn the_compatibility_flags_give_the_old_time_model() {
        // `--preprocess-ms-per-mpixel` sets both roles ...
        let c = run(&["--decode-model", "free", "--preprocess-ms-per-mpixel", "4"]).expect("flags");
        assert_eq!(c.decode_model, DecodeModel::Free);
        assert_eq!(c.preprocess_rates(), (4.0, 4.0));
        assert_eq!(
            c,
            Config {
                decode_model: DecodeModel::Free,
                encode_preprocess_ms_per_mpixel: 4.0,
                pd_preprocess_ms_per_mpixel: 4.0,
                ..Config::default()
            }
        );
        // ... and a per-role flag after it overrides one of them.
        let c = run(&[
            "--preprocess-ms-per-mpixel",
            "4",
            "--pd-preprocess-ms-per-mpixel",
            "9",
        ])
        .expect("flags");
        assert_eq!(c.preprocess_rates(), (4.0, 9.0));
        let c = run(&[
            "--pd-preprocess-ms-per-mpixel",
            "9",
            "--preprocess-ms-per-mpixel",
            "0",
        ])
        .expect("flags");
        assert_eq!(c.preprocess_rates(), (0.0, 0.0));
        // A `Config` built directly may set the shared rate.
        let c = Config {
            preprocess_ms_per_mpixel: 0.0,
            ..Config::default()
        };
        assert!(c.validate().is_ok());
        assert_eq!(c.preprocess_rates(), (0.0, 0.0));
    }

    #[test]
    fn parses_every_flag() {
        let c = run(&[
            "--role=pd",
            "--host",
            "0.0.0.0",
            "--encode-port",
            "1",
            "--pd-port",
            "2",
            "--ec-cache-dir",
            "/tmp/ec",
            "--encoder-variant",
            "varlen",
            "--speed-factor",
            "0.5",
            "--encode-preprocess-ms-per-mpixel",
            "30",
            "--pd-preprocess-ms-per-mpixel",
            "0",
            "--jitter-sigma",
            "0",
            "--seed",
            "9",
            "--encode-gpus",
            "2",
            "--pd-gpus",
            "3",
            "--max-num-batched-tokens",
            "4096",
            "--decode-ms-per-token",
            "4.5",
            "--decode-model",
            "free",
            "--decode-step-ms",
            "7",
            "--decode-step-ms-per-request",
            "0.5",
            "--default-output-tokens",
            "10",
            "--max-output-tokens",
            "20",
            "--time-scale",
            "0.1",
            "--max-pixels",
            "1003520",
        ])
        .expect("flags");
        assert_eq!(c.role, Role::Pd);
        assert_eq!(c.ec_cache_dir, Some(PathBuf::from("/tmp/ec")));
        assert_eq!((c.encode_gpus, c.pd_gpus, c.seed), (2, 3, 9));
        assert_eq!((c.time_scale, c.decode_ms_per_token), (0.1, 4.5));
        assert_eq!(c.max_pixels, 1_003_520);
        assert_eq!(c.preprocess_rates(), (30.0, 0.0));
        assert_eq!(c.decode_model, DecodeModel::Free);
        assert_eq!((c.decode_step_ms, c.decode_step_ms_per_request), (7.0, 0.5));
    }

    #[test]
    fn rejects_bad_values() {
        for args in [
            &["--role", "prefilling"][..],
            &["--role", "split", "--prefill-port", "8100"],
            &["--kv-transfer-ms-per-ktoken", "-1"],
            &["--time-scale", "0"],
            &["--speed-factor", "-1"],
            &["--jitter-sigma", "nan"],
            &["--decode-model", "batched"],
            &["--decode-step-ms", "-1"],
            &["--decode-step-ms-per-request", "inf"],
            &["--encode-preprocess-ms-per-mpixel", "-2"],
            &["--pd-preprocess-ms-per-mpixel", "nan"],
            &["--preprocess-ms-per-mpixel", "-4"],
            &["--encode-gpus", "0"],
            &["--pd-port", "70000"],
            &["--bogus", "1"],
            &["stray"],
            &["--seed"],
            &["--encode-port", "9000", "--pd-port", "9000"],
        ] {
            assert!(run(args).is_err(), "{args:?}");
        }
        assert_eq!(parse(["--help"]), Ok(Command::Help));
        assert_eq!(parse(["-V"]), Ok(Command::Version));
    }
}
