//! `${…}` references inside pipeline strings.
//!
//! | form               | allowed in        | becomes                                         |
//! |--------------------|-------------------|-------------------------------------------------|
//! | `${params.KEY}`    | inputs, with      | the parameter's value (typed if it is the whole string) |
//! | `${STAGE}`         | inputs, with      | another stage's whole output tree (an upstream)  |
//! | `${STAGE/sub/path}`| inputs, with      | a file or folder inside that tree               |
//! | `${STAGE@SEL}`     | inputs, with      | elements of a matrix stage ([`super::matrix`])  |
//! | `${inputs.NAME}`   | with              | the absolute path of a declared input           |
//! | `${out}`           | with              | the stage's own output directory                |
//! | `${matrix.AXIS}`   | a matrix stage    | the element's value on that axis (`:name`: its label) |
//!
//! `$${` writes a literal `${`. Parameters and matrix values are substituted when the file is
//! loaded; stage references become inputs of the stage; `inputs` and `out` are bound only when
//! the stage runs, so fingerprints never contain absolute paths.
//!
//! In a command line (a key a kind lists in `StageKind::shell_keys`, e.g. `run:` of a
//! `command` stage) every substituted value is **one literal piece of shell text**, quoted for
//! the place it lands in ([`ShellQuoting`]): bare (`'it'\''s; rm x'`), inside `'…'` or inside
//! `"…"`. A value can never end a quote, start a command or expand `$(…)`. `${params.KEY:raw}`
//! inserts a parameter's text as it is, for a value meant to be shell syntax (a list of flags).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

/// One reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ref {
    Param(String),
    /// `${params.KEY:raw}`: the value's text unquoted, even in a command line.
    RawParam(String),
    Input(String),
    Out,
    Stage {
        name: String,
        /// `@…` after the name: which elements of a matrix stage.
        select: Option<Select>,
        sub: Option<String>,
    },
    /// `${matrix.AXIS}` (the value) or `${matrix.AXIS:name}` (the label).
    Matrix {
        axis: String,
        label: bool,
    },
}

/// The elements a reference picks from a matrix stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Select {
    /// `@*`: every element (that agrees with the referring element on shared axes).
    All,
    /// `@axis=label,…`: the elements with these labels (the rest as for `@*`).
    Pick(Vec<(String, String)>),
}

impl std::fmt::Display for Select {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Select::All => f.write_str("*"),
            Select::Pick(kv) => {
                let parts: Vec<String> = kv.iter().map(|(k, v)| format!("{k}={v}")).collect();
                f.write_str(&parts.join(","))
            }
        }
    }
}

impl std::fmt::Display for Ref {
    /// The reference as it is written, `${…}` included.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ref::Param(k) => write!(f, "${{params.{k}}}"),
            Ref::RawParam(k) => write!(f, "${{params.{k}:raw}}"),
            Ref::Input(n) => write!(f, "${{inputs.{n}}}"),
            Ref::Out => f.write_str("${out}"),
            Ref::Stage { name, select, sub } => {
                write!(f, "${{{name}")?;
                if let Some(s) = select {
                    write!(f, "@{s}")?;
                }
                if let Some(s) = sub {
                    write!(f, "/{s}")?;
                }
                f.write_str("}")
            }
            Ref::Matrix { axis, label } => {
                write!(f, "${{matrix.{axis}{}}}", if *label { ":name" } else { "" })
            }
        }
    }
}

/// Pieces back to the text they were parsed from (literal `${` escaped again).
pub fn unparse(pieces: &[Piece]) -> String {
    let mut out = String::new();
    for p in pieces {
        match p {
            Piece::Text(t) => out.push_str(&escape(t)),
            Piece::Ref(r) => out.push_str(&r.to_string()),
        }
    }
    out
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
        let (key, raw) = match key.strip_suffix(":raw") {
            Some(k) => (k.trim_end(), true),
            None => (key, false),
        };
        return if key.is_empty() {
            Err("`${params.}` names no parameter".into())
        } else if key.contains(':') {
            Err(format!(
                "`${{{inner}}}`: the only form with `:` is `${{params.KEY:raw}}`"
            ))
        } else if raw {
            Ok(Ref::RawParam(key.into()))
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
    if let Some(axis) = inner.strip_prefix("matrix.") {
        let (axis, label) = match axis.strip_suffix(":name") {
            Some(a) => (a.trim_end(), true),
            None => (axis, false),
        };
        return if !is_stage_name(axis) {
            Err(format!(
                "`${{{inner}}}`: write `${{matrix.AXIS}}` or `${{matrix.AXIS:name}}`"
            ))
        } else {
            Ok(Ref::Matrix {
                axis: axis.into(),
                label,
            })
        };
    }
    let (name, sub) = match inner.split_once('/') {
        Some((n, s)) => (n, Some(s.trim_matches('/'))),
        None => (inner, None),
    };
    let (name, select) = match name.split_once('@') {
        Some((n, sel)) => (n, Some(parse_select(inner, sel)?)),
        None => (name, None),
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
        select,
        sub: sub.filter(|s| !s.is_empty()).map(str::to_string),
    })
}

fn parse_select(inner: &str, sel: &str) -> Result<Select, String> {
    let sel = sel.trim();
    if sel == "*" {
        return Ok(Select::All);
    }
    let bad = || {
        format!(
            "`${{{inner}}}`: after `@` write `*` or `axis=label,…` (e.g. `@variant=cusa,seed=1`)"
        )
    };
    let mut picks: Vec<(String, String)> = Vec::new();
    for part in sel.split(',') {
        let (k, v) = part.split_once('=').ok_or_else(bad)?;
        let (k, v) = (k.trim(), v.trim());
        if !is_stage_name(k) || !is_label(v) {
            return Err(bad());
        }
        if picks.iter().any(|(a, _)| a == k) {
            return Err(format!("`${{{inner}}}` picks axis `{k}` twice"));
        }
        picks.push((k.into(), v.into()));
    }
    Ok(Select::Pick(picks))
}

/// A matrix label (`cusa`, `0`, `1e-3`, `0.5`): letters, digits and `_ . + -`, so that an
/// element's name reads back unambiguously and is safe in a path and a shell word.
pub fn is_label(label: &str) -> bool {
    !label.is_empty()
        && label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.+-".contains(c))
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

/// Replaces `${inputs.NAME}` and `${out}` with real paths (run time), quoted as shell words in
/// the `shell_keys` (a project folder may have a space in its name). Parameters are already
/// substituted; any other reference was rejected at load time.
pub fn resolve_paths(
    value: &Value,
    inputs: &BTreeMap<String, std::path::PathBuf>,
    out: &Path,
    shell_keys: &[&str],
) -> Value {
    let mut f = |key_path: &str, s: &str| -> Result<Value, WalkError> {
        let Ok(pieces) = parse(s) else {
            return Ok(Value::String(s.to_string()));
        };
        let mut shell = shell_keys.contains(&key_path).then(ShellQuoting::default);
        let put = |text: &mut String, value: &str, shell: &Option<ShellQuoting>| match shell {
            Some(q) => text.push_str(&q.quote(value)),
            None => text.push_str(value),
        };
        let mut text = String::new();
        for piece in pieces {
            match piece {
                Piece::Text(t) => {
                    if let Some(q) = &mut shell {
                        q.feed(&t);
                    }
                    text.push_str(&t)
                }
                Piece::Ref(Ref::Out) => put(&mut text, &out.to_string_lossy(), &shell),
                Piece::Ref(Ref::Input(name)) => {
                    if let Some(p) = inputs.get(&name) {
                        put(&mut text, &p.to_string_lossy(), &shell);
                    }
                }
                Piece::Ref(Ref::Param(k)) => text.push_str(&format!("${{params.{k}}}")),
                Piece::Ref(Ref::RawParam(k)) => text.push_str(&format!("${{params.{k}:raw}}")),
                Piece::Ref(r @ (Ref::Stage { .. } | Ref::Matrix { .. })) => {
                    text.push_str(&r.to_string())
                }
            }
        }
        Ok(Value::String(text))
    };
    map_strings(value, "", &mut f).unwrap_or_else(|_| value.clone())
}

/// Where a value substituted into a POSIX shell command line lands, found by reading the
/// literal text before it: bare, inside `'…'`, or inside `"…"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum ShellContext {
    #[default]
    Bare,
    Single,
    Double,
}

/// Follows the quoting of a command line's literal text, and quotes a value for the place it
/// lands in so that the shell (`sh -c`) or the POSIX word splitting of `shell: false` reads it
/// back as exactly that text, one piece of one word.
#[derive(Debug, Clone, Copy, Default)]
pub struct ShellQuoting {
    context: ShellContext,
    /// The last character fed was an unconsumed backslash (bare or in double quotes).
    escaping: bool,
}

impl ShellQuoting {
    /// Reads literal text of the command line, as the shell will see it.
    pub fn feed(&mut self, text: &str) {
        for c in text.chars() {
            if self.escaping {
                self.escaping = false;
                continue;
            }
            self.context = match (self.context, c) {
                (ShellContext::Bare | ShellContext::Double, '\\') => {
                    self.escaping = true;
                    self.context
                }
                (ShellContext::Bare, '\'') => ShellContext::Single,
                (ShellContext::Bare, '"') => ShellContext::Double,
                (ShellContext::Single, '\'') | (ShellContext::Double, '"') => ShellContext::Bare,
                (context, _) => context,
            };
        }
    }

    /// `value` as shell text that reads back as `value` here (the quoting state is unchanged
    /// after it).
    pub fn quote(&self, value: &str) -> String {
        match self.context {
            ShellContext::Bare => {
                let safe = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
                if !value.is_empty() && value.chars().all(safe) {
                    value.to_string()
                } else {
                    format!("'{}'", value.replace('\'', "'\\''"))
                }
            }
            ShellContext::Single => value.replace('\'', "'\\''"),
            ShellContext::Double => {
                let mut out = String::with_capacity(value.len());
                for c in value.chars() {
                    if matches!(c, '\\' | '"' | '$' | '`') {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out
            }
        }
    }
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
                select: None,
                sub: Some("data/n.txt".into())
            })]
        );
        let r = parse("${train@variant=cusa,seed=1/metrics.json}").unwrap();
        assert_eq!(
            r,
            vec![Piece::Ref(Ref::Stage {
                name: "train".into(),
                select: Some(Select::Pick(vec![
                    ("variant".into(), "cusa".into()),
                    ("seed".into(), "1".into())
                ])),
                sub: Some("metrics.json".into())
            })]
        );
        assert_eq!(unparse(&r), "${train@variant=cusa,seed=1/metrics.json}");
        assert_eq!(
            parse("${train@*}").unwrap(),
            vec![Piece::Ref(Ref::Stage {
                name: "train".into(),
                select: Some(Select::All),
                sub: None
            })]
        );
        assert!(parse("${train@seed}").is_err());
        assert!(parse("${train@seed=1,seed=2}").is_err());
        assert!(parse("${train@seed=a b}").is_err());
        assert_eq!(
            parse("x ${matrix.seed} ${matrix.variant:name} $${y}").map(|p| unparse(&p)),
            Ok("x ${matrix.seed} ${matrix.variant:name} $${y}".to_string())
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
            &[],
        );
        assert_eq!(v, serde_json::json!({"run": "x /c/a /o/y ${z}"}));
    }

    #[test]
    fn paths_in_a_command_line_are_quoted_where_they_land() {
        let inputs = BTreeMap::from([("a".to_string(), std::path::PathBuf::from("/my data/it's"))]);
        let v = resolve_paths(
            &serde_json::json!({"run": "x ${inputs.a} \"${out}/y\" '${inputs.a}'", "env": "${out}"}),
            &inputs,
            Path::new("/o o"),
            &["run"],
        );
        assert_eq!(
            v,
            serde_json::json!({
                "run": "x '/my data/it'\\''s' \"/o o/y\" '/my data/it'\\''s'",
                "env": "/o o"
            })
        );
    }

    #[test]
    fn raw_parameters_are_parsed() {
        assert_eq!(
            parse("${params.flags:raw}").unwrap(),
            vec![Piece::Ref(Ref::RawParam("flags".into()))]
        );
        assert!(parse("${params.flags:q}").is_err());
    }

    /// What `sh -c 'printf %s VALUE-AS-QUOTED'` prints must be the value, in every context.
    #[test]
    fn quoted_values_read_back_through_a_real_shell() {
        let nasty = [
            "plain",
            "",
            "two words",
            "x; touch /tmp/pwned",
            "$(id)",
            "`id`",
            "it's",
            "say \"hi\"",
            "back\\slash",
            "'; echo '",
            "\"; echo \"",
            "a\nb",
            "${HOME}",
            "*",
        ];
        for value in nasty {
            for (before, after) in [("", ""), ("'", "'"), ("\"", "\""), ("pre-", "-post")] {
                let mut q = ShellQuoting::default();
                q.feed(&format!("printf %s {before}"));
                let line = format!("printf %s {before}{}{after}", q.quote(value));
                let out = std::process::Command::new("sh")
                    .args(["-c", &line])
                    .current_dir(std::env::temp_dir())
                    .output()
                    .unwrap();
                let want = match before {
                    "pre-" => format!("pre-{value}-post"),
                    _ => value.to_string(),
                };
                assert_eq!(String::from_utf8_lossy(&out.stdout), want, "{line}");
                // `shell: false` splits with the same rules.
                let words = shlex::split(&line).expect("balanced");
                assert_eq!(words.len(), 3, "{line}: {words:?}");
                assert_eq!(words[2], want, "{line}");
            }
        }
    }
}
