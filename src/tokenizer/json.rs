//! JSON written exactly as Python's `json.dumps(obj, ensure_ascii=False)` writes it (SPEC-tokenizer.md section 5):
//! `", "` and `": "` separators, keys in their given order, non-ASCII kept, floats in Python's `repr`.
//!
//! The prompt embeds tool schemas and call arguments as such text, so their key order must survive a parse:
//! [`PyJson`] keeps object members in order without switching the whole crate's `serde_json` to `preserve_order`.

use std::fmt::Write as _;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// A JSON value that keeps object members in their order (a repeated key keeps its first place and last value, as a
/// Python dict does).
#[derive(Debug, Clone, PartialEq)]
pub enum PyJson {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    List(Vec<PyJson>),
    Object(Vec<(String, PyJson)>),
}

impl PyJson {
    /// Parses JSON text (`json.loads`).
    pub fn parse(text: &str) -> Result<PyJson, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Serialises as `json.dumps(self, ensure_ascii=False)`.
    pub fn dumps(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }

    fn write(&self, out: &mut String) {
        match self {
            PyJson::Null => out.push_str("null"),
            PyJson::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            PyJson::Int(i) => write!(out, "{i}").unwrap(),
            PyJson::Float(f) => out.push_str(&python_float_repr(*f)),
            PyJson::Str(s) => write_python_string(s, out),
            PyJson::List(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    item.write(out);
                }
                out.push(']');
            }
            PyJson::Object(members) => {
                out.push('{');
                for (i, (key, value)) in members.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_python_string(key, out);
                    out.push_str(": ");
                    value.write(out);
                }
                out.push('}');
            }
        }
    }
}

/// `json.dumps` of a string with `ensure_ascii=False`: only `"`, `\` and control characters are escaped.
pub fn write_python_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => write!(out, "\\u{:04x}", c as u32).unwrap(),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: the shortest round-trip digits, positional for exponents -4..15, else `d.ddde+XX`.
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    // Rust's `{:e}` gives the shortest round-trip digits as `d.ddde<exp>`.
    let sci = format!("{f:e}");
    let (mantissa, exponent) = sci.split_once('e').expect("`{:e}` always has an exponent");
    let exponent: i32 = exponent.parse().expect("`{:e}` exponent is an integer");
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if negative { "-" } else { "" };
    if (-4..16).contains(&exponent) {
        let point = exponent + 1;
        let body = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if point as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        format!("{sign}{body}")
    } else {
        let rest = &digits[1..];
        let mantissa = if rest.is_empty() { digits[..1].to_string() } else { format!("{}.{}", &digits[..1], rest) };
        format!("{sign}{mantissa}e{}{:02}", if exponent < 0 { '-' } else { '+' }, exponent.abs())
    }
}

impl<'de> Deserialize<'de> for PyJson {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PyJsonVisitor;
        impl<'de> Visitor<'de> for PyJsonVisitor {
            type Value = PyJson;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E>(self) -> Result<PyJson, E> {
                Ok(PyJson::Null)
            }
            fn visit_none<E>(self) -> Result<PyJson, E> {
                Ok(PyJson::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<PyJson, D::Error> {
                PyJson::deserialize(d)
            }
            fn visit_bool<E>(self, b: bool) -> Result<PyJson, E> {
                Ok(PyJson::Bool(b))
            }
            fn visit_i64<E>(self, i: i64) -> Result<PyJson, E> {
                Ok(PyJson::Int(i as i128))
            }
            fn visit_u64<E>(self, u: u64) -> Result<PyJson, E> {
                Ok(PyJson::Int(u as i128))
            }
            fn visit_f64<E>(self, f: f64) -> Result<PyJson, E> {
                Ok(PyJson::Float(f))
            }
            fn visit_str<E>(self, s: &str) -> Result<PyJson, E> {
                Ok(PyJson::Str(s.to_string()))
            }
            fn visit_string<E>(self, s: String) -> Result<PyJson, E> {
                Ok(PyJson::Str(s))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PyJson, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(PyJson::List(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PyJson, A::Error> {
                let mut members: Vec<(String, PyJson)> = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, PyJson>()? {
                    match members.iter_mut().find(|(k, _)| *k == key) {
                        Some(member) => member.1 = value,
                        None => members.push((key, value)),
                    }
                }
                Ok(PyJson::Object(members))
            }
        }
        deserializer.deserialize_any(PyJsonVisitor)
    }
}

impl serde::Serialize for PyJson {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self {
            PyJson::Null => serializer.serialize_unit(),
            PyJson::Bool(b) => serializer.serialize_bool(*b),
            PyJson::Int(i) => serializer.serialize_i128(*i),
            PyJson::Float(f) => serializer.serialize_f64(*f),
            PyJson::Str(s) => serializer.serialize_str(s),
            PyJson::List(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            PyJson::Object(members) => {
                let mut map = serializer.serialize_map(Some(members.len()))?;
                for (k, v) in members {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dumps_like_python() {
        let v = PyJson::parse(r#"{"b": [1, 2.5, 1e20, 1.0, -0.0001, 1e-7], "a": "é\n\"\u0001", "c": null, "d": true}"#).unwrap();
        assert_eq!(v.dumps(), r#"{"b": [1, 2.5, 1e+20, 1.0, -0.0001, 1e-07], "a": "é\n\"\u0001", "c": null, "d": true}"#);
    }

    #[test]
    fn repeated_key_keeps_first_place_last_value() {
        assert_eq!(PyJson::parse(r#"{"x": 1, "y": 2, "x": 3}"#).unwrap().dumps(), r#"{"x": 3, "y": 2}"#);
    }

    #[test]
    fn float_repr_boundaries() {
        for (f, s) in [(1e16, "1e+16"), (1e15, "1000000000000000.0"), (0.0001, "0.0001"), (0.00001, "1e-05"), (123.456, "123.456")] {
            assert_eq!(python_float_repr(f), s);
        }
    }
}
