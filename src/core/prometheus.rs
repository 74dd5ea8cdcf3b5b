//! A small parser of the Prometheus text exposition format, enough to read
//! vLLM's `/metrics` (gauges and counters, labels, comments).

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    pub name: &'a str,
    /// Raw label text between the braces (unparsed), empty when none.
    pub labels: &'a str,
    pub value: f64,
}

/// Parses every well-formed sample line; malformed lines are skipped (a
/// monitoring endpoint must not be able to break the filter).
pub fn samples(text: &str) -> impl Iterator<Item = Sample<'_>> {
    text.lines().filter_map(parse_line)
}

fn parse_line(line: &str) -> Option<Sample<'_>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_ascii_whitespace())?;
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return None;
    }
    let rest = &line[name_end..];
    let (labels, rest) = if let Some(inner) = rest.strip_prefix('{') {
        let close = label_block_end(inner)?;
        (&inner[..close], &inner[close + 1..])
    } else {
        ("", rest)
    };
    let value_text = rest.split_ascii_whitespace().next()?;
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse::<f64>().ok()?,
    };
    Some(Sample { name, labels, value })
}

/// Index of the `}` closing a label block, skipping quoted values.
fn label_block_end(s: &str) -> Option<usize> {
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match (in_quotes, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (_, _, '"') => in_quotes = !in_quotes,
            (false, _, '}') => return Some(i),
            _ => {}
        }
    }
    None
}

/// Sum of every finite sample of metric `name` (over all label sets);
/// `None` when the metric is absent.
pub fn sum_of(text: &str, name: &str) -> Option<f64> {
    let mut found = false;
    let mut sum = 0.0;
    for s in samples(text).filter(|s| s.name == name && s.value.is_finite()) {
        found = true;
        sum += s.value;
    }
    found.then_some(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VLLM: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen2.5-VL-3B-Instruct"} 2.0
vllm:num_requests_running{engine="1",model_name="a}b \"q\""} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="Qwen/Qwen2.5-VL-3B-Instruct"} 7.0 1700000000000
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 12.0
garbage line {{{
vllm:broken{model_name="m" 3
nan_metric NaN
"#;

    #[test]
    fn reads_vllm_gauges() {
        assert_eq!(sum_of(VLLM, "vllm:num_requests_running"), Some(3.0));
        assert_eq!(sum_of(VLLM, "vllm:num_requests_waiting"), Some(7.0));
        assert_eq!(sum_of(VLLM, "vllm:absent"), None);
        assert_eq!(sum_of(VLLM, "vllm:broken"), None);
        assert_eq!(sum_of(VLLM, "nan_metric"), None);
        let s: Vec<_> = samples(VLLM).collect();
        assert_eq!(s[1].labels, r#"engine="1",model_name="a}b \"q\"""#);
        assert_eq!(s[3].labels, r#"le="+Inf",model_name="m""#);
    }
}
