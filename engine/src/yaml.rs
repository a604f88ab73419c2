//! A YAML reader that keeps the line and column of every node.
//!
//! `serde_yaml` values carry no positions, and every error the engine reports must name the file,
//! line and column, so the pipeline file is read with yaml-rust2's event parser into a small
//! spanned tree. Aliases are refused outright (no alias bombs, and a pipeline file gains nothing
//! from them); duplicate keys and non-scalar keys are refused too.

use std::fmt;

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// Where a node starts in its source: char index (as the parser counts), 1-based line and column,
/// and a length in chars for underlining.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    /// Index of the first char (not byte) of the node.
    pub index: usize,
    /// Length in chars (at least 1).
    pub len: usize,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub col: usize,
}

impl Span {
    fn at(m: Marker, len: usize) -> Self {
        Span {
            index: m.index(),
            len: len.max(1),
            line: m.line(),
            // yaml-rust2 counts columns from 0; editors and humans count from 1.
            col: m.col() + 1,
        }
    }
}

/// A node of the spanned tree.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// A scalar as written.
    Scalar {
        /// The text.
        value: String,
        /// False for quoted and block scalars, which are always strings.
        plain: bool,
    },
    /// A list.
    Seq(Vec<Yaml>),
    /// Entries in file order; keys are unique.
    Map(Vec<(Key, Yaml)>),
}

/// A mapping key with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    /// The key's text.
    pub name: String,
    /// Where it is.
    pub span: Span,
}

/// A node and where it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Yaml {
    /// The node.
    pub node: Node,
    /// Where it starts.
    pub span: Span,
}

/// A syntax-level problem with a position.
#[derive(Debug, Clone, PartialEq)]
pub struct YamlError {
    /// What is wrong.
    pub message: String,
    /// What to do about it.
    pub hint: Option<String>,
    /// Where.
    pub span: Span,
}

impl fmt::Display for YamlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.span.line, self.span.col, self.message)
    }
}

impl Yaml {
    /// A short name of the node's type for messages ("a mapping", "a list", "a string").
    pub fn type_name(&self) -> &'static str {
        match &self.node {
            Node::Scalar { .. } => match self.to_json() {
                serde_json::Value::Null => "null",
                serde_json::Value::Bool(_) => "a boolean",
                serde_json::Value::Number(n) if n.is_f64() => "a float",
                serde_json::Value::Number(_) => "an integer",
                _ => "a string",
            },
            Node::Seq(_) => "a list",
            Node::Map(_) => "a mapping",
        }
    }

    /// The scalar's text, if this is a scalar.
    pub fn as_scalar(&self) -> Option<&str> {
        match &self.node {
            Node::Scalar { value, .. } => Some(value),
            _ => None,
        }
    }

    /// The value with YAML 1.2 core-schema typing of plain scalars.
    pub fn to_json(&self) -> serde_json::Value {
        match &self.node {
            Node::Scalar { value, plain } => {
                if *plain {
                    plain_scalar(value)
                } else {
                    serde_json::Value::String(value.clone())
                }
            }
            Node::Seq(items) => serde_json::Value::Array(items.iter().map(Yaml::to_json).collect()),
            Node::Map(entries) => serde_json::Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.name.clone(), v.to_json()))
                    .collect(),
            ),
        }
    }
}

/// Types a plain scalar by the YAML 1.2 core schema.
pub fn plain_scalar(s: &str) -> serde_json::Value {
    use serde_json::Value;
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    if let Some(i) = parse_int(s) {
        return Value::from(i);
    }
    if let Some(f) = parse_float(s) {
        if let Some(n) = serde_json::Number::from_f64(f) {
            return Value::Number(n);
        }
    }
    Value::String(s.to_string())
}

fn parse_int(s: &str) -> Option<i64> {
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let v = if let Some(h) = body.strip_prefix("0x") {
        i64::from_str_radix(h, 16).ok()?
    } else if let Some(o) = body.strip_prefix("0o") {
        i64::from_str_radix(o, 8).ok()?
    } else if !body.is_empty() && body.bytes().all(|b| b.is_ascii_digit()) {
        body.parse::<i64>().ok()?
    } else {
        return None;
    };
    Some(if neg { -v } else { v })
}

fn parse_float(s: &str) -> Option<f64> {
    // Only the YAML float syntax: Rust's parser also accepts "inf", "nan", "infinity".
    let t = s.trim_start_matches(['+', '-']);
    let first = t.bytes().next()?;
    if !(first.is_ascii_digit() || first == b'.') {
        return None;
    }
    match t {
        ".inf" | ".Inf" | ".INF" => {
            return Some(if s.starts_with('-') {
                f64::NEG_INFINITY
            } else {
                f64::INFINITY
            })
        }
        ".nan" | ".NaN" | ".NAN" => return Some(f64::NAN),
        _ => {}
    }
    if t.bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
    {
        s.parse::<f64>().ok()
    } else {
        None
    }
}

/// Parses one YAML document into a spanned tree.
pub fn parse(src: &str) -> Result<Yaml, YamlError> {
    let mut reader = Reader {
        parser: Parser::new_from_str(src),
        depth: 0,
    };
    let mut doc = None;
    loop {
        let (ev, mark) = reader.next()?;
        match ev {
            Event::StreamStart | Event::DocumentEnd | Event::Nothing => {}
            Event::StreamEnd => break,
            Event::DocumentStart => {
                let (ev, mark) = reader.next()?;
                if doc.is_some() {
                    return Err(YamlError {
                        message: "the file holds more than one YAML document".into(),
                        hint: Some("keep one pipeline per file (remove the extra `---`)".into()),
                        span: Span::at(mark, 3),
                    });
                }
                doc = Some(reader.node(ev, mark)?);
            }
            _ => {
                return Err(YamlError {
                    message: "unexpected YAML event outside a document".into(),
                    hint: None,
                    span: Span::at(mark, 1),
                })
            }
        }
    }
    doc.ok_or_else(|| YamlError {
        message: "the file is empty".into(),
        hint: Some("a pipeline needs at least `name:` and `stages:`".into()),
        span: Span {
            index: 0,
            len: 1,
            line: 1,
            col: 1,
        },
    })
}

struct Reader<'a> {
    parser: Parser<std::str::Chars<'a>>,
    depth: usize,
}

/// Deepest nesting of lists and mappings accepted. A pipeline needs about six levels; the limit
/// keeps a hostile or generated file (`[[[[...`) from overflowing the stack of the recursive
/// reader, which would abort the process instead of reporting an error.
pub const MAX_DEPTH: usize = 64;

impl Reader<'_> {
    fn next(&mut self) -> Result<(Event, Marker), YamlError> {
        self.parser.next_token().map_err(|e| YamlError {
            message: format!("invalid YAML: {}", e.info()),
            hint: None,
            span: Span::at(*e.marker(), 1),
        })
    }

    fn node(&mut self, ev: Event, mark: Marker) -> Result<Yaml, YamlError> {
        if matches!(ev, Event::SequenceStart(..) | Event::MappingStart(..)) {
            if self.depth >= MAX_DEPTH {
                return Err(YamlError {
                    message: format!("lists and mappings are nested more than {MAX_DEPTH} deep"),
                    hint: Some("a pipeline file needs only a few levels; flatten the value".into()),
                    span: Span::at(mark, 1),
                });
            }
            self.depth += 1;
            let r = self.collection(ev, mark);
            self.depth -= 1;
            return r;
        }
        self.scalar(ev, mark)
    }

    fn scalar(&mut self, ev: Event, mark: Marker) -> Result<Yaml, YamlError> {
        match ev {
            Event::Scalar(value, style, _anchor, _tag) => {
                let quoted = matches!(
                    style,
                    TScalarStyle::SingleQuoted | TScalarStyle::DoubleQuoted
                );
                let len = value.chars().count() + if quoted { 2 } else { 0 };
                Ok(Yaml {
                    span: Span::at(mark, len),
                    node: Node::Scalar {
                        value,
                        plain: style == TScalarStyle::Plain,
                    },
                })
            }
            Event::Alias(_) => Err(YamlError {
                message: "YAML aliases (`*name`) are not supported in pipeline files".into(),
                hint: Some("write the value out; aliases make keys depend on distant text".into()),
                span: Span::at(mark, 1),
            }),
            other => Err(YamlError {
                message: format!("unexpected YAML event {other:?}"),
                hint: None,
                span: Span::at(mark, 1),
            }),
        }
    }

    fn collection(&mut self, ev: Event, mark: Marker) -> Result<Yaml, YamlError> {
        match ev {
            Event::SequenceStart(..) => {
                let mut items = Vec::new();
                loop {
                    let (ev, m) = self.next()?;
                    if ev == Event::SequenceEnd {
                        break;
                    }
                    items.push(self.node(ev, m)?);
                }
                Ok(Yaml {
                    node: Node::Seq(items),
                    span: Span::at(mark, 1),
                })
            }
            Event::MappingStart(..) => {
                let mut entries: Vec<(Key, Yaml)> = Vec::new();
                loop {
                    let (ev, m) = self.next()?;
                    if ev == Event::MappingEnd {
                        break;
                    }
                    let key = self.node(ev, m)?;
                    let name = match key.node {
                        Node::Scalar { value, .. } => value,
                        _ => {
                            return Err(YamlError {
                                message: format!(
                                    "mapping keys must be strings, found {}",
                                    key.type_name()
                                ),
                                hint: None,
                                span: key.span,
                            })
                        }
                    };
                    if let Some((first, _)) = entries.iter().find(|(k, _)| k.name == name) {
                        return Err(YamlError {
                            message: format!(
                                "duplicate key `{name}` (first defined at line {}, column {})",
                                first.span.line, first.span.col
                            ),
                            hint: Some(
                                "each key may appear once in a mapping; remove or rename one"
                                    .into(),
                            ),
                            span: key.span,
                        });
                    }
                    let (ev, m) = self.next()?;
                    let value = self.node(ev, m)?;
                    entries.push((
                        Key {
                            name,
                            span: key.span,
                        },
                        value,
                    ));
                }
                Ok(Yaml {
                    node: Node::Map(entries),
                    span: Span::at(mark, 1),
                })
            }
            _ => unreachable!("called for collection starts only"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let y = parse("name: x\nstages:\n  a: { kind: shell }\n").unwrap();
        let Node::Map(top) = &y.node else { panic!() };
        assert_eq!((top[1].0.span.line, top[1].0.span.col), (2, 1));
        let Node::Map(stages) = &top[1].1.node else {
            panic!()
        };
        assert_eq!((stages[0].0.span.line, stages[0].0.span.col), (3, 3));
        let Node::Map(a) = &stages[0].1.node else {
            panic!()
        };
        assert_eq!(a[0].1.as_scalar(), Some("shell"));
        assert_eq!((a[0].1.span.line, a[0].1.span.col), (3, 14));
    }

    #[test]
    fn duplicate_keys_and_aliases_are_refused() {
        let e = parse("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert!(e.message.contains("duplicate key `a`"), "{e}");
        assert_eq!((e.span.line, e.span.col), (3, 1));
        let e = parse("a: &x [1, 2]\nb: *x\n").unwrap_err();
        assert!(e.message.contains("aliases"), "{e}");
        assert_eq!(e.span.line, 2);
        let e = parse("[1]: 2\n").unwrap_err();
        assert!(e.message.contains("keys must be strings"), "{e}");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        // yaml-rust2 stops very deep input itself; between its limit and ours, ours applies.
        let e = parse(&"[".repeat(200_000)).unwrap_err();
        assert!(
            e.message.contains("recursion limit") || e.message.contains("nested more than"),
            "{e}"
        );
        let deep = format!(
            "{}1{}",
            "[".repeat(MAX_DEPTH + 1),
            "]".repeat(MAX_DEPTH + 1)
        );
        let e = parse(&deep).unwrap_err();
        assert!(e.message.contains("nested more than"), "{e}");
        let ok = format!("{}1{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(parse(&ok).is_ok());
    }

    #[test]
    fn scalars_follow_the_core_schema() {
        use serde_json::json;
        let y = parse("[1, -2, 0x10, 1.5, 1e3, true, ~, '3', abc, .inf, nan]").unwrap();
        let v = y.to_json();
        assert_eq!(v[0], json!(1));
        assert_eq!(v[1], json!(-2));
        assert_eq!(v[2], json!(16));
        assert_eq!(v[3], json!(1.5));
        assert_eq!(v[4], json!(1000.0));
        assert_eq!(v[5], json!(true));
        assert_eq!(v[6], json!(null));
        assert_eq!(v[7], json!("3"));
        assert_eq!(v[8], json!("abc"));
        // JSON has no infinity; it stays a string and the param type check refuses it.
        assert_eq!(v[9], json!(".inf"));
        assert_eq!(v[10], json!("nan"));
    }
}
