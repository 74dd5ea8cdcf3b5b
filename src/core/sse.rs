//! Finding the first generated token in a streamed chat completion.
//!
//! The response is Server-Sent Events: `data: {chat.completion.chunk}` lines.
//! The first chunk usually carries only the role (`"content":""`); a token
//! is a chunk whose `content` (or `reasoning_content`) is a non-empty
//! string, or one that starts a tool call. The scanner sees the body in
//! the pieces the host hands over and keeps the last few bytes of each, so
//! a marker split across two pieces is still found.

/// Bytes kept from the end of a piece (longer than any marker plus the
/// whitespace a serialiser puts after a colon).
const CARRY: usize = 32;

const CONTENT: &[u8] = b"content\":";
const TOOL_CALLS: &[u8] = b"\"tool_calls\":";

/// The scanner of one response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FirstToken {
    carry: Vec<u8>,
}

impl FirstToken {
    /// Feeds the next piece of the body; true once a token has been seen in
    /// it (or across its start).
    pub fn feed(&mut self, piece: &[u8]) -> bool {
        let mut window = std::mem::take(&mut self.carry);
        window.extend_from_slice(piece);
        let found = has_token(&window);
        let keep = window.len().saturating_sub(CARRY);
        self.carry = window.split_off(keep);
        found
    }
}

/// Whether `buf` holds a non-empty `content` string or a tool call.
fn has_token(buf: &[u8]) -> bool {
    find_all(buf, CONTENT).any(|end| non_empty_string_at(&buf[end..]))
        || find_all(buf, TOOL_CALLS).any(|end| starts_non_empty_array(&buf[end..]))
}

/// End offsets of every occurrence of `pat` in `buf`.
fn find_all<'a>(buf: &'a [u8], pat: &'a [u8]) -> impl Iterator<Item = usize> + 'a {
    buf.windows(pat.len())
        .enumerate()
        .filter(move |(_, w)| *w == pat)
        .map(move |(i, _)| i + pat.len())
}

fn skip_ws(rest: &[u8]) -> &[u8] {
    let n = rest.iter().take_while(|b| b.is_ascii_whitespace()).count();
    &rest[n..]
}

/// `"x…` (a string with at least one character) after optional spaces.
fn non_empty_string_at(rest: &[u8]) -> bool {
    matches!(skip_ws(rest), [b'"', c, ..] if *c != b'"')
}

/// `[{` or `[ {` after optional spaces.
fn starts_non_empty_array(rest: &[u8]) -> bool {
    matches!(skip_ws(rest), [b'[', tail @ ..] if skip_ws(tail).first() == Some(&b'{'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLE: &str = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n";
    const TOKEN: &str = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"},\"finish_reason\":null}]}\n\n";

    #[test]
    fn the_role_chunk_is_not_a_token_the_next_one_is() {
        let mut s = FirstToken::default();
        assert!(!s.feed(ROLE.as_bytes()));
        assert!(s.feed(TOKEN.as_bytes()));
        let mut s = FirstToken::default();
        assert!(s.feed(format!("{ROLE}{TOKEN}").as_bytes()));
    }

    #[test]
    fn every_split_of_a_token_chunk_is_found_once_joined() {
        let body = format!("{ROLE}{TOKEN}");
        let b = body.as_bytes();
        for cut in 0..b.len() {
            let mut s = FirstToken::default();
            let first = s.feed(&b[..cut]);
            let second = s.feed(&b[cut..]);
            assert!(!first || cut > ROLE.len(), "cut {cut}: token seen too early");
            assert!(first || second, "cut {cut}: token missed");
        }
        // Byte by byte, too.
        let mut s = FirstToken::default();
        assert!(b.iter().any(|byte| s.feed(std::slice::from_ref(byte))));
    }

    #[test]
    fn spaced_json_reasoning_and_tool_calls_count() {
        for chunk in [
            r#"data: {"choices": [{"delta": {"content": "Hi"}}]}"#,
            r#"data: {"choices":[{"delta":{"reasoning_content":"think"}}]}"#,
            r#"data: {"choices":[{"delta":{"tool_calls":[{"index":0,"id":"t"}]}}]}"#,
            // A non-streamed answer has one too (never scanned, but found).
            r#"{"choices":[{"message":{"role":"assistant","content":"x"}}]}"#,
        ] {
            assert!(FirstToken::default().feed(chunk.as_bytes()), "{chunk}");
        }
        for chunk in [
            r#"data: {"choices":[{"delta":{"content":null}}]}"#,
            r#"data: {"choices":[{"delta":{"tool_calls":[]}}]}"#,
            r#"data: {"choices":[],"usage":{"prompt_tokens":5}}"#,
            "data: [DONE]\n\n",
            ": keep-alive\n\n",
            "",
        ] {
            assert!(!FirstToken::default().feed(chunk.as_bytes()), "{chunk}");
        }
    }

    #[test]
    fn carry_stays_bounded() {
        let mut s = FirstToken::default();
        for _ in 0..100 {
            assert!(!s.feed(ROLE.as_bytes()));
            assert!(s.carry.len() <= CARRY);
        }
    }
}
