//! The one place that knows what a key is.
//!
//! Every key and tree digest is blake3 over a canonical, versioned encoding: each value starts
//! with a tag byte, strings and lists carry their length, maps are written sorted, floats are
//! written by their bits. Two different inputs therefore never encode to the same bytes, and equal
//! keys mean equal work.

use std::collections::BTreeMap;

use dag_api::Value;

/// Bumped whenever the encoding (or what goes into a key) changes.
pub const ENCODING_VERSION: u32 = 2;

const T_NULL: u8 = 0;
const T_FALSE: u8 = 1;
const T_TRUE: u8 = 2;
const T_INT: u8 = 3;
const T_UINT: u8 = 4;
const T_FLOAT: u8 = 5;
const T_STR: u8 = 6;
const T_LIST: u8 = 7;
const T_MAP: u8 = 8;
const T_BYTES: u8 = 9;

/// A canonical encoder feeding a blake3 hasher.
pub struct Encoder {
    h: blake3::Hasher,
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new("")
    }
}

impl Encoder {
    /// Starts an encoding for a purpose (`"stage-key"`, `"tree"`), so that different kinds of
    /// digest never collide.
    pub fn new(domain: &str) -> Self {
        let mut e = Encoder {
            h: blake3::Hasher::new(),
        };
        e.uint(ENCODING_VERSION as u64);
        e.str(domain);
        e
    }

    fn len(&mut self, n: usize) {
        self.h.update(&(n as u64).to_le_bytes());
    }

    /// An unsigned integer.
    pub fn uint(&mut self, v: u64) -> &mut Self {
        self.h.update(&[T_UINT]);
        self.h.update(&v.to_le_bytes());
        self
    }

    /// A string (length-prefixed).
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.h.update(&[T_STR]);
        self.len(s.len());
        self.h.update(s.as_bytes());
        self
    }

    /// Raw bytes (length-prefixed).
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.h.update(&[T_BYTES]);
        self.len(b.len());
        self.h.update(b);
        self
    }

    /// A boolean.
    pub fn bool(&mut self, b: bool) -> &mut Self {
        self.h.update(&[if b { T_TRUE } else { T_FALSE }]);
        self
    }

    /// Starts a list of `n` items; the caller writes them.
    pub fn list(&mut self, n: usize) -> &mut Self {
        self.h.update(&[T_LIST]);
        self.len(n);
        self
    }

    /// A JSON value, maps sorted by key.
    pub fn value(&mut self, v: &Value) -> &mut Self {
        match v {
            Value::Null => {
                self.h.update(&[T_NULL]);
            }
            Value::Bool(b) => {
                self.bool(*b);
            }
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    self.uint(u);
                } else if let Some(i) = n.as_i64() {
                    self.h.update(&[T_INT]);
                    self.h.update(&i.to_le_bytes());
                } else {
                    let f = n.as_f64().unwrap_or(f64::NAN);
                    self.h.update(&[T_FLOAT]);
                    self.h.update(&f.to_bits().to_le_bytes());
                }
            }
            Value::String(s) => {
                self.str(s);
            }
            Value::Array(items) => {
                self.list(items.len());
                for i in items {
                    self.value(i);
                }
            }
            Value::Object(m) => {
                let sorted: BTreeMap<&String, &Value> = m.iter().collect();
                self.map_of(sorted.into_iter(), |e, v| {
                    e.value(v);
                });
            }
        }
        self
    }

    /// A sorted map of string keys; `f` writes each value.
    pub fn map_of<'a, K: AsRef<str> + 'a, V>(
        &mut self,
        entries: impl ExactSizeIterator<Item = (K, V)>,
        mut f: impl FnMut(&mut Self, V),
    ) -> &mut Self {
        self.h.update(&[T_MAP]);
        self.len(entries.len());
        for (k, v) in entries {
            self.str(k.as_ref());
            f(self, v);
        }
        self
    }

    /// The digest, as lowercase hex.
    pub fn finish(&self) -> String {
        self.h.finalize().to_hex().to_string()
    }
}

/// Everything a stage's key depends on besides its definition: the content digests of what it
/// reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyInputs {
    /// Input name -> tree digest of the upstream artifact.
    pub inputs: BTreeMap<String, String>,
    /// Dataset name -> [`dataset_digest`].
    pub datasets: BTreeMap<String, String>,
    /// Workspace path -> content digest.
    pub workspace: BTreeMap<String, String>,
}

/// Digest of a dataset entry: its declaration plus the fingerprint (or upstream digest) of its
/// root. The root's path itself is left out so that moving a checkout keeps the keys.
pub fn dataset_digest(
    format: &str,
    classes: u32,
    extra: &dag_api::Map<String, Value>,
    root: &str,
) -> String {
    let mut e = Encoder::new("dataset");
    e.str(format)
        .uint(classes as u64)
        .value(&Value::Object(extra.clone()))
        .str(root);
    e.finish()
}

/// The cache key of one stage run.
///
/// `code` is the kind's [`dag_api::Code`]: a digest per crate it is built from. `device` is the
/// resolved device kind, or `None` for device-independent kinds ([`dag_api::Stage::device_independent`]).
pub fn stage_key(
    kind: &str,
    code: &dag_api::Code,
    params: &dag_api::Params,
    device: Option<&str>,
    seed: Option<u64>,
    parts: &KeyInputs,
) -> String {
    let mut e = Encoder::new("stage-key");
    e.str(kind);
    e.map_of(
        code.parts.iter().map(|(name, digest)| (*name, *digest)),
        |e, d| {
            e.str(d);
        },
    );
    e.map_of(params.0.iter(), |e, v| {
        e.value(v);
    });
    match device {
        // Every backend computes in f32 today; the precision is part of the key so that adding
        // half precision later invalidates nothing silently.
        Some(d) => e.str(d).str("f32"),
        None => e.str(crate::cache::ANY_DEVICE),
    };
    match seed {
        Some(s) => e.str("seed").uint(s),
        None => e.str("unseeded"),
    };
    for m in [&parts.inputs, &parts.datasets, &parts.workspace] {
        e.map_of(m.iter(), |e, v| {
            e.str(v);
        });
    }
    e.finish()
}

/// One digest of a kind's code (all its parts), for display and `dag plan --json`.
pub fn code_digest(code: &dag_api::Code) -> String {
    let mut e = Encoder::new("code");
    e.map_of(
        code.parts.iter().map(|(name, digest)| (*name, *digest)),
        |e, d| {
            e.str(d);
        },
    );
    e.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn d(v: Value) -> String {
        let mut e = Encoder::new("t");
        e.value(&v);
        e.finish()
    }

    #[test]
    fn encoding_is_unambiguous_and_canonical() {
        // Concatenation ambiguity: ["ab", "c"] vs ["a", "bc"].
        assert_ne!(d(json!(["ab", "c"])), d(json!(["a", "bc"])));
        // Type tags: 1 vs "1" vs 1.0 vs true.
        let all = [d(json!(1)), d(json!("1")), d(json!(1.0)), d(json!(true))];
        for i in 0..all.len() {
            for j in i + 1..all.len() {
                assert_ne!(all[i], all[j]);
            }
        }
        // Map order does not matter.
        let a: Value = serde_json::from_str(r#"{"x": 1, "y": 2}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"y": 2, "x": 1}"#).unwrap();
        assert_eq!(d(a), d(b));
        // Nesting: [[1], 2] vs [[1, 2]].
        assert_ne!(d(json!([[1], 2])), d(json!([[1, 2]])));
        // Domains separate digests of equal content.
        let mut e1 = Encoder::new("a");
        e1.str("x");
        let mut e2 = Encoder::new("b");
        e2.str("x");
        assert_ne!(e1.finish(), e2.finish());
    }

    #[test]
    fn stage_keys_see_every_part() {
        let params = dag_api::Params([("n".to_string(), json!(1))].into_iter().collect());
        let parts = KeyInputs::default();
        let code = dag_api::Code {
            parts: &[("dag-train", "aa"), ("dependencies", "bb")],
        };
        let base = stage_key("k", &code, &params, Some("flex"), Some(0), &parts);
        assert_eq!(
            base,
            stage_key("k", &code, &params, Some("flex"), Some(0), &parts)
        );
        for other in [
            dag_api::Code {
                parts: &[("dag-train", "ab"), ("dependencies", "bb")],
            },
            dag_api::Code {
                parts: &[("dag-train", "aa"), ("dependencies", "bc")],
            },
            dag_api::Code {
                parts: &[("dag-model", "aa"), ("dependencies", "bb")],
            },
            dag_api::Code::NONE,
        ] {
            assert_ne!(
                base,
                stage_key("k", &other, &params, Some("flex"), Some(0), &parts)
            );
        }
        assert_ne!(
            base,
            stage_key("j", &code, &params, Some("flex"), Some(0), &parts)
        );
        assert_ne!(
            base,
            stage_key("k", &code, &params, Some("cuda"), Some(0), &parts)
        );
        assert_ne!(base, stage_key("k", &code, &params, None, Some(0), &parts));
        assert_ne!(
            base,
            stage_key("k", &code, &params, Some("flex"), Some(1), &parts)
        );
        // An unseeded kind's key differs from every seeded one's.
        assert_ne!(
            base,
            stage_key("k", &code, &params, Some("flex"), None, &parts)
        );
        let p2 = dag_api::Params([("n".to_string(), json!(2))].into_iter().collect());
        assert_ne!(
            base,
            stage_key("k", &code, &p2, Some("flex"), Some(0), &parts)
        );
        let mut i = parts.clone();
        i.inputs.insert("x".into(), "d1".into());
        let a = stage_key("k", &code, &params, Some("flex"), Some(0), &i);
        i.inputs.insert("x".into(), "d2".into());
        assert_ne!(a, stage_key("k", &code, &params, Some("flex"), Some(0), &i));
        // The same digest under another part is another key.
        let mut w = KeyInputs::default();
        w.workspace.insert("x".into(), "d1".into());
        assert_ne!(a, stage_key("k", &code, &params, Some("flex"), Some(0), &w));
    }
}
