//! A strict parser of the Prometheus text exposition format (0.0.4), for tests.

#![allow(dead_code)]

use std::collections::BTreeMap;

/// Labels of a series without `le`, in order.
type SeriesKey = Vec<(String, String)>;
/// Parsed exposition: family -> type, and the samples in order.
pub type Parsed = (BTreeMap<String, String>, Vec<Sample>);

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The family (TYPE line) the sample belongs to.
    pub family: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse::<f64>().map_err(|e| format!("value `{s}`: {e}")),
    }
}

fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (name, after) = rest
            .split_once("=\"")
            .ok_or(format!("label without =\": {rest}"))?;
        if !is_label_name(name) {
            return Err(format!("bad label name `{name}`"));
        }
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?}")),
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                '\n' => return Err("raw newline in label value".into()),
                c => value.push(c),
            }
        }
        let end = end.ok_or("unterminated label value")?;
        if out.insert(name.to_string(), value).is_some() {
            return Err(format!("duplicate label `{name}`"));
        }
        rest = &after[end + 1..];
        rest = match rest.strip_prefix(',') {
            Some(r) => r,
            None if rest.is_empty() => rest,
            None => return Err(format!("expected , between labels: {rest}")),
        };
    }
    Ok(out)
}

/// Parses exposition text strictly: returns (family -> type, samples)
/// or the first offending line.
pub fn parse(text: &str) -> Result<Parsed, String> {
    let mut types = BTreeMap::new();
    let mut helps = BTreeMap::new();
    let mut samples = Vec::new();
    if !text.ends_with('\n') {
        return Err("text must end with a newline".into());
    }
    for (n, line) in text.lines().enumerate() {
        let bad = |why: String| format!("line {}: {why}: {line}", n + 1);
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kw, name, tail) = (parts.next(), parts.next(), parts.next());
            let name = name.ok_or_else(|| bad("comment without a metric name".into()))?;
            if !is_name(name) {
                return Err(bad(format!("bad metric name `{name}`")));
            }
            match kw {
                Some("HELP") => {
                    if helps.insert(name.to_string(), ()).is_some() {
                        return Err(bad("second HELP".into()));
                    }
                }
                Some("TYPE") => {
                    let t = tail.ok_or_else(|| bad("TYPE without a type".into()))?;
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&t) {
                        return Err(bad(format!("unknown type `{t}`")));
                    }
                    if samples.iter().any(|s: &Sample| s.family == name) {
                        return Err(bad("TYPE after the family's samples".into()));
                    }
                    if types.insert(name.to_string(), t.to_string()).is_some() {
                        return Err(bad("second TYPE".into()));
                    }
                }
                _ => return Err(bad("unknown comment keyword".into())),
            }
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            return Err(bad("empty or malformed line".into()));
        }
        let (head, value) = line.rsplit_once(' ').ok_or_else(|| bad("no value".into()))?;
        let value = parse_value(value).map_err(&bad)?;
        let (name, labels) = match head.split_once('{') {
            Some((name, rest)) => {
                let inner = rest
                    .strip_suffix('}')
                    .ok_or_else(|| bad("labels not closed".into()))?;
                (name, parse_labels(inner).map_err(&bad)?)
            }
            None => (head, BTreeMap::new()),
        };
        if !is_name(name) {
            return Err(bad(format!("bad metric name `{name}`")));
        }
        let family = types
            .iter()
            .filter(|(f, t)| {
                name == f.as_str()
                    || (t.as_str() == "histogram"
                        && ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| name.strip_suffix(s) == Some(f.as_str())))
            })
            .map(|(f, _)| f.clone())
            .next();
        let family = family.ok_or_else(|| bad("sample without a TYPE line".into()))?;
        samples.push(Sample {
            family,
            name: name.to_string(),
            labels,
            value,
        });
    }
    check_histograms(&types, &samples)?;
    Ok((types, samples))
}

/// Buckets cumulative, ending in +Inf equal to _count, per label set.
fn check_histograms(types: &BTreeMap<String, String>, samples: &[Sample]) -> Result<(), String> {
    for (family, _) in types.iter().filter(|(_, t)| t.as_str() == "histogram") {
        let bucket = format!("{family}_bucket");
        let mut series: BTreeMap<SeriesKey, Vec<(f64, f64)>> = BTreeMap::new();
        for s in samples.iter().filter(|s| s.name == bucket) {
            let le = s.labels.get("le").ok_or(format!("{bucket} without le"))?;
            let le = parse_value(le)?;
            let key: Vec<_> = s
                .labels
                .iter()
                .filter(|(k, _)| k.as_str() != "le")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            series.entry(key).or_default().push((le, s.value));
        }
        if series.is_empty() {
            return Err(format!("{family}: no buckets"));
        }
        for (key, buckets) in series {
            if buckets.windows(2).any(|w| w[0].0 >= w[1].0 || w[0].1 > w[1].1) {
                return Err(format!("{family}{key:?}: buckets not increasing and cumulative"));
            }
            let last = buckets.last().copied().unwrap_or((0.0, 0.0));
            if last.0 != f64::INFINITY {
                return Err(format!("{family}{key:?}: last bucket is not +Inf"));
            }
            let find = |suffix: &str| {
                samples.iter().find(|s| {
                    s.name == format!("{family}{suffix}")
                        && s.labels
                            .iter()
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect::<Vec<_>>()
                            == key
                })
            };
            let count = find("_count").ok_or(format!("{family}: no _count"))?;
            find("_sum").ok_or(format!("{family}: no _sum"))?;
            if count.value != last.1 {
                return Err(format!(
                    "{family}: +Inf bucket {} != _count {}",
                    last.1, count.value
                ));
            }
        }
    }
    Ok(())
}
