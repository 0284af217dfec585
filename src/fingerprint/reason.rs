//! Why a stage must run: typed reasons with old → new values, turned into words in one place
//! ([`MissReason`]'s `Display`). `status`, `run --dry-run`, the run log and `--json` all print
//! these same words.

use std::collections::BTreeSet;
use std::fmt;

use serde_json::Value;

use super::{Ingredients, Origin};

/// One reason a stage's cached result cannot be used.
#[derive(Debug, Clone, PartialEq)]
pub enum MissReason {
    /// No result was ever committed for this stage of this pipeline.
    NoRecord,
    /// The last result for these exact ingredients was removed (`cache gc`, `cache verify --repair`).
    RecordRemoved,
    /// `--force` / `--force-all`.
    Forced,
    /// The committed output failed verification.
    OutputDamaged {
        detail: String,
    },
    SchemaChanged {
        old: u32,
        new: u32,
    },
    KindChanged {
        old: String,
        new: String,
    },
    KindVersionChanged {
        kind: String,
        old: u32,
        new: u32,
    },
    ParamChanged {
        name: String,
        old: Option<Value>,
        new: Option<Value>,
    },
    ConfigChanged {
        key: String,
        old: Option<Value>,
        new: Option<Value>,
    },
    InputChanged {
        name: String,
        path: String,
    },
    InputAdded {
        name: String,
    },
    InputRemoved {
        name: String,
    },
    UpstreamChanged {
        input: String,
        stage: String,
    },
    /// Status only: an upstream stage must run first, so this one's key is not known yet.
    UpstreamPending {
        stage: String,
    },
}

impl fmt::Display for MissReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use MissReason::*;
        match self {
            NoRecord => write!(f, "no record (never ran)"),
            RecordRemoved => write!(f, "cached result was removed"),
            Forced => write!(f, "forced"),
            OutputDamaged { detail } => write!(f, "cached output is damaged ({detail})"),
            SchemaChanged { old, new } => write!(f, "fingerprint schema {old} → {new}"),
            KindChanged { old, new } => write!(f, "kind `{old}` → `{new}`"),
            KindVersionChanged { kind, old, new } => {
                write!(f, "kind `{kind}` version {old} → {new}")
            }
            ParamChanged { name, old, new } => {
                write!(f, "param `{name}` {} → {}", show(old), show(new))
            }
            ConfigChanged { key, old, new } => {
                let (a, b) = show_pair(old, new);
                write!(f, "{key} {a} → {b}")
            }
            InputChanged { name, path } => write!(f, "input `{name}` changed ({path})"),
            InputAdded { name } => write!(f, "input `{name}` added"),
            InputRemoved { name } => write!(f, "input `{name}` removed"),
            UpstreamChanged { input, stage } if input == stage => {
                write!(f, "upstream `{stage}` output changed")
            }
            UpstreamChanged { input, stage } => {
                write!(f, "upstream `{stage}` output changed (input `{input}`)")
            }
            UpstreamPending { stage } => write!(f, "upstream `{stage}` must run first"),
        }
    }
}

/// A value in a reason: JSON, shortened to keep a reason on one line.
fn show(v: &Option<Value>) -> String {
    const MAX: usize = 48;
    match v {
        None => "(unset)".into(),
        Some(v) => {
            let s = serde_json::to_string(v).unwrap_or_default();
            if s.chars().count() > MAX {
                let cut: String = s.chars().take(MAX - 1).collect();
                format!("{cut}…")
            } else {
                s
            }
        }
    }
}

/// Two long strings that differ somewhere in the middle: show the part around the change.
fn show_pair(old: &Option<Value>, new: &Option<Value>) -> (String, String) {
    const MAX: usize = 48;
    const CONTEXT: usize = 12;
    let (Some(Value::String(a)), Some(Value::String(b))) = (old, new) else {
        return (show(old), show(new));
    };
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    if a.len().max(b.len()) + 2 <= MAX {
        return (show(old), show(new));
    }
    let prefix = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let suffix = a[prefix..]
        .iter()
        .rev()
        .zip(b[prefix..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let window = |s: &[char]| {
        let start = prefix.saturating_sub(CONTEXT);
        let end = (s.len() - suffix + CONTEXT).min(s.len()).max(start);
        let mut text: String = s[start..end].iter().collect();
        if text.chars().count() > MAX - 4 {
            text = text.chars().take(MAX - 5).collect::<String>() + "…";
        }
        let head = if start > 0 { "…" } else { "" };
        let tail = if end < s.len() { "…" } else { "" };
        format!("\"{head}{text}{tail}\"")
    };
    (window(&a), window(&b))
}

/// The differences between the ingredients of the last committed result (`old`) and now.
pub fn explain(old: &Ingredients, new: &Ingredients) -> Vec<MissReason> {
    let mut out = Vec::new();
    if old.schema != new.schema {
        // Configs of another scheme are not comparable key by key; the scheme is the reason.
        out.push(MissReason::SchemaChanged {
            old: old.schema,
            new: new.schema,
        });
        return out;
    }
    if old.kind != new.kind {
        out.push(MissReason::KindChanged {
            old: old.kind.clone(),
            new: new.kind.clone(),
        });
    } else if old.kind_version != new.kind_version {
        out.push(MissReason::KindVersionChanged {
            kind: new.kind.clone(),
            old: old.kind_version,
            new: new.kind_version,
        });
    }
    // A parameter no longer read is no cause by itself: the `with:` text that stopped reading
    // it is, and is shown below. One newly read shows its value.
    for (name, value) in &new.params {
        let (a, b) = (old.params.get(name), Some(value));
        if a != b {
            out.push(MissReason::ParamChanged {
                name: name.clone(),
                old: a.cloned(),
                new: b.cloned(),
            });
        }
    }
    // What the user changed: a parameter (above) or the text of `with:`. When neither did and
    // the key still moved, a default or preset of the kind changed: show the values.
    let before = out.len();
    diff_config("with", Some(&old.written), Some(&new.written), &mut out);
    if out.len() == before
        && !out
            .iter()
            .any(|r| matches!(r, MissReason::ParamChanged { .. }))
    {
        diff_config("with", Some(&old.config), Some(&new.config), &mut out);
    }
    let inputs: BTreeSet<&String> = old.inputs.keys().chain(new.inputs.keys()).collect();
    for name in inputs {
        match (old.inputs.get(name), new.inputs.get(name)) {
            (None, Some(b)) => out.push(MissReason::InputAdded {
                name: input_label(name, &b.origin),
            }),
            (Some(a), None) => out.push(MissReason::InputRemoved {
                name: input_label(name, &a.origin),
            }),
            (Some(a), Some(b)) if a.digest != b.digest => out.push(match &b.origin {
                Origin::Stage { stage, .. } => MissReason::UpstreamChanged {
                    input: input_label(name, &b.origin),
                    stage: stage.clone(),
                },
                Origin::Project { path } => MissReason::InputChanged {
                    name: name.clone(),
                    path: path.clone(),
                },
            }),
            _ => {}
        }
    }
    out
}

/// How an input is named in a reason: by its name, or — for an upstream output, named by
/// position (`@0`) — by the stage (`numbers`) or the reference (`${numbers/x.txt}`) it reads.
fn input_label(name: &str, origin: &Origin) -> String {
    match origin {
        Origin::Stage { stage, sub } if name.starts_with('@') => match sub {
            Some(s) => format!("${{{stage}/{s}}}"),
            None => stage.clone(),
        },
        _ => name.to_string(),
    }
}

/// Leaf-level differences of two config trees, as `with.a.b` keys.
fn diff_config(key: &str, old: Option<&Value>, new: Option<&Value>, out: &mut Vec<MissReason>) {
    match (old, new) {
        (Some(Value::Object(a)), Some(Value::Object(b))) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                diff_config(&format!("{key}.{k}"), a.get(k), b.get(k), out);
            }
        }
        (a, b) if a != b => out.push(MissReason::ConfigChanged {
            key: key.to_string(),
            old: a.cloned(),
            new: b.cloned(),
        }),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::{InputIngredient, SCHEMA_VERSION};
    use super::*;

    fn ing(n: i64, run: &str, script: &str, up: &str) -> Ingredients {
        Ingredients {
            schema: SCHEMA_VERSION,
            kind: "command".into(),
            kind_version: 1,
            config: serde_json::json!({"run": run, "env": {"A": "1"}, "shell": true}),
            written: serde_json::json!({"run": run, "env": {"A": "1"}}),
            params: BTreeMap::from([("n".into(), Value::from(n))]),
            inputs: BTreeMap::from([
                (
                    "script".into(),
                    InputIngredient {
                        digest: script.into(),
                        origin: Origin::Project {
                            path: "gen.py".into(),
                        },
                    },
                ),
                (
                    "numbers".into(),
                    InputIngredient {
                        digest: up.into(),
                        origin: Origin::Stage {
                            stage: "numbers".into(),
                            sub: None,
                        },
                    },
                ),
            ]),
        }
    }

    fn words(old: &Ingredients, new: &Ingredients) -> Vec<String> {
        explain(old, new).iter().map(ToString::to_string).collect()
    }

    #[test]
    fn each_change_is_named_with_old_and_new_values() {
        let a = ing(1000, "python3 x", "s1", "u1");
        assert!(words(&a, &a).is_empty());
        assert_eq!(
            words(&a, &ing(2000, "python3 x", "s1", "u1")),
            vec!["param `n` 1000 → 2000"]
        );
        assert_eq!(
            words(&a, &ing(1000, "python3 y", "s1", "u1")),
            vec![r#"with.run "python3 x" → "python3 y""#]
        );
        assert_eq!(
            words(&a, &ing(1000, "python3 x", "s2", "u1")),
            vec!["input `script` changed (gen.py)"]
        );
        assert_eq!(
            words(&a, &ing(1000, "python3 x", "s1", "u2")),
            vec!["upstream `numbers` output changed"]
        );
        let mut v2 = a.clone();
        v2.kind_version = 2;
        assert_eq!(words(&a, &v2), vec!["kind `command` version 1 → 2"]);
    }

    #[test]
    fn added_and_removed_keys_read_as_unset() {
        let a = ing(1, "r", "s", "u");
        let mut b = a.clone();
        b.written["shell"] = Value::Bool(false);
        b.config["shell"] = Value::Bool(false);
        b.inputs.remove("script");
        assert_eq!(
            words(&a, &b),
            vec!["with.shell (unset) → false", "input `script` removed"]
        );
    }

    #[test]
    fn a_default_or_preset_changed_in_the_kind_shows_the_values_it_now_runs_with() {
        let a = ing(1, "r", "s", "u");
        let mut b = a.clone();
        b.config["shell"] = Value::Bool(false);
        assert_eq!(words(&a, &b), vec!["with.shell true → false"]);
        // A change the user made is named as written, not again as its normalised value.
        let mut c = a.clone();
        c.written["run"] = Value::from("q");
        c.config["run"] = Value::from("q");
        assert_eq!(words(&a, &c), vec![r#"with.run "r" → "q""#]);
    }

    #[test]
    fn another_schema_is_the_only_reason_given() {
        let mut old = ing(1, "r", "s", "u");
        old.schema = SCHEMA_VERSION - 1;
        old.written = Value::Null;
        let new = ing(2, "q", "t", "v");
        assert_eq!(
            words(&old, &new),
            vec![format!(
                "fingerprint schema {} → {SCHEMA_VERSION}",
                SCHEMA_VERSION - 1
            )]
        );
    }

    #[test]
    fn long_strings_show_where_they_differ() {
        let r = MissReason::ConfigChanged {
            key: "with.run".into(),
            old: Some(Value::String(
                "python3 ${inputs.script} ${inputs.numbers}/numbers.txt ${out}/total.txt".into(),
            )),
            new: Some(Value::String(
                "python3 ${inputs.script} ${inputs.numbers}/numbers.txt ${out}/sum.txt".into(),
            )),
        };
        assert_eq!(
            r.to_string(),
            r#"with.run "….txt ${out}/total.txt" → "….txt ${out}/sum.txt""#
        );
    }

    #[test]
    fn long_values_are_shortened() {
        let long = "x".repeat(200);
        let r = MissReason::ConfigChanged {
            key: "with.run".into(),
            old: None,
            new: Some(Value::String(long)),
        };
        assert!(r.to_string().chars().count() < 80, "{r}");
        assert!(r.to_string().ends_with('…'));
    }
}
