//! A strict JSON scanner for event lines: an object's members with their values' text,
//! without building values.
//!
//! In: one line of text. Out: the members of the object it holds, each value as the
//! exact text it was written as (`"gpt-x"`, `1200`, `{"a":1}`), or where and why the
//! text is not JSON. Everything is validated as RFC 8259 JSON (strings, escapes,
//! numbers, literals, nesting up to a depth limit), but nothing is allocated unless a
//! key has escapes. The decoder reads only the few members it needs, so building a
//! whole value tree for each of millions of lines would be wasted work.

use std::borrow::Cow;
use std::fmt;

use smallvec::SmallVec;

/// Deeper nesting is refused rather than risking the stack.
const MAX_DEPTH: usize = 128;

/// An object's members in order: key, and the value's text.
pub(crate) type Members<'a> = SmallVec<[(Cow<'a, str>, &'a str); 8]>;

/// Where and why text is not JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JsonError {
    /// Byte offset into the scanned text.
    pub offset: usize,
    pub what: &'static str,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at column {}", self.what, self.offset + 1)
    }
}

/// Scans `text` as exactly one JSON value, with optional surrounding whitespace. For an
/// object, `on_member` gets each member's key text (quotes included, still escaped) and
/// value text, and the result is `true`; for valid JSON of another kind, `false`.
pub(crate) fn parse<'a>(
    text: &'a str,
    on_member: impl FnMut(&'a str, &'a str),
) -> Result<bool, JsonError> {
    let mut c = Cursor { text, pos: 0 };
    c.whitespace();
    let is_object = c.peek() == Some(b'{');
    if is_object {
        c.object(0, on_member)?;
    } else {
        c.value(0)?;
    }
    c.whitespace();
    if c.pos != text.len() {
        return Err(c.error("trailing characters after the JSON value"));
    }
    Ok(is_object)
}

/// The members of `text`, which the caller knows to be a well-formed object (the text
/// of a member value from [`parse`]), with keys unescaped.
pub(crate) fn members(text: &str) -> Result<Members<'_>, JsonError> {
    let mut members = Members::new();
    let mut bad_key = None;
    Cursor { text, pos: 0 }.object(0, |key, value| match string_contents(key) {
        Ok(key) => members.push((key.unwrap_or_default(), value)),
        Err(e) => {
            bad_key.get_or_insert(e);
        }
    })?;
    match bad_key {
        Some(e) => Err(e),
        None => Ok(members),
    }
}

/// The contents of a JSON string's text (quotes included), unescaped; `Ok(None)` when
/// the text is not a string.
pub(crate) fn string_contents(text: &str) -> Result<Option<Cow<'_, str>>, JsonError> {
    let Some(inner) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) else {
        return Ok(None);
    };
    // Keys and values are short: a plain loop beats setting up a vectorised search.
    if inner.bytes().all(|b| b != b'\\') {
        return Ok(Some(Cow::Borrowed(inner)));
    }
    // Escapes were validated by the scanner; serde_json does the unescaping, and
    // refuses the one thing the scanner lets through: an unpaired surrogate escape.
    serde_json::from_str::<String>(text)
        .map(|s| Some(Cow::Owned(s)))
        .map_err(|_| JsonError {
            offset: 0,
            what: "string has an unpaired surrogate escape (\\ud800 to \\udfff), which no UTF-8 text can hold",
        })
}

/// Whether `text` is exactly one JSON number (`-12`, `0.5`, `1e3`; not `+1`, `.5`, `1_000`).
pub(crate) fn is_number(text: &str) -> bool {
    let mut c = Cursor { text, pos: 0 };
    c.number().is_ok() && c.pos == text.len()
}

/// Length of the leading run of bytes that can stand in a JSON string as they are: up
/// to the first quote, backslash or control character. Eight bytes at a time, with
/// the classic "has a byte below n" word trick; the lowest flagged byte is exact.
fn plain_run(bytes: &[u8]) -> usize {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let mut words = bytes.chunks_exact(8);
    let mut done = 0;
    for chunk in &mut words {
        let mut eight = [0u8; 8];
        eight.copy_from_slice(chunk);
        let w = u64::from_le_bytes(eight);
        let special = zero_byte(w ^ (ONES * u64::from(b'"')))
            | zero_byte(w ^ (ONES * u64::from(b'\\')))
            | (w.wrapping_sub(ONES * 0x20) & !w & HIGHS);
        if special != 0 {
            return done + (special.trailing_zeros() / 8) as usize;
        }
        done += 8;
    }
    done + words
        .remainder()
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .unwrap_or(words.remainder().len())
}

struct Cursor<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.pos).copied()
    }

    fn error(&self, what: &'static str) -> JsonError {
        JsonError {
            offset: self.pos,
            what,
        }
    }

    fn whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn expect(&mut self, byte: u8, what: &'static str) -> Result<(), JsonError> {
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.error(what))
        }
    }

    /// Scans an object, handing each member's key text and value text to `on_member`.
    fn object(
        &mut self,
        depth: usize,
        mut on_member: impl FnMut(&'a str, &'a str),
    ) -> Result<(), JsonError> {
        self.expect(b'{', "expected an object")?;
        self.whitespace();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            self.whitespace();
            if self.peek() != Some(b'"') {
                return Err(self.error("expected a string key"));
            }
            let key = self.string()?;
            self.whitespace();
            self.expect(b':', "expected ':' after a key")?;
            self.whitespace();
            let start = self.pos;
            self.value(depth + 1)?;
            on_member(key, &self.text[start..self.pos]);
            self.whitespace();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return Err(self.error("expected ',' or '}' in an object")),
            }
        }
    }

    /// Skips one value, validating it.
    fn value(&mut self, depth: usize) -> Result<(), JsonError> {
        if depth > MAX_DEPTH {
            return Err(self.error("nested deeper than 128 levels"));
        }
        match self.peek() {
            Some(b'{') => self.object(depth, |_, _| {}),
            Some(b'[') => self.array(depth),
            Some(b'"') => self.string().map(|_| ()),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(_) => Err(self.error("expected a JSON value")),
            None => Err(self.error("unexpected end of input")),
        }
    }

    fn array(&mut self, depth: usize) -> Result<(), JsonError> {
        self.expect(b'[', "expected an array")?;
        self.whitespace();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            self.whitespace();
            self.value(depth + 1)?;
            self.whitespace();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return Err(self.error("expected ',' or ']' in an array")),
            }
        }
    }

    /// Skips a string, returning its text with the quotes.
    fn string(&mut self) -> Result<&'a str, JsonError> {
        let start = self.pos;
        self.pos += 1;
        loop {
            self.pos += plain_run(&self.bytes()[self.pos..]);
            match self.peek() {
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(&self.text[start..self.pos]);
                }
                Some(b'\\') => {
                    self.pos += 1;
                    match self.peek() {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                            self.pos += 1
                        }
                        Some(b'u') => {
                            let hex = self.bytes().get(self.pos + 1..self.pos + 5);
                            if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                                return Err(self.error("expected four hex digits after \\u"));
                            }
                            self.pos += 5;
                        }
                        _ => return Err(self.error("invalid escape in a string")),
                    }
                }
                Some(_) => return Err(self.error("control character in a string")),
                None => return Err(self.error("unterminated string")),
            }
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> Result<(), JsonError> {
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.error("invalid number")),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return Err(self.error("invalid number: digits expected after '.'"));
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(self.error("invalid number: digits expected in the exponent"));
            }
        }
        Ok(())
    }

    fn literal(&mut self, word: &'static [u8]) -> Result<(), JsonError> {
        if self.bytes()[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(())
        } else {
            Err(self.error("invalid literal (expected true, false or null)"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The members of a top-level object, keys unescaped; `None` for other JSON.
    fn object(text: &str) -> Result<Option<Vec<(String, &str)>>, JsonError> {
        let mut members = Vec::new();
        let is_object = parse(text, |k, v| {
            members.push((string_contents(k).unwrap().unwrap().into_owned(), v))
        })?;
        Ok(is_object.then_some(members))
    }

    #[test]
    fn members_keep_their_values_text() {
        let m = object(r#" {"a": 1.50, "b":"x\"y", "c" : {"d":[1, {"e":null}]}, "k\u00e9":true} "#)
            .unwrap()
            .expect("an object");
        let got: Vec<(&str, &str)> = m.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(
            got,
            [
                ("a", "1.50"),
                ("b", r#""x\"y""#),
                ("c", r#"{"d":[1, {"e":null}]}"#),
                ("ké", "true")
            ]
        );
        assert_eq!(string_contents(r#""x\"y""#).unwrap().unwrap(), "x\"y");
        assert_eq!(string_contents("12").unwrap(), None);
        assert!(string_contents(r#""\ud800""#).is_err());
        assert!(is_number("-1.5e3") && !is_number("+1") && !is_number("1_000") && !is_number(".5"));
    }

    #[test]
    fn invalid_json_says_where() {
        for (text, offset) in [
            (r#"{"a":1,}"#, 7),
            (r#"{"a":01}"#, 6),
            (r#"{"a":"b"#, 7),
            (r#"{"a":tru}"#, 5),
            (r#"{"a":1} x"#, 8),
            (r#"{"a":"\x"}"#, 7),
            ("{\"a\":\"\t\"}", 6),
            (r#"{"a":1."#, 7),
        ] {
            assert_eq!(object(text).unwrap_err().offset, offset, "{text}");
        }
        assert_eq!(object("[1, 2]").unwrap(), None);
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(object(&deep).is_err());
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|n| serde_json::json!(n)),
            (any::<i32>(), 0u32..6).prop_map(|(n, s)| serde_json::from_str(
                &rust_decimal::Decimal::new(i64::from(n), s).to_string()
            )
            .unwrap()),
            "[a-z\"\\\\\u{e9}\u{1F600}\n ]{0,8}".prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(serde_json::Value::Array),
                proptest::collection::btree_map("[a-z]{1,3}", inner, 0..5)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The word-at-a-time scan stops exactly where a byte-at-a-time one does.
        #[test]
        fn plain_run_matches_a_byte_loop(bytes in proptest::collection::vec(prop_oneof![Just(b'"'), Just(b'\\'), Just(0x1fu8), Just(0x20u8), any::<u8>(), 0x21u8..0x7f], 0..40)) {
            let expected = bytes.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20).unwrap_or(bytes.len());
            prop_assert_eq!(plain_run(&bytes), expected);
        }

        /// The scanner agrees with serde_json on what is JSON, and on each member.
        #[test]
        fn agrees_with_serde_json_on_valid_objects(
            members in proptest::collection::btree_map("[a-z]{1,4}", json_value(), 0..6),
            pretty in any::<bool>(),
        ) {
            let value = serde_json::Value::Object(members.into_iter().collect());
            let text = if pretty { serde_json::to_string_pretty(&value) } else { serde_json::to_string(&value) }.unwrap();
            let scanned = object(&text).unwrap().expect("an object");
            let serde_json::Value::Object(expected) = value else { unreachable!() };
            prop_assert_eq!(scanned.len(), expected.len());
            for (key, raw) in &scanned {
                let value: serde_json::Value = serde_json::from_str(raw).unwrap();
                prop_assert_eq!(Some(&value), expected.get(key.as_str()));
            }
        }

        /// Corrupted text is accepted exactly when serde_json accepts it as JSON text
        /// (as a raw value: syntax only, as here; numbers are range-checked later).
        #[test]
        fn agrees_with_serde_json_on_corruptions(
            value in json_value(),
            cut in any::<proptest::sample::Index>(),
            insert in prop_oneof![Just(""), Just(","), Just("}"), Just("]"), Just("\""), Just(":"), Just("1e"), Just("-"), Just("\\"), Just(" "), Just("{"), Just("nul")],
            delete in any::<bool>(),
        ) {
            let text = serde_json::json!({ "v": value }).to_string();
            let at = cut.index(text.len() + 1);
            let at = (0..=at).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
            let mut corrupted = text[..at].to_string();
            corrupted.push_str(insert);
            let rest = &text[at..];
            let skip = if delete { rest.chars().next().map_or(0, char::len_utf8) } else { 0 };
            corrupted.push_str(&rest[skip..]);
            let ours = parse(&corrupted, |_, _| {}).is_ok();
            let theirs = serde_json::from_str::<&serde_json::value::RawValue>(&corrupted).is_ok();
            prop_assert_eq!(ours, theirs, "{}", corrupted);
        }
    }
}
