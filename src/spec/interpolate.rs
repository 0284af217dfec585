//! `${…}` references inside pipeline strings.
//!
//! | form               | allowed in        | becomes                                         |
//! |--------------------|-------------------|-------------------------------------------------|
//! | `${params.KEY}`    | inputs, with      | the parameter's value (typed if it is the whole string) |
//! | `${STAGE}`         | inputs            | another stage's whole output tree               |
//! | `${STAGE/sub/path}`| inputs            | a file or folder inside that tree               |
//! | `${inputs.NAME}`   | with              | the absolute path of a declared input           |
//! | `${out}`           | with              | the stage's own output directory                |
//!
//! `$${` writes a literal `${`. Parameters are substituted when the file is loaded; `inputs`
//! and `out` only when the stage runs, so fingerprints never contain absolute paths.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

/// One reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ref {
    Param(String),
    Input(String),
    Out,
    Stage { name: String, sub: Option<String> },
}

/// A string split into literal text and references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Ref(Ref),
}

/// Splits `s` into pieces; the error says what is malformed.
pub fn parse(s: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        text.push_str(&rest[..i]);
        let after = &rest[i..];
        if let Some(after_escape) = after.strip_prefix("$${") {
            text.push_str("${");
            rest = after_escape;
        } else if let Some(body) = after.strip_prefix("${") {
            let end = body
                .find('}')
                .ok_or_else(|| format!("unclosed `${{` in `{s}`"))?;
            let inner = body[..end].trim();
            if !text.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut text)));
            }
            pieces.push(Piece::Ref(parse_ref(inner)?));
            rest = &body[end + 1..];
        } else {
            text.push('$');
            rest = &after[1..];
        }
    }
    text.push_str(rest);
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

fn parse_ref(inner: &str) -> Result<Ref, String> {
    if inner.is_empty() {
        return Err("empty reference `${}`".into());
    }
    if inner == "out" {
        return Ok(Ref::Out);
    }
    if let Some(key) = inner.strip_prefix("params.") {
        return if key.is_empty() {
            Err("`${params.}` names no parameter".into())
        } else {
            Ok(Ref::Param(key.into()))
        };
    }
    if let Some(name) = inner.strip_prefix("inputs.") {
        return if name.is_empty() {
            Err("`${inputs.}` names no input".into())
        } else {
            Ok(Ref::Input(name.into()))
        };
    }
    let (name, sub) = match inner.split_once('/') {
        Some((n, s)) => (n, Some(s.trim_matches('/'))),
        None => (inner, None),
    };
    if !is_stage_name(name) {
        return Err(format!(
            "`${{{inner}}}` is not a reference: use `${{params.KEY}}`, `${{inputs.NAME}}`, `${{out}}` or `${{STAGE}}`"
        ));
    }
    if let Some(sub) = sub
        && sub.split('/').any(|seg| seg == ".." || seg == ".")
    {
        return Err(format!(
            "`${{{inner}}}`: `.` and `..` are not allowed in a stage path"
        ));
    }
    Ok(Ref::Stage {
        name: name.into(),
        sub: sub.filter(|s| !s.is_empty()).map(str::to_string),
    })
}

/// Stage names are `[a-z0-9_]+`.
pub fn is_stage_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Looks up a dotted parameter key (`a.b` reads `params.a.b`).
pub fn lookup_param<'a>(
    params: &'a serde_json::Map<String, Value>,
    key: &str,
) -> Option<&'a Value> {
    let mut parts = key.split('.');
    let mut cur = params.get(parts.next()?)?;
    for part in parts {
        cur = cur.as_object()?.get(part)?;
    }
    Some(cur)
}

/// A scalar as it appears inside a larger string.
pub fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Null => Some(String::new()),
        _ => None,
    }
}

/// A problem found while walking a value, located by its key path below the walked root.
pub struct WalkError {
    pub path: String,
    pub message: String,
    pub help: Option<String>,
}

/// Walks every string in `value`, calling `f(path, string)`; `f` returns the replacement.
pub fn map_strings(
    value: &Value,
    path: &str,
    f: &mut dyn FnMut(&str, &str) -> Result<Value, WalkError>,
) -> Result<Value, WalkError> {
    Ok(match value {
        Value::String(s) => f(path, s)?,
        Value::Array(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| map_strings(v, &format!("{path}[{i}]"), f))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map {
                let child = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                out.insert(k.clone(), map_strings(v, &child, f)?);
            }
            Value::Object(out)
        }
        other => other.clone(),
    })
}

/// Replaces `${inputs.NAME}` and `${out}` with real paths (run time). Parameters are already
/// substituted; any other reference was rejected at load time.
pub fn resolve_paths(
    value: &Value,
    inputs: &BTreeMap<String, std::path::PathBuf>,
    out: &Path,
) -> Value {
    let mut f = |_: &str, s: &str| -> Result<Value, WalkError> {
        let Ok(pieces) = parse(s) else {
            return Ok(Value::String(s.to_string()));
        };
        let mut text = String::new();
        for piece in pieces {
            match piece {
                Piece::Text(t) => text.push_str(&t),
                Piece::Ref(Ref::Out) => text.push_str(&out.to_string_lossy()),
                Piece::Ref(Ref::Input(name)) => {
                    if let Some(p) = inputs.get(&name) {
                        text.push_str(&p.to_string_lossy());
                    }
                }
                Piece::Ref(Ref::Param(k)) => text.push_str(&format!("${{params.{k}}}")),
                Piece::Ref(Ref::Stage { name, .. }) => text.push_str(&format!("${{{name}}}")),
            }
        }
        Ok(Value::String(text))
    };
    map_strings(value, "", &mut f).unwrap_or_else(|_| value.clone())
}

/// Re-escapes literal `${` so a substituted parameter value is not parsed again.
pub fn escape(text: &str) -> String {
    text.replace("${", "$${")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_and_text_are_split() {
        let p = parse("python3 ${inputs.script} ${params.n} > ${out}/x $5 $${HOME}").unwrap();
        assert_eq!(
            p,
            vec![
                Piece::Text("python3 ".into()),
                Piece::Ref(Ref::Input("script".into())),
                Piece::Text(" ".into()),
                Piece::Ref(Ref::Param("n".into())),
                Piece::Text(" > ".into()),
                Piece::Ref(Ref::Out),
                Piece::Text("/x $5 ${HOME}".into()),
            ]
        );
    }

    #[test]
    fn stage_references_take_a_sub_path() {
        assert_eq!(
            parse("${numbers/data/n.txt}").unwrap(),
            vec![Piece::Ref(Ref::Stage {
                name: "numbers".into(),
                sub: Some("data/n.txt".into())
            })]
        );
        assert!(parse("${numbers/../etc}").is_err());
        assert!(parse("${Numbers}").is_err());
        assert!(parse("${oops").is_err());
    }

    #[test]
    fn paths_are_resolved_at_run_time() {
        let inputs = BTreeMap::from([("a".to_string(), std::path::PathBuf::from("/c/a"))]);
        let v = resolve_paths(
            &serde_json::json!({"run": "x ${inputs.a} ${out}/y $${z}"}),
            &inputs,
            Path::new("/o"),
        );
        assert_eq!(v, serde_json::json!({"run": "x /c/a /o/y ${z}"}));
    }
}
