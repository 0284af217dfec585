//! Matrix stages: one stage written, one stage per combination of axis values run.
//!
//! ```yaml
//! train:
//!   kind: train
//!   matrix:
//!     variant: {base: {base: infonce}, cusa: {base: infonce, csa: {alpha: 2}, usa: {beta: 2}}}
//!     seed: [0, 1, 2]
//!   with: {loss: "${matrix.variant}", seed: "${matrix.seed}", …}
//! ```
//!
//! An axis is a list of scalars (each its own label) or a mapping label → value (any value: a
//! whole `loss:` block), or `${params.KEY}` naming such a parameter. The stage expands into one
//! **element** per combination, named `train@variant=cusa,seed=1` (axes in declared order,
//! elements in the order of the product, first axis outermost); `${matrix.AXIS}` is the
//! element's value (typed when it is the whole string), `${matrix.AXIS:name}` its label.
//!
//! Invariants: every element is an ordinary stage afterwards (own fingerprint, cache entry,
//! explanation); an element's name reads back to its stage and labels; labels are
//! [`is_label`] text, unique per axis; no axis is empty.
//!
//! References ([`Universe::resolve`]): from an element, `${train}` is the element of `train`
//! that agrees on every axis of `train` (each must be an axis of the referring stage);
//! `${train@*}` every element agreeing on the shared axes (a list);
//! `${train@variant=cusa}` picks labels, the open axes make it a list, none make it one element.

use std::collections::BTreeMap;

use serde_json::Value;

use super::interpolate::{self, Piece, Ref, Select, is_label, is_stage_name};

/// The most elements one matrix stage may expand into (a typo like `seed: ${params.big_list}`
/// should not schedule a million stages).
pub const MAX_ELEMENTS: usize = 4096;

/// One axis: labels and their values, in declared order.
#[derive(Debug, Clone)]
pub struct Axis {
    pub name: String,
    pub labels: Vec<String>,
    pub values: Vec<Value>,
}

/// A stage's matrix, axes in declared order.
#[derive(Debug, Clone)]
pub struct Matrix {
    pub axes: Vec<Axis>,
}

/// One element of a matrix stage: the stage as written and a label per axis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// The stage's name as written (`train`).
    pub stage: String,
    /// `(axis, label)` in the matrix's axis order.
    pub labels: Vec<(String, String)>,
}

/// `{"stage": "train", "labels": {"variant": "cusa", "seed": "1"}}` in JSON outputs.
impl serde::Serialize for Element {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let labels: serde_json::Map<String, Value> = self
            .labels
            .iter()
            .map(|(a, l)| (a.clone(), Value::String(l.clone())))
            .collect();
        serde_json::json!({"stage": self.stage, "labels": labels}).serialize(s)
    }
}

impl Element {
    /// `train@variant=cusa,seed=1`.
    pub fn name(&self) -> String {
        let parts: Vec<String> = self
            .labels
            .iter()
            .map(|(a, l)| format!("{a}={l}"))
            .collect();
        format!("{}@{}", self.stage, parts.join(","))
    }

    pub fn label(&self, axis: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(a, _)| a == axis)
            .map(|(_, l)| l.as_str())
    }

    /// The labels of every axis but `axis`, as `variant=cusa` (the row of a table over `axis`).
    pub fn without(&self, axis: &str) -> String {
        let parts: Vec<String> = self
            .labels
            .iter()
            .filter(|(a, _)| a != axis)
            .map(|(a, l)| format!("{a}={l}"))
            .collect();
        parts.join(",")
    }
}

/// A problem in a matrix or a reference, located by the caller.
#[derive(Debug)]
pub struct MatrixError {
    /// Key path below the stage (`matrix.seed`), empty for the stage itself.
    pub path: String,
    pub message: String,
    pub help: Option<String>,
}

fn error(path: &str, message: impl Into<String>, help: Option<String>) -> MatrixError {
    MatrixError {
        path: path.to_string(),
        message: message.into(),
        help,
    }
}

impl Matrix {
    /// Parses `matrix:` (parameters already looked up by `param`).
    pub fn parse(v: &Value, param: &dyn Fn(&str) -> Option<Value>) -> Result<Matrix, MatrixError> {
        let Value::Object(map) = v else {
            return Err(error(
                "matrix",
                "`matrix:` must map axis names to their values",
                Some("e.g. `matrix: {variant: [base, cusa], seed: [0, 1, 2]}`".into()),
            ));
        };
        if map.is_empty() {
            return Err(error(
                "matrix",
                "`matrix:` has no axes",
                Some("give at least one axis, e.g. `seed: [0, 1, 2]`, or remove `matrix:`".into()),
            ));
        }
        let mut axes = Vec::new();
        let mut total: usize = 1;
        for (name, values) in map {
            let path = format!("matrix.{name}");
            if !is_stage_name(name) {
                return Err(error(
                    &path,
                    format!("`{name}` is not a valid axis name"),
                    Some("axis names use lowercase letters, digits and `_`".into()),
                ));
            }
            let resolved;
            let values = match values {
                Value::String(s) => match interpolate::parse(s).as_deref() {
                    Ok([Piece::Ref(Ref::Param(key))]) => {
                        resolved = param(key).ok_or_else(|| {
                            error(&path, format!("unknown parameter `{key}`"), None)
                        })?;
                        &resolved
                    }
                    _ => values,
                },
                _ => values,
            };
            let (labels, values): (Vec<String>, Vec<Value>) = match values {
                Value::Array(items) => {
                    let mut labels = Vec::new();
                    for (i, item) in items.iter().enumerate() {
                        let label = match item {
                            Value::Object(_) | Value::Array(_) | Value::Null => {
                                return Err(error(
                                    &format!("{path}[{i}]"),
                                    format!(
                                        "axis `{name}`: a list holds labels (text or numbers); give lists or mappings as `label: value`"
                                    ),
                                    Some(format!("e.g. `{name}: {{first: {{…}}, second: {{…}}}}`")),
                                ));
                            }
                            other => interpolate::scalar_text(other).unwrap_or_default(),
                        };
                        labels.push(label);
                    }
                    (labels, items.clone())
                }
                Value::Object(m) => (m.keys().cloned().collect(), m.values().cloned().collect()),
                _ => {
                    return Err(error(
                        &path,
                        format!(
                            "axis `{name}` must be a list of values or a mapping label → value"
                        ),
                        Some(format!("e.g. `{name}: [0, 1, 2]`")),
                    ));
                }
            };
            if labels.is_empty() {
                return Err(error(
                    &path,
                    format!("axis `{name}` is empty"),
                    Some("give it at least one value, or remove the axis".into()),
                ));
            }
            for (i, l) in labels.iter().enumerate() {
                if !is_label(l) {
                    return Err(error(
                        &path,
                        format!("axis `{name}`: `{l}` cannot label an element"),
                        Some("labels use letters, digits and `_ . + -` (they name the elements, e.g. `train@seed=1`)".into()),
                    ));
                }
                if labels[..i].contains(l) {
                    return Err(error(
                        &path,
                        format!(
                            "axis `{name}` has `{l}` twice: two elements would be named `{name}={l}`"
                        ),
                        Some("remove the repeat, or give the values distinct labels".into()),
                    ));
                }
            }
            total = total.saturating_mul(labels.len());
            axes.push(Axis {
                name: name.clone(),
                labels,
                values,
            });
        }
        if total > MAX_ELEMENTS {
            return Err(error(
                "matrix",
                format!(
                    "the matrix has {total} elements; the most one stage may have is {MAX_ELEMENTS}"
                ),
                Some("split the experiment into several stages or files".into()),
            ));
        }
        Ok(Matrix { axes })
    }

    pub fn axis(&self, name: &str) -> Option<&Axis> {
        self.axes.iter().find(|a| a.name == name)
    }

    /// Every element of `stage`, in product order (first axis outermost).
    pub fn elements(&self, stage: &str) -> Vec<Element> {
        let mut out = vec![Vec::new()];
        for axis in &self.axes {
            out = out
                .into_iter()
                .flat_map(|prefix: Vec<(String, String)>| {
                    axis.labels.iter().map(move |l| {
                        let mut p = prefix.clone();
                        p.push((axis.name.clone(), l.clone()));
                        p
                    })
                })
                .collect();
        }
        out.into_iter()
            .map(|labels| Element {
                stage: stage.to_string(),
                labels,
            })
            .collect()
    }

    /// The value of `axis` at `label`.
    pub fn value(&self, axis: &str, label: &str) -> Option<&Value> {
        let a = self.axis(axis)?;
        a.labels
            .iter()
            .position(|l| l == label)
            .map(|i| &a.values[i])
    }

    /// What `${matrix.AXIS}` (`label`: `${matrix.AXIS:name}`) is in `element`: its value on
    /// the axis, or its label as text; `None` for an axis it does not have.
    pub fn bound(&self, element: &Element, axis: &str, label: bool) -> Option<Value> {
        let l = element.label(axis)?;
        if label {
            Some(Value::String(l.to_string()))
        } else {
            self.value(axis, l).cloned()
        }
    }
}

/// Replaces `${matrix.AXIS}` (and `:name`) for the axes `values` knows; other references are
/// left as written. A whole-string reference takes the value's type.
pub fn substitute(
    value: &Value,
    values: &dyn Fn(&str, bool) -> Option<Value>,
) -> Result<Value, interpolate::WalkError> {
    let mut f = |path: &str, s: &str| -> Result<Value, interpolate::WalkError> {
        let err = |message: String| interpolate::WalkError {
            path: path.to_string(),
            message,
            help: None,
        };
        let Ok(pieces) = interpolate::parse(s) else {
            // Reported where the string is read for its references.
            return Ok(Value::String(s.to_string()));
        };
        if !pieces
            .iter()
            .any(|p| matches!(p, Piece::Ref(Ref::Matrix { axis, label }) if values(axis, *label).is_some()))
        {
            return Ok(Value::String(s.to_string()));
        }
        if let [Piece::Ref(Ref::Matrix { axis, label })] = pieces.as_slice() {
            return Ok(values(axis, *label).expect("checked above"));
        }
        let mut out: Vec<Piece> = Vec::new();
        for p in pieces {
            match &p {
                Piece::Ref(Ref::Matrix { axis, label }) => match values(axis, *label) {
                    Some(v) => {
                        let text = interpolate::scalar_text(&v).ok_or_else(|| {
                            err(format!(
                                "`${{matrix.{axis}}}` is a list or mapping; it can only be a whole value (or write `${{matrix.{axis}:name}}` for its label)"
                            ))
                        })?;
                        out.push(Piece::Text(text));
                    }
                    None => out.push(p),
                },
                _ => out.push(p),
            }
        }
        Ok(Value::String(interpolate::unparse(&out)))
    };
    interpolate::map_strings(value, "", &mut f)
}

/// The stages of a pipeline after expansion, for resolving references.
pub struct Universe {
    /// Stage names as written, in order.
    pub written: Vec<String>,
    pub matrices: BTreeMap<String, Matrix>,
}

/// What a reference names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// One stage (or element), by name.
    One(String),
    /// Several elements, in product order.
    Many(Vec<Element>),
}

/// A reference that names nothing, or names it ambiguously.
#[derive(Debug)]
pub struct ResolveError {
    pub message: String,
    pub help: Option<String>,
}

impl Universe {
    /// Resolves `${name[@select]}` written in stage `from` (an element when it has a matrix).
    pub fn resolve(
        &self,
        name: &str,
        select: Option<&Select>,
        from_stage: &str,
        from: Option<&Element>,
    ) -> Result<Resolved, ResolveError> {
        let fail = |message: String, help: Option<String>| ResolveError { message, help };
        let written = |select: Option<&Select>| match select {
            Some(s) => format!("`${{{name}@{s}}}`"),
            None => format!("`${{{name}}}`"),
        };
        if !self.written.iter().any(|s| s == name) {
            let names: Vec<&str> = self.written.iter().map(String::as_str).collect();
            return Err(fail(
                format!("{} refers to unknown stage `{name}`", written(select)),
                Some(match cusa_stages::api::closest(name, &names) {
                    Some(n) => format!("did you mean `${{{n}}}`?"),
                    None => format!("stages: {}", names.join(", ")),
                }),
            ));
        }
        if name == from_stage {
            return Err(fail(
                format!("stage `{from_stage}` cannot read its own output"),
                None,
            ));
        }
        let Some(matrix) = self.matrices.get(name) else {
            return match select {
                None => Ok(Resolved::One(name.to_string())),
                Some(_) => Err(fail(
                    format!("{}: `{name}` is not a matrix stage", written(select)),
                    Some(format!("write `${{{name}}}`")),
                )),
            };
        };
        // Labels fixed by the selector, then by the referring element on shared axes.
        let mut fixed: BTreeMap<&str, &str> = BTreeMap::new();
        if let Some(Select::Pick(picks)) = select {
            for (axis, label) in picks {
                let Some(a) = matrix.axis(axis) else {
                    let axes: Vec<&str> = matrix.axes.iter().map(|a| a.name.as_str()).collect();
                    return Err(fail(
                        format!("{}: `{name}` has no axis `{axis}`", written(select)),
                        Some(format!("its axes: {}", axes.join(", "))),
                    ));
                };
                if !a.labels.contains(label) {
                    return Err(fail(
                        format!(
                            "{}: `{name}` has no element with {axis}={label}",
                            written(select)
                        ),
                        Some(format!(
                            "axis `{axis}` of `{name}`: {}",
                            a.labels.join(", ")
                        )),
                    ));
                }
                fixed.insert(axis, label);
            }
        }
        for axis in &matrix.axes {
            if fixed.contains_key(axis.name.as_str()) {
                continue;
            }
            match from.and_then(|e| e.label(&axis.name)) {
                Some(label) => {
                    if !axis.labels.iter().any(|l| l == label) {
                        return Err(fail(
                            format!(
                                "{} from `{}`: `{name}` has no element with {}={label}",
                                written(select),
                                from.map(Element::name).unwrap_or_default(),
                                axis.name
                            ),
                            Some(format!(
                                "axis `{}` of `{name}`: {}; give both stages the same values",
                                axis.name,
                                axis.labels.join(", ")
                            )),
                        ));
                    }
                    fixed.insert(&axis.name, label);
                }
                None if select.is_none() => {
                    let axes: Vec<&str> = matrix.axes.iter().map(|a| a.name.as_str()).collect();
                    let example = matrix
                        .axes
                        .iter()
                        .map(|a| format!("{}={}", a.name, a.labels[0]))
                        .collect::<Vec<_>>()
                        .join(",");
                    return Err(fail(
                        format!(
                            "mismatched axes: `{name}` is a matrix over {} and `{from_stage}` has no axis `{}`",
                            axes.join(", "),
                            axis.name
                        ),
                        Some(format!(
                            "write `${{{name}@*}}` for the list of its elements, `${{{name}@{example}}}` for one, or give `{from_stage}` the axis"
                        )),
                    ));
                }
                None => {}
            }
        }
        let picked: Vec<Element> = matrix
            .elements(name)
            .into_iter()
            .filter(|e| {
                e.labels
                    .iter()
                    .all(|(a, l)| fixed.get(a.as_str()).is_none_or(|f| f == l))
            })
            .collect();
        let open = matrix.axes.len() > fixed.len();
        Ok(match (select, open) {
            (Some(Select::All), _) | (Some(Select::Pick(_)), true) => Resolved::Many(picked),
            _ => Resolved::One(picked[0].name()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn matrix(v: Value) -> Matrix {
        Matrix::parse(&v, &|_| None).unwrap()
    }

    #[test]
    fn elements_are_the_product_in_declared_order() {
        let m = matrix(json!({"variant": {"base": {"a": 1}, "cusa": {"a": 2}}, "seed": [0, 1]}));
        let names: Vec<String> = m.elements("train").iter().map(Element::name).collect();
        assert_eq!(
            names,
            [
                "train@variant=base,seed=0",
                "train@variant=base,seed=1",
                "train@variant=cusa,seed=0",
                "train@variant=cusa,seed=1"
            ]
        );
        assert_eq!(m.value("variant", "cusa"), Some(&json!({"a": 2})));
        assert_eq!(m.value("seed", "1"), Some(&json!(1)));
    }

    #[test]
    fn bad_axes_are_refused() {
        let e = |v: Value| Matrix::parse(&v, &|_| None).err().unwrap();
        assert_eq!(e(json!({"seed": []})).message, "axis `seed` is empty");
        assert_eq!(e(json!({})).message, "`matrix:` has no axes");
        assert!(e(json!({"seed": [0, 0]})).message.contains("twice"));
        assert!(e(json!({"seed": ["a b"]})).message.contains("cannot label"));
        assert!(
            e(json!({"Seed": [0]}))
                .message
                .contains("not a valid axis name")
        );
        assert!(e(json!({"seed": 3})).message.contains("must be a list"));
    }

    #[test]
    fn whole_references_keep_their_type_and_others_become_text() {
        let m = matrix(json!({"variant": {"cusa": {"csa": 1}}, "seed": [2]}));
        let element = &m.elements("train")[0];
        let values = |axis: &str, label: bool| m.bound(element, axis, label);
        let v = substitute(
            &json!({"loss": "${matrix.variant}", "seed": "${matrix.seed}", "name": "run-${matrix.variant:name}-${matrix.seed} ${matrix.other}"}),
            &values,
        )
        .ok()
        .unwrap();
        assert_eq!(
            v,
            json!({"loss": {"csa": 1}, "seed": 2, "name": "run-cusa-2 ${matrix.other}"})
        );
        assert!(substitute(&json!("x ${matrix.variant}"), &values).is_err());
    }

    #[test]
    fn references_pick_the_matching_element_or_a_list() {
        let m = matrix(json!({"variant": ["base", "cusa"], "seed": [0, 1]}));
        let u = Universe {
            written: vec!["train".into(), "eval".into(), "export".into()],
            matrices: BTreeMap::from([("train".to_string(), m.clone())]),
        };
        let from = &m.elements("eval")[3];
        assert_eq!(
            u.resolve("train", None, "eval", Some(from)).unwrap(),
            Resolved::One("train@variant=cusa,seed=1".into())
        );
        let Resolved::Many(all) = u
            .resolve("train", Some(&Select::All), "export", None)
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(all.len(), 4);
        let pick = Select::Pick(vec![("variant".into(), "cusa".into())]);
        let Resolved::Many(cusa) = u.resolve("train", Some(&pick), "export", None).unwrap() else {
            panic!()
        };
        assert_eq!(cusa.len(), 2);
        let err = u.resolve("train", None, "export", None).err().unwrap();
        assert!(err.message.starts_with("mismatched axes"), "{err:?}");
        let pick = Select::Pick(vec![("seed".into(), "7".into())]);
        let err = u
            .resolve("train", Some(&pick), "export", None)
            .err()
            .unwrap();
        assert!(err.message.contains("no element with seed=7"), "{err:?}");
    }
}
