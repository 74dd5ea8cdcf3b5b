//! A small, strict JSON reader that works on byte spans of the body.
//!
//! [`Doc::parse`] validates a whole document in one pass (the grammar of
//! RFC 8259, accepting exactly what `serde_json` accepts into a raw value)
//! without building values and without recursion, so nesting depth costs
//! one bit per level. The reader then lists an object's members or an
//! array's items as spans of the original text, and decodes a string only
//! when asked. Strings longer than [`LONG_STRING`] bytes (image payloads)
//! are remembered by the validating pass, so listing the containers around
//! them later jumps over them instead of reading them again.
//!
//! It exists for speed: a body with a 4K image is read in about 1.3 times
//! one plain `serde_json` pass (`make bench-image` reports it per image),
//! where reading each nesting level with `serde_json` again read the image's
//! base64 several times.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

/// Strings at least this long are indexed by the validating pass.
pub const LONG_STRING: usize = 1024;

/// Why a text is not JSON, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonError {
    pub what: &'static str,
    /// Byte offset of the problem.
    pub at: usize,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.what, self.at)
    }
}

impl std::error::Error for JsonError {}

/// The kind of a JSON value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Object,
    Array,
    String,
    Number,
    Bool,
    Null,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Object => "object",
            Self::Array => "array",
            Self::String => "string",
            Self::Number => "number",
            Self::Bool => "boolean",
            Self::Null => "null",
        }
    }
}

/// An object member: its key, decoded, and the span of its value.
pub type Member<'a> = (Cow<'a, str>, Range<usize>);

/// A validated JSON document.
#[derive(Debug, Clone)]
pub struct Doc<'a> {
    text: &'a str,
    /// Spans (quotes included) of the long strings, in order.
    long: Vec<Range<usize>>,
}

impl<'a> Doc<'a> {
    /// Validates `text` as one JSON value with optional surrounding
    /// whitespace; returns the document and the span of its value.
    pub fn parse(text: &'a str) -> Result<(Self, Range<usize>), JsonError> {
        let mut long = Vec::new();
        let mut c = Cursor {
            b: text.as_bytes(),
            pos: 0,
            long: &[],
        };
        c.ws();
        let start = c.pos;
        c.value(Some(&mut long))?;
        let end = c.pos;
        c.ws();
        if c.pos != c.b.len() {
            return Err(c.err("trailing characters"));
        }
        Ok((Self { text, long }, start..end))
    }

    /// The text of a value.
    pub fn text(&self, v: &Range<usize>) -> &'a str {
        self.text.get(v.clone()).unwrap_or_default()
    }

    /// The kind of a value (from its first byte).
    pub fn kind(&self, v: &Range<usize>) -> Kind {
        match self.text.as_bytes().get(v.start) {
            Some(b'{') => Kind::Object,
            Some(b'[') => Kind::Array,
            Some(b'"') => Kind::String,
            Some(b't' | b'f') => Kind::Bool,
            Some(b'n') => Kind::Null,
            _ => Kind::Number,
        }
    }

    fn cursor(&self, at: usize) -> Cursor<'_> {
        Cursor {
            b: self.text.as_bytes(),
            pos: at,
            long: &self.long,
        }
    }

    /// The members of an object, in order (duplicates kept): each key,
    /// decoded, and the span of its value.
    pub fn members(&self, v: &Range<usize>) -> Result<Vec<Member<'a>>, JsonError> {
        self.member_iter(v).collect()
    }

    /// The members of an object, one at a time (nothing allocated unless a
    /// key has escapes).
    pub fn member_iter<'d>(&'d self, v: &Range<usize>) -> MemberIter<'d, 'a> {
        MemberIter {
            doc: self,
            walk: Walk::new(self.cursor(v.start)),
        }
    }

    /// The last value of each of `keys` in an object (a later duplicate
    /// wins, as in Python's `json`), in one pass.
    pub fn pick<const N: usize>(
        &self,
        v: &Range<usize>,
        keys: [&str; N],
    ) -> Result<[Option<Range<usize>>; N], JsonError> {
        let mut out: [Option<Range<usize>>; N] = std::array::from_fn(|_| None);
        for member in self.member_iter(v) {
            let (key, span) = member?;
            if let Some(i) = keys.iter().position(|k| *k == key) {
                out[i] = Some(span);
            }
        }
        Ok(out)
    }

    /// The spans of an array's items, in order.
    pub fn items(&self, v: &Range<usize>) -> Result<Vec<Range<usize>>, JsonError> {
        self.item_iter(v).collect()
    }

    /// The spans of an array's items, one at a time.
    pub fn item_iter<'d>(&'d self, v: &Range<usize>) -> ItemIter<'d> {
        ItemIter {
            walk: Walk::new(self.cursor(v.start)),
        }
    }

    /// A string value, unescaped (borrowed when it has no escapes).
    pub fn string(&self, v: &Range<usize>) -> Result<Cow<'a, str>, JsonError> {
        let raw = self.text(v);
        let inner = raw
            .strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .ok_or(JsonError {
                what: "expected a string",
                at: v.start,
            })?;
        if !inner.contains('\\') {
            return Ok(Cow::Borrowed(inner));
        }
        unescape(inner, v.start + 1).map(Cow::Owned)
    }
}

/// An object's members (see [`Doc::member_iter`]); stops after an error.
pub struct MemberIter<'d, 'a> {
    doc: &'d Doc<'a>,
    walk: Walk<'d>,
}

impl<'a> MemberIter<'_, 'a> {
    fn step(&mut self) -> Result<Option<Member<'a>>, JsonError> {
        if !self.walk.next_entry(true)? {
            return Ok(None);
        }
        let c = &mut self.walk.c;
        let key = c.key(None)?;
        c.ws();
        let start = c.pos;
        c.value(None)?;
        let end = c.pos;
        Ok(Some((self.doc.string(&key)?, start..end)))
    }
}

impl<'a> Iterator for MemberIter<'_, 'a> {
    type Item = Result<Member<'a>, JsonError>;

    fn next(&mut self) -> Option<Self::Item> {
        let step = self.step();
        self.walk.finish(step)
    }
}

/// An array's item spans (see [`Doc::item_iter`]); stops after an error.
pub struct ItemIter<'d> {
    walk: Walk<'d>,
}

impl ItemIter<'_> {
    fn step(&mut self) -> Result<Option<Range<usize>>, JsonError> {
        if !self.walk.next_entry(false)? {
            return Ok(None);
        }
        let c = &mut self.walk.c;
        let start = c.pos;
        c.value(None)?;
        Ok(Some(start..c.pos))
    }
}

impl Iterator for ItemIter<'_> {
    type Item = Result<Range<usize>, JsonError>;

    fn next(&mut self) -> Option<Self::Item> {
        let step = self.step();
        self.walk.finish(step)
    }
}

/// A walk over the entries of one object or array, shared by the member
/// and item iterators; it stops for good at the end or after an error.
struct Walk<'d> {
    c: Cursor<'d>,
    started: bool,
    done: bool,
}

impl<'d> Walk<'d> {
    fn new(c: Cursor<'d>) -> Self {
        Self {
            c,
            started: false,
            done: false,
        }
    }

    /// Moves to the next entry (the first, unless started): past the
    /// opening byte or the comma, and whitespace. False at the end.
    fn next_entry(&mut self, object: bool) -> Result<bool, JsonError> {
        if self.done {
            return Ok(false);
        }
        let (open, close, not_open, not_comma) = if object {
            (b'{', b'}', "expected an object", "expected `,` or `}`")
        } else {
            (b'[', b']', "expected an array", "expected `,` or `]`")
        };
        let c = &mut self.c;
        if self.started {
            c.ws();
            if c.eat(close) {
                return Ok(false);
            }
            c.expect(b',', not_comma)?;
        } else {
            self.started = true;
            c.expect(open, not_open)?;
            c.ws();
            if c.eat(close) {
                return Ok(false);
            }
        }
        c.ws();
        Ok(true)
    }

    /// The iterator's item for a step; the walk ends unless it gave one.
    fn finish<T>(&mut self, step: Result<Option<T>, JsonError>) -> Option<Result<T, JsonError>> {
        self.done |= !matches!(step, Ok(Some(_)));
        step.transpose()
    }
}

/// Decodes the escapes of a string's contents (`base`: its offset, for
/// errors). A `\u` escape of a lone surrogate is refused, as `serde_json`
/// refuses it when it reads a string.
fn unescape(inner: &str, base: usize) -> Result<String, JsonError> {
    let b = inner.as_bytes();
    let mut out = String::with_capacity(inner.len());
    let mut i = 0;
    let err = |what, at| JsonError { what, at: base + at };
    while i < b.len() {
        let Some(off) = b[i..].iter().position(|&x| x == b'\\') else {
            out.push_str(&inner[i..]);
            break;
        };
        out.push_str(&inner[i..i + off]);
        i += off;
        let esc = *b.get(i + 1).ok_or(err("unfinished escape", i))?;
        i += 2;
        let ch = match esc {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let hi = hex4(b, i).ok_or(err("invalid `\\u` escape", i))?;
                i += 4;
                let code = match hi {
                    0xD800..=0xDBFF => {
                        let lo = (b.get(i) == Some(&b'\\') && b.get(i + 1) == Some(&b'u'))
                            .then(|| hex4(b, i + 2))
                            .flatten()
                            .filter(|lo| (0xDC00..=0xDFFF).contains(lo))
                            .ok_or(err("lone surrogate in `\\u` escape", i))?;
                        i += 6;
                        0x10000 + ((u32::from(hi) - 0xD800) << 10) + (u32::from(lo) - 0xDC00)
                    }
                    0xDC00..=0xDFFF => return Err(err("lone surrogate in `\\u` escape", i)),
                    _ => u32::from(hi),
                };
                char::from_u32(code).ok_or(err("invalid `\\u` escape", i))?
            }
            _ => return Err(err("invalid escape", i - 1)),
        };
        out.push(ch);
    }
    Ok(out)
}

fn hex4(b: &[u8], at: usize) -> Option<u16> {
    let digits = b.get(at..at + 4)?;
    let mut v = 0u16;
    for &d in digits {
        let x = (d as char).to_digit(16)?;
        v = (v << 4) | x as u16;
    }
    Some(v)
}

/// One bit per open container: set for an object.
#[derive(Default)]
struct Nesting {
    words: Vec<u64>,
    depth: usize,
}

impl Nesting {
    fn push(&mut self, object: bool) {
        let (w, bit) = (self.depth / 64, self.depth % 64);
        if w == self.words.len() {
            self.words.push(0);
        }
        if object {
            self.words[w] |= 1 << bit;
        } else {
            self.words[w] &= !(1 << bit);
        }
        self.depth += 1;
    }

    /// Whether the innermost open container is an object; `None` at the top.
    fn top(&self) -> Option<bool> {
        let d = self.depth.checked_sub(1)?;
        Some(self.words[d / 64] & (1 << (d % 64)) != 0)
    }

    fn pop(&mut self) {
        self.depth = self.depth.saturating_sub(1);
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    /// Long strings already validated: skipped by a lookup.
    long: &'a [Range<usize>],
}

impl Cursor<'_> {
    fn err(&self, what: &'static str) -> JsonError {
        JsonError { what, at: self.pos }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> bool {
        let hit = self.peek() == Some(byte);
        self.pos += usize::from(hit);
        hit
    }

    fn expect(&mut self, byte: u8, what: &'static str) -> Result<(), JsonError> {
        if self.eat(byte) {
            Ok(())
        } else if self.pos >= self.b.len() {
            Err(self.err("unexpected end of input"))
        } else {
            Err(self.err(what))
        }
    }

    /// Skips one value; `long` collects the long strings it passes.
    /// Iterative: the nesting is a bit stack, not the call stack.
    fn value(&mut self, mut long: Option<&mut Vec<Range<usize>>>) -> Result<(), JsonError> {
        let mut open = Nesting::default();
        loop {
            // A value.
            self.ws();
            match self.peek() {
                Some(b'{') => {
                    self.pos += 1;
                    self.ws();
                    if !self.eat(b'}') {
                        open.push(true);
                        self.key(long.as_deref_mut())?;
                        continue;
                    }
                }
                Some(b'[') => {
                    self.pos += 1;
                    self.ws();
                    if !self.eat(b']') {
                        open.push(false);
                        continue;
                    }
                }
                Some(b'"') => {
                    let span = self.string()?;
                    if let Some(long) = long.as_deref_mut() {
                        if span.len() >= LONG_STRING {
                            long.push(span);
                        }
                    }
                }
                Some(b'-' | b'0'..=b'9') => self.number()?,
                Some(b't') => self.literal(b"true")?,
                Some(b'f') => self.literal(b"false")?,
                Some(b'n') => self.literal(b"null")?,
                Some(_) => return Err(self.err("expected a value")),
                None => return Err(self.err("unexpected end of input")),
            }
            // After a value: close containers until one continues.
            loop {
                let Some(object) = open.top() else {
                    return Ok(());
                };
                self.ws();
                if self.eat(b',') {
                    if object {
                        self.key(long.as_deref_mut())?;
                    }
                    break;
                }
                let close = if object { b'}' } else { b']' };
                if !self.eat(close) {
                    let what = if object {
                        "expected `,` or `}`"
                    } else {
                        "expected `,` or `]`"
                    };
                    return Err(if self.pos >= self.b.len() {
                        self.err("unexpected end of input")
                    } else {
                        self.err(what)
                    });
                }
                open.pop();
            }
        }
    }

    /// A member's key and its colon; returns the key's span.
    fn key(&mut self, long: Option<&mut Vec<Range<usize>>>) -> Result<Range<usize>, JsonError> {
        self.ws();
        let span = self.string()?;
        if let Some(long) = long {
            if span.len() >= LONG_STRING {
                long.push(span.clone());
            }
        }
        self.ws();
        self.expect(b':', "expected `:`")?;
        Ok(span)
    }

    /// Skips a string (validating it); returns its span, quotes included.
    fn string(&mut self) -> Result<Range<usize>, JsonError> {
        let start = self.pos;
        if self.peek() != Some(b'"') {
            return Err(self.err(if self.pos >= self.b.len() {
                "unexpected end of input"
            } else {
                "expected a string"
            }));
        }
        if let Ok(i) = self.long.binary_search_by_key(&start, |r| r.start) {
            self.pos = self.long[i].end;
            return Ok(start..self.pos);
        }
        self.pos += 1;
        loop {
            self.pos += plain_run(&self.b[self.pos..]);
            match self.peek() {
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(start..self.pos);
                }
                Some(b'\\') => {
                    self.pos += 1;
                    match self.peek() {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.pos += 1,
                        Some(b'u') => {
                            self.pos += 1;
                            if hex4(self.b, self.pos).is_none() {
                                return Err(self.err("invalid `\\u` escape"));
                            }
                            self.pos += 4;
                        }
                        Some(_) => return Err(self.err("invalid escape")),
                        None => return Err(self.err("unexpected end of input")),
                    }
                }
                Some(_) => return Err(self.err("control character in a string")),
                None => return Err(self.err("unexpected end of input")),
            }
        }
    }

    fn digits(&mut self) -> usize {
        let n = self.b[self.pos..]
            .iter()
            .take_while(|d| d.is_ascii_digit())
            .count();
        self.pos += n;
        n
    }

    fn number(&mut self) -> Result<(), JsonError> {
        self.eat(b'-');
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.err("invalid number")),
        }
        if self.eat(b'.') && self.digits() == 0 {
            return Err(self.err("invalid number"));
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            if self.digits() == 0 {
                return Err(self.err("invalid number"));
            }
        }
        Ok(())
    }

    fn literal(&mut self, word: &'static [u8]) -> Result<(), JsonError> {
        if self.b[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(())
        } else {
            Err(self.err("expected a value"))
        }
    }
}

/// Length of the run of bytes that need no attention inside a string (not
/// `"`, `\` or a control character), eight bytes at a time.
fn plain_run(b: &[u8]) -> usize {
    let i = clean_words(b, |v| has_less(v, 0x20) | has_byte(v, b'"') | has_byte(v, b'\\'));
    i + b[i..]
        .iter()
        .take_while(|&&c| c >= 0x20 && c != b'"' && c != b'\\')
        .count()
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// Non-zero when a byte of the word `v` is below `n` (`n` <= 128). Never
/// misses one; the caller finds which byte by itself.
pub(crate) const fn has_less(v: u64, n: u8) -> u64 {
    v.wrapping_sub(ONES * n as u64) & !v & HIGH
}

/// Non-zero when a byte of the word `v` equals `byte`. Never misses one.
pub(crate) const fn has_byte(v: u64, byte: u8) -> u64 {
    has_less(v ^ (ONES * byte as u64), 1)
}

/// Length of the leading 8-byte words of `b` in which `hit` flags no byte
/// (a multiple of 8: the caller goes on byte by byte from there).
pub(crate) fn clean_words(b: &[u8], hit: impl Fn(u64) -> u64) -> usize {
    let mut i = 0;
    while let Some(chunk) = b.get(i..i + 8) {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        if hit(u64::from_le_bytes(w)) != 0 {
            break;
        }
        i += 8;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> bool {
        Doc::parse(s).is_ok()
    }

    #[test]
    fn accepts_what_serde_json_accepts() {
        let cases = [
            r#"{}"#,
            r#" [ ] "#,
            r#"{"a":[1,-0,0.5,1e400,-2.5E-3,1E+2,true,false,null,"x\"\\\/\b\f\n\r\t\u00e9\ud800"]}"#,
            r#""\ud83d\ude00""#,
            "0",
            "\"é ✓\"",
            "\t\r\n{\"k\" : {\"a\" : [ {} , [] ] } }\n",
        ];
        for s in cases {
            assert!(ok(s), "{s}");
            assert!(
                serde_json::from_str::<&serde_json::value::RawValue>(s).is_ok(),
                "{s}"
            );
        }
    }

    #[test]
    fn refuses_what_serde_json_refuses() {
        let cases = [
            "",
            " ",
            "{",
            "[1,]",
            "{\"a\":1,}",
            "{'a':1}",
            "[01]",
            "[1.]",
            "[.5]",
            "[1e]",
            "[-]",
            "[+1]",
            "[NaN]",
            "[tru]",
            "{\"a\" 1}",
            "{1:2}",
            "\"a\u{1}b\"",
            "\"\\x\"",
            "\"\\u12G4\"",
            "\"abc",
            "[1] [2]",
            "{} x",
            "[1 2]",
            "{\"a\":1 \"b\":2}",
        ];
        for s in cases {
            assert!(!ok(s), "{s:?} accepted");
            assert!(
                serde_json::from_str::<&serde_json::value::RawValue>(s).is_err(),
                "{s:?}"
            );
        }
    }

    #[test]
    fn members_items_and_strings() {
        let text = r#"{"a":[1, "two" ,{"x":null}],"b\u0063":"q\"\n","a":7}"#;
        let (doc, top) = Doc::parse(text).expect("parse");
        let m = doc.members(&top).expect("members");
        let keys: Vec<&str> = m.iter().map(|(k, _)| k.as_ref()).collect();
        assert_eq!(keys, ["a", "bc", "a"]);
        assert_eq!(doc.text(&m[2].1), "7");
        assert_eq!(doc.kind(&m[0].1), Kind::Array);
        let items = doc.items(&m[0].1).expect("items");
        let texts: Vec<&str> = items.iter().map(|r| doc.text(r)).collect();
        assert_eq!(texts, ["1", "\"two\"", "{\"x\":null}"]);
        assert_eq!(doc.string(&items[1]).expect("string"), "two");
        assert!(matches!(doc.string(&items[1]), Ok(Cow::Borrowed(_))));
        assert_eq!(doc.string(&m[1].1).expect("string"), "q\"\n");
        assert_eq!(doc.members(&items[2]).expect("members")[0].0, "x");
        assert!(doc.items(&m[2].1).is_err() && doc.members(&m[0].1).is_err());
        let [a, bc, zz] = doc.pick(&top, ["a", "bc", "zz"]).expect("pick");
        assert_eq!(
            (a.map(|r| doc.text(&r)), bc.is_some(), zz),
            (Some("7"), true, None)
        );
    }

    #[test]
    fn unescaping() {
        let (doc, v) = Doc::parse(r#""\ud83d\ude00 \u00e9\/""#).expect("parse");
        assert_eq!(doc.string(&v).expect("string"), "\u{1F600} é/");
        for lone in [r#""\ud800""#, r#""\udc00x""#, r#""\ud800\u0041""#] {
            let (doc, v) = Doc::parse(lone).expect("valid JSON");
            assert!(doc.string(&v).is_err(), "{lone}");
            assert!(serde_json::from_str::<String>(lone).is_err(), "{lone}");
        }
    }

    #[test]
    fn deep_nesting_needs_no_stack() {
        let deep = format!("{}{}", "[".repeat(200_000), "]".repeat(200_000));
        assert!(ok(&deep));
        let deep = format!("{}1{}", "{\"a\":".repeat(100_000), "}".repeat(100_000));
        assert!(ok(&deep));
        assert!(!ok(&deep[..deep.len() - 1]));
        let bad = format!("{}}}", "[".repeat(70));
        assert!(!ok(&bad));
    }

    #[test]
    fn long_strings_are_indexed_and_skipped() {
        let long = "A".repeat(5000);
        let text = format!(r#"{{"m":[{{"u":"{long}","k":"v"}}],"{long}":1}}"#);
        let (doc, top) = Doc::parse(&text).expect("parse");
        assert_eq!(doc.long.len(), 2);
        let m = doc.members(&top).expect("members");
        assert_eq!(m[1].0.len(), 5000);
        let item = &doc.items(&m[0].1).expect("items")[0];
        let inner = doc.members(item).expect("members");
        assert_eq!(doc.string(&inner[0].1).expect("string").len(), 5000);
        assert_eq!(doc.text(&inner[1].1), "\"v\"");
    }

    #[test]
    fn plain_runs_stop_at_the_right_byte() {
        for special in [b'"', b'\\', 0x00, 0x1f] {
            for at in 0..20 {
                let mut b = vec![b'a'; 20];
                b[at] = special;
                assert_eq!(plain_run(&b), at, "{special} at {at}");
            }
        }
        let b = "é✓ ~\u{7f}".as_bytes();
        assert_eq!(plain_run(b), b.len());
    }

    #[test]
    fn errors_say_where() {
        let e = Doc::parse("[1, x]").expect_err("invalid");
        assert_eq!((e.what, e.at), ("expected a value", 4));
        assert_eq!(e.to_string(), "expected a value at byte 4");
        let e = Doc::parse("[1, 2").expect_err("invalid");
        assert_eq!(e.what, "unexpected end of input");
    }
}
