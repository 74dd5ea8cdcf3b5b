//! Request traces: seeded bursty arrivals and user traces in JSONL.
//!
//! A generated trace is a non-homogeneous Poisson process whose rate follows a
//! trapezoid: it ramps linearly from `base_rps` to `peak_rps` over `ramp_s`,
//! holds the peak for `hold_s`, and decays linearly back to `base_rps` over
//! `decay_s`. Arrivals are drawn by thinning (Lewis–Shedler): candidate
//! arrivals of a homogeneous process at the peak rate, each kept with
//! probability rate(t)/peak. Every request carries one image.
//!
//! A trace file has one JSON object per line:
//! `{"arrival_s": 0.52, "images": ["a.jpg"], "prompt": "Describe the image.", "max_tokens": 64}`
//! (`t` is accepted for `arrival_s`, `max_output_tokens` for `max_tokens`; an
//! optional `id` is kept for reference). Relative image paths are resolved
//! against the trace file's folder. Blank lines are skipped.

use crate::error::{BenchError, Result};
use crate::rng::Rng;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The rate profile of a generated trace.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Shape {
    /// Rate at the start and the end, requests/s.
    pub base_rps: f64,
    /// Rate while holding, requests/s.
    pub peak_rps: f64,
    pub ramp_s: f64,
    pub hold_s: f64,
    pub decay_s: f64,
}

impl Shape {
    /// Checks that every field is finite and sensible.
    pub fn validate(&self) -> Result<()> {
        let all = [
            self.base_rps,
            self.peak_rps,
            self.ramp_s,
            self.hold_s,
            self.decay_s,
        ];
        if all.iter().any(|v| !v.is_finite() || *v < 0.0) {
            return Err(BenchError::Usage(
                "trace shape: rates and durations must be finite and >= 0".into(),
            ));
        }
        if self.peak_rps <= 0.0 {
            return Err(BenchError::Usage("trace shape: the peak rate must be > 0".into()));
        }
        if self.base_rps > self.peak_rps {
            return Err(BenchError::Usage(
                "trace shape: the base rate must not exceed the peak".into(),
            ));
        }
        if self.duration_s() <= 0.0 {
            return Err(BenchError::Usage("trace shape: the trace must last > 0 s".into()));
        }
        Ok(())
    }

    pub fn duration_s(&self) -> f64 {
        self.ramp_s + self.hold_s + self.decay_s
    }

    /// The intended rate at time `t` (0 outside the trace).
    pub fn rate(&self, t: f64) -> f64 {
        let span = self.peak_rps - self.base_rps;
        if !(0.0..self.duration_s()).contains(&t) {
            0.0
        } else if t < self.ramp_s {
            self.base_rps + span * t / self.ramp_s
        } else if t < self.ramp_s + self.hold_s {
            self.peak_rps
        } else {
            let into = t - self.ramp_s - self.hold_s;
            self.peak_rps - span * into / self.decay_s
        }
    }

    /// Expected number of arrivals in [0, t]: the integral of the rate.
    pub fn cumulative(&self, t: f64) -> f64 {
        let span = self.peak_rps - self.base_rps;
        let t = t.clamp(0.0, self.duration_s());
        let ramp_t = t.min(self.ramp_s);
        let mut n = if self.ramp_s > 0.0 {
            self.base_rps * ramp_t + span * ramp_t * ramp_t / (2.0 * self.ramp_s)
        } else {
            0.0
        };
        let hold_t = (t - self.ramp_s).clamp(0.0, self.hold_s);
        n += self.peak_rps * hold_t;
        let decay_t = (t - self.ramp_s - self.hold_s).clamp(0.0, self.decay_s);
        if self.decay_s > 0.0 {
            n += self.peak_rps * decay_t - span * decay_t * decay_t / (2.0 * self.decay_s);
        }
        n
    }

    /// Expected arrivals in `[t0, t1)`.
    pub fn expected(&self, t0: f64, t1: f64) -> f64 {
        self.cumulative(t1) - self.cumulative(t0)
    }

    /// One line for reports: "1→10 req/s: ramp 10 s, hold 30 s, decay 10 s".
    pub fn describe(&self) -> String {
        format!(
            "Poisson, rate {}→{} req/s: ramp {} s, hold {} s, decay {} s",
            fmt_num(self.base_rps),
            fmt_num(self.peak_rps),
            fmt_num(self.ramp_s),
            fmt_num(self.hold_s),
            fmt_num(self.decay_s)
        )
    }
}

fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

/// Arrival times (s, increasing) of one seeded draw of the process.
pub fn arrivals(shape: &Shape, seed: u64) -> Result<Vec<f64>> {
    shape.validate()?;
    let mut rng = Rng::new(seed);
    let (top, end) = (shape.peak_rps, shape.duration_s());
    let mut out = Vec::new();
    let mut t = 0.0;
    loop {
        t += rng.exp(top);
        if t >= end {
            return Ok(out);
        }
        // Thinning: keep the candidate with probability rate(t) / top.
        if rng.unit() * top < shape.rate(t) {
            out.push(t);
        }
    }
}

/// One request of a trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Seconds from the start of the trace.
    #[serde(alias = "t")]
    pub arrival_s: f64,
    /// Image files sent as data URLs, in order.
    #[serde(default)]
    pub images: Vec<PathBuf>,
    pub prompt: String,
    #[serde(alias = "max_output_tokens")]
    pub max_tokens: u64,
}

/// A trace: its name (shared by the seeds of one generated shape, used in
/// reports), its seed and its requests.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    pub name: String,
    /// The seed of a generated trace's arrivals and images.
    pub seed: Option<u64>,
    /// The generating shape, for generated traces.
    pub shape: Option<Shape>,
    pub requests: Vec<TraceRequest>,
}

impl Trace {
    /// The name with the seed, unique per trace: `peak-4-seed-1`, or the name
    /// alone without a seed (file names, log tags).
    pub fn label(&self) -> String {
        match self.seed {
            Some(s) => format!("{}-seed-{s}", self.name),
            None => self.name.clone(),
        }
    }
}

/// Requests at the given arrivals, each with the next image from `images`.
pub fn with_images(
    arrivals: &[f64],
    images: &mut dyn Iterator<Item = PathBuf>,
    prompt: &str,
    max_tokens: u64,
) -> Result<Vec<TraceRequest>> {
    arrivals
        .iter()
        .map(|&t| {
            let img = images
                .next()
                .ok_or_else(|| BenchError::Usage("no images to assign to the trace".into()))?;
            Ok(TraceRequest {
                id: None,
                arrival_s: t,
                images: vec![img],
                prompt: prompt.to_string(),
                max_tokens,
            })
        })
        .collect()
}

/// Parses a JSONL trace. `base` resolves relative image paths. Requests are
/// returned sorted by arrival (stable for equal times).
pub fn parse_jsonl(text: &str, path: &Path, base: &Path) -> Result<Vec<TraceRequest>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let err = |message: String| BenchError::Trace {
            path: path.to_path_buf(),
            line: line_no,
            message,
        };
        if line.trim().is_empty() {
            continue;
        }
        let mut r: TraceRequest = serde_json::from_str(line).map_err(|e| err(e.to_string()))?;
        if !r.arrival_s.is_finite() || r.arrival_s < 0.0 {
            return Err(err("arrival_s must be a finite number >= 0".into()));
        }
        if r.max_tokens == 0 {
            return Err(err("max_tokens must be >= 1".into()));
        }
        for img in &mut r.images {
            if img.as_os_str().is_empty() {
                return Err(err("an image path is empty".into()));
            }
            if img.is_relative() {
                *img = base.join(&*img);
            }
        }
        out.push(r);
    }
    if out.is_empty() {
        return Err(BenchError::Trace {
            path: path.to_path_buf(),
            line: 0,
            message: "no requests".into(),
        });
    }
    out.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
    Ok(out)
}

/// Reads a JSONL trace file.
pub fn read_jsonl(path: &Path) -> Result<Vec<TraceRequest>> {
    let text = std::fs::read_to_string(path).map_err(|e| BenchError::io(path, e))?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse_jsonl(&text, path, base)
}

/// Writes a trace as JSONL.
pub fn write_jsonl(path: &Path, requests: &[TraceRequest]) -> Result<()> {
    let mut out = Vec::new();
    for r in requests {
        serde_json::to_writer(&mut out, r).map_err(|e| BenchError::json("trace", e))?;
        out.push(b'\n');
    }
    let mut f = std::fs::File::create(path).map_err(|e| BenchError::io(path, e))?;
    f.write_all(&out).map_err(|e| BenchError::io(path, e))
}

/// Counts, duration and rates of a trace.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceSummary {
    pub requests: usize,
    pub images: usize,
    pub duration_s: f64,
    pub mean_rps: f64,
    /// Largest number of arrivals in any 1-second window starting at an arrival.
    pub peak_1s: usize,
}

pub fn summarise(requests: &[TraceRequest]) -> TraceSummary {
    let times: Vec<f64> = requests.iter().map(|r| r.arrival_s).collect();
    let duration_s = times.last().copied().unwrap_or(0.0);
    let mut peak_1s = 0;
    let mut j = 0;
    for i in 0..times.len() {
        while j < times.len() && times[j] < times[i] + 1.0 {
            j += 1;
        }
        peak_1s = peak_1s.max(j - i);
    }
    TraceSummary {
        requests: requests.len(),
        images: requests.iter().map(|r| r.images.len()).sum(),
        duration_s,
        mean_rps: if duration_s > 0.0 {
            requests.len() as f64 / duration_s
        } else {
            0.0
        },
        peak_1s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(peak: f64) -> Shape {
        Shape {
            base_rps: 1.0,
            peak_rps: peak,
            ramp_s: 15.0,
            hold_s: 30.0,
            decay_s: 15.0,
        }
    }

    #[test]
    fn rate_ramps_holds_and_decays() {
        let s = shape(10.0);
        assert_eq!(s.rate(-0.1), 0.0);
        assert_eq!(s.rate(0.0), 1.0);
        assert!((s.rate(7.5) - 5.5).abs() < 1e-12);
        assert_eq!(s.rate(15.0), 10.0);
        assert_eq!(s.rate(44.9), 10.0);
        assert!((s.rate(52.5) - 5.5).abs() < 1e-12);
        assert_eq!(s.rate(60.0), 0.0);
        // The integral: 1*60 + 9*(7.5 + 30 + 7.5).
        assert!((s.cumulative(60.0) - 465.0).abs() < 1e-9);
        assert!((s.expected(15.0, 45.0) - 300.0).abs() < 1e-9);
        assert!((s.cumulative(7.5) - (7.5 + 9.0 * 7.5 * 7.5 / 30.0)).abs() < 1e-9);
        // Numeric integration agrees with the closed form everywhere.
        let mut acc = 0.0;
        let dt = 1e-3;
        for k in 0..60_000 {
            let t = (k as f64 + 0.5) * dt;
            acc += s.rate(t) * dt;
            if k % 5_000 == 4_999 {
                assert!((acc - s.cumulative(t + dt / 2.0)).abs() < 1e-6, "{t}");
            }
        }
    }

    #[test]
    fn generation_is_seeded() {
        let s = shape(7.0);
        let a = arrivals(&s, 42).unwrap();
        assert_eq!(a, arrivals(&s, 42).unwrap());
        assert_ne!(a, arrivals(&s, 43).unwrap());
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert!(a.iter().all(|&t| (0.0..60.0).contains(&t)));
    }

    /// Counts per window match the intended rate: over many seeds, each
    /// window's count has the Poisson mean and variance of the integral.
    #[test]
    fn counts_per_window_follow_the_shape() {
        let s = shape(10.0);
        let windows: Vec<(f64, f64)> = (0..12).map(|k| (k as f64 * 5.0, k as f64 * 5.0 + 5.0)).collect();
        let seeds = 400;
        let mut sums = vec![0.0; windows.len()];
        let mut sq = vec![0.0; windows.len()];
        for seed in 0..seeds {
            let a = arrivals(&s, seed).unwrap();
            for (w, &(t0, t1)) in windows.iter().enumerate() {
                let c = a.iter().filter(|&&t| t >= t0 && t < t1).count() as f64;
                sums[w] += c;
                sq[w] += c * c;
            }
        }
        for (w, &(t0, t1)) in windows.iter().enumerate() {
            let expect = s.expected(t0, t1);
            let mean = sums[w] / seeds as f64;
            let var = sq[w] / seeds as f64 - mean * mean;
            // Standard error of the mean of `seeds` Poisson counts.
            let se = (expect / seeds as f64).sqrt();
            assert!(
                (mean - expect).abs() < 4.0 * se,
                "window {t0}-{t1}: mean {mean}, expected {expect}"
            );
            // Poisson: variance equals the mean (within sampling error).
            assert!(
                (var / expect - 1.0).abs() < 0.25,
                "window {t0}-{t1}: var {var}, mean {expect}"
            );
        }
        // A single trace: the hold's count is within 4 sigma of 300.
        let one = arrivals(&s, 7).unwrap();
        let hold = one.iter().filter(|&&t| (15.0..45.0).contains(&t)).count() as f64;
        assert!((hold - 300.0).abs() < 4.0 * 300f64.sqrt(), "{hold}");
    }

    #[test]
    fn flat_shape_is_homogeneous() {
        let s = Shape {
            base_rps: 4.0,
            peak_rps: 4.0,
            ramp_s: 0.0,
            hold_s: 100.0,
            decay_s: 0.0,
        };
        assert_eq!(s.cumulative(100.0), 400.0);
        let n = arrivals(&s, 1).unwrap().len() as f64;
        assert!((n - 400.0).abs() < 4.0 * 20.0, "{n}");
    }

    #[test]
    fn bad_shapes_are_refused() {
        let mut s = shape(4.0);
        s.base_rps = 5.0;
        assert!(s.validate().is_err());
        let z = Shape {
            base_rps: 0.0,
            peak_rps: 0.0,
            ramp_s: 1.0,
            hold_s: 1.0,
            decay_s: 1.0,
        };
        assert!(arrivals(&z, 1).is_err());
        let nan = Shape {
            hold_s: f64::NAN,
            ..shape(4.0)
        };
        assert!(nan.validate().is_err());
        let empty = Shape {
            ramp_s: 0.0,
            hold_s: 0.0,
            decay_s: 0.0,
            ..shape(4.0)
        };
        assert!(empty.validate().is_err());
    }

    #[test]
    fn jsonl_round_trip_and_relative_paths() {
        let text = concat!(
            "{\"arrival_s\": 1.5, \"images\": [\"a.jpg\", \"/abs/b.png\"], \"prompt\": \"two\", \"max_tokens\": 8}\n",
            "\n",
            "{\"t\": 0.25, \"prompt\": \"text only\", \"max_output_tokens\": 3, \"id\": \"x1\"}\n",
        );
        let reqs = parse_jsonl(text, Path::new("t.jsonl"), Path::new("/data")).unwrap();
        assert_eq!(reqs.len(), 2);
        // Sorted by arrival.
        assert_eq!(reqs[0].arrival_s, 0.25);
        assert_eq!(reqs[0].id.as_deref(), Some("x1"));
        assert!(reqs[0].images.is_empty());
        assert_eq!(reqs[0].max_tokens, 3);
        assert_eq!(
            reqs[1].images,
            vec![PathBuf::from("/data/a.jpg"), PathBuf::from("/abs/b.png")]
        );

        let dir = std::env::temp_dir().join(format!("vlm-bench-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("t.jsonl");
        write_jsonl(&file, &reqs).unwrap();
        assert_eq!(read_jsonl(&file).unwrap(), reqs);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn jsonl_errors_name_the_line() {
        let cases = [
            ("{\"arrival_s\": 1, \"prompt\": \"p\", \"max_tokens\": 1}\n{\"arrival_s\": -1, \"prompt\": \"p\", \"max_tokens\": 1}", 2, "arrival_s"),
            ("{\"arrival_s\": 1, \"prompt\": \"p\", \"max_tokens\": 0}", 1, "max_tokens"),
            ("{\"arrival_s\": 1, \"prompt\": \"p\", \"max_tokens\": 4, \"imgs\": []}", 1, "unknown field"),
            ("{\"arrival_s\": 1, \"max_tokens\": 4}", 1, "prompt"),
            ("not json", 1, "expected"),
            ("{\"arrival_s\": 1, \"images\": [\"\"], \"prompt\": \"p\", \"max_tokens\": 1}", 1, "empty"),
        ];
        for (text, line, needle) in cases {
            match parse_jsonl(text, Path::new("t.jsonl"), Path::new(".")) {
                Err(BenchError::Trace { line: l, message, .. }) => {
                    assert_eq!(l, line, "{text}");
                    assert!(message.contains(needle), "{message} lacks {needle}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(parse_jsonl("\n\n", Path::new("t"), Path::new(".")).is_err());
    }

    #[test]
    fn summary_counts_peak_second() {
        let mk = |t: f64| TraceRequest {
            id: None,
            arrival_s: t,
            images: vec![],
            prompt: "p".into(),
            max_tokens: 1,
        };
        let reqs: Vec<_> = [0.0, 0.5, 0.9, 1.0, 3.0].into_iter().map(mk).collect();
        let s = summarise(&reqs);
        assert_eq!(s.requests, 5);
        assert_eq!(s.peak_1s, 3);
        assert_eq!(s.duration_s, 3.0);
    }

    #[test]
    fn images_are_assigned_in_order() {
        let mut it = vec![PathBuf::from("a"), PathBuf::from("b")].into_iter();
        let r = with_images(&[0.1, 0.2], &mut it, "p", 5).unwrap();
        assert_eq!(r[1].images, vec![PathBuf::from("b")]);
        let mut it = std::iter::empty();
        assert!(with_images(&[0.1], &mut it, "p", 5).is_err());
    }
}
