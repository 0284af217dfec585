//! The stage graph: who reads whose output.
//!
//! Built from the stage references in each stage's inputs. Invariants: acyclic (a cycle is a
//! [`Diagnostic`] naming every stage on it, located at the input that closes it); [`Dag::order`]
//! is a topological order that keeps declaration order wherever dependencies allow, so output
//! and scheduling priority are predictable. Execution itself is driven by `dagrs` in
//! [`crate::runner`]; this module only describes the shape.

use std::collections::{BTreeSet, HashMap};

use crate::spec::{Diagnostic, Input, Pipeline};

/// Stage indices (into `Pipeline::stages`) and their edges.
pub struct Dag {
    /// Topological order, declaration order among independent stages.
    pub order: Vec<usize>,
    /// `deps[i]`: stages `i` reads from, sorted.
    pub deps: Vec<Vec<usize>>,
    /// `dependents[i]`: stages reading from `i`, sorted.
    pub dependents: Vec<Vec<usize>>,
}

impl Dag {
    pub fn build(p: &Pipeline) -> Result<Dag, Diagnostic> {
        let index: HashMap<&str, usize> = p
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let n = p.stages.len();
        let mut deps = vec![Vec::new(); n];
        let mut dependents = vec![Vec::new(); n];
        for (i, stage) in p.stages.iter().enumerate() {
            for up in stage.upstream() {
                let j = index[up];
                deps[i].push(j);
                dependents[j].push(i);
            }
        }
        for d in deps.iter_mut().chain(dependents.iter_mut()) {
            d.sort_unstable();
            d.dedup();
        }
        // Kahn's algorithm, always taking the lowest declaration index that is ready.
        let mut missing: Vec<usize> = deps.iter().map(Vec::len).collect();
        let mut ready: BTreeSet<usize> = (0..n).filter(|&i| missing[i] == 0).collect();
        let mut order = Vec::with_capacity(n);
        while let Some(i) = ready.pop_first() {
            order.push(i);
            for &k in &dependents[i] {
                missing[k] -= 1;
                if missing[k] == 0 {
                    ready.insert(k);
                }
            }
        }
        if order.len() < n {
            return Err(cycle_diagnostic(p, &deps, &missing));
        }
        Ok(Dag {
            order,
            deps,
            dependents,
        })
    }

    /// `targets` plus everything they read from, transitively, in topological order.
    pub fn closure(&self, targets: &[usize]) -> Vec<usize> {
        let mut keep = vec![false; self.deps.len()];
        let mut stack: Vec<usize> = targets.to_vec();
        while let Some(i) = stack.pop() {
            if !keep[i] {
                keep[i] = true;
                stack.extend(&self.deps[i]);
            }
        }
        self.order.iter().copied().filter(|&i| keep[i]).collect()
    }
}

/// Finds one cycle among the stages left unordered and names it.
fn cycle_diagnostic(p: &Pipeline, deps: &[Vec<usize>], missing: &[usize]) -> Diagnostic {
    let start = (0..deps.len())
        .find(|&i| missing[i] > 0)
        .expect("a cycle exists");
    // Walk dependencies that are themselves on a cycle until a stage repeats.
    let mut path = vec![start];
    let mut cur = start;
    loop {
        let next = *deps[cur]
            .iter()
            .find(|&&j| missing[j] > 0)
            .expect("every stage left has a left dependency");
        if let Some(pos) = path.iter().position(|&x| x == next) {
            let mut cycle: Vec<usize> = path[pos..].to_vec();
            cycle.reverse(); // dependency direction: producer → consumer
            let names: Vec<&str> = cycle.iter().map(|&i| p.stages[i].name.as_str()).collect();
            let closing = &p.stages[cycle[0]];
            let producer = &p.stages[*cycle.last().expect("non-empty")].name;
            let input_key = closing
                .inputs
                .iter()
                .find(|(_, i)| matches!(i, Input::Stage { stage, .. } if stage == producer))
                .and_then(|(k, _)| closing.written_at.get(k).cloned())
                .unwrap_or_else(|| {
                    let written = closing.element.as_ref().map_or(&closing.name, |e| &e.stage);
                    format!("stages.{written}")
                });
            let mut d = p.source.diagnostic_at_value(
                &input_key,
                format!(
                    "the stages form a cycle: {} → {}",
                    names.join(" → "),
                    names[0]
                ),
            );
            d.help = Some("a stage cannot depend, even indirectly, on its own output; remove one of these inputs".into());
            return d;
        }
        path.push(next);
        cur = next;
    }
}

/// `cusa-pipe dag` output formats.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Format {
    Text,
    Dot,
    Mermaid,
}

/// (producer, input name, consumer) for every stage input, in pipeline order.
fn edges<'a>(p: &'a Pipeline, dag: &Dag) -> Vec<(&'a str, &'a str, &'a str)> {
    let mut out = Vec::new();
    for &i in &dag.order {
        for (input, src) in &p.stages[i].inputs {
            if let Input::Stage { stage, sub } = src {
                // Inputs written as references are named by position: label them by the
                // sub-path they read, if any.
                let label = match (input.starts_with('@'), sub) {
                    (false, _) => input.as_str(),
                    (true, Some(sub)) => sub.as_str(),
                    (true, None) => "",
                };
                out.push((stage.as_str(), label, p.stages[i].name.as_str()));
            }
        }
    }
    out
}

/// A node of the drawing: a stage, or (collapsed) all elements of a matrix stage.
struct Node {
    name: String,
    kind: &'static str,
    /// `variant (base, cusa) × seed (0, 1)` for a collapsed matrix.
    axes: Option<String>,
    gpus: u32,
    from: Vec<String>,
}

fn nodes(p: &Pipeline, dag: &Dag, collapse: bool) -> Vec<Node> {
    let node_of = |i: usize| -> String {
        let s = &p.stages[i];
        match (&s.element, collapse) {
            (Some(e), true) => e.stage.clone(),
            _ => s.name.clone(),
        }
    };
    let mut out: Vec<Node> = Vec::new();
    for &i in &dag.order {
        let name = node_of(i);
        let from: Vec<String> = dag.deps[i].iter().map(|&j| node_of(j)).collect();
        if let Some(n) = out.iter_mut().find(|n| n.name == name) {
            for f in from {
                if !n.from.contains(&f) {
                    n.from.push(f);
                }
            }
            continue;
        }
        let s = &p.stages[i];
        let axes = match (&s.element, collapse) {
            (Some(e), true) => {
                let parts: Vec<String> = e
                    .labels
                    .iter()
                    .map(|(axis, _)| {
                        let mut labels: Vec<&str> = Vec::new();
                        for t in &p.stages {
                            if let Some(l) = t
                                .element
                                .as_ref()
                                .filter(|x| x.stage == e.stage)
                                .and_then(|x| x.label(axis))
                                && !labels.contains(&l)
                            {
                                labels.push(l);
                            }
                        }
                        format!("{axis} ({})", labels.join(", "))
                    })
                    .collect();
                Some(parts.join(" × "))
            }
            _ => None,
        };
        let mut deduped: Vec<String> = Vec::new();
        for f in from {
            if !deduped.contains(&f) {
                deduped.push(f);
            }
        }
        out.push(Node {
            name,
            kind: s.kind.name(),
            axes,
            gpus: s.gpus,
            from: deduped,
        });
    }
    out
}

/// The pipeline's graph as text, Graphviz dot or Mermaid; `collapse` draws each matrix stage
/// as one node with its axes instead of one node per element.
pub fn render(p: &Pipeline, dag: &Dag, format: Format, collapse: bool) -> String {
    let nodes = nodes(p, dag, collapse);
    let mut out = String::new();
    let label = |n: &Node| match &n.axes {
        Some(axes) => format!("{} ({}) [{axes}]", n.name, n.kind),
        None => format!("{} ({})", n.name, n.kind),
    };
    match format {
        Format::Text => {
            let width = nodes.iter().map(|n| n.name.len()).max().unwrap_or(0);
            let kind_width = nodes.iter().map(|n| n.kind.len()).max().unwrap_or(0);
            for n in &nodes {
                let mut line = format!("{:width$}  {:kind_width$}", n.name, n.kind);
                if let Some(axes) = &n.axes {
                    line.push_str(&format!("  [{axes}]"));
                }
                if !n.from.is_empty() {
                    line.push_str(&format!("  ← {}", n.from.join(", ")));
                }
                if n.gpus > 0 {
                    line.push_str(&format!("  [gpu: {}]", n.gpus));
                }
                out.push_str(line.trim_end());
                out.push('\n');
            }
        }
        Format::Dot => {
            out.push_str(
                "digraph pipeline {\n  rankdir=LR;\n  node [shape=box, fontname=\"monospace\"];\n",
            );
            for n in &nodes {
                let text = match &n.axes {
                    Some(axes) => format!("{}\\n({})\\n{axes}", n.name, n.kind),
                    None => format!("{}\\n({})", n.name, n.kind),
                };
                out.push_str(&format!("  \"{}\" [label=\"{text}\"];\n", n.name));
            }
            if collapse {
                for n in &nodes {
                    for f in &n.from {
                        out.push_str(&format!("  \"{f}\" -> \"{}\";\n", n.name));
                    }
                }
            } else {
                for (from, input, to) in edges(p, dag) {
                    match input {
                        "" => out.push_str(&format!("  \"{from}\" -> \"{to}\";\n")),
                        _ => out
                            .push_str(&format!("  \"{from}\" -> \"{to}\" [label=\"{input}\"];\n")),
                    }
                }
            }
            out.push_str("}\n");
        }
        Format::Mermaid => {
            // Mermaid ids are plain words: elements (`train@seed=1`) get `n<index>`.
            let id = |name: &str| -> String {
                if name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    name.to_string()
                } else {
                    format!(
                        "n{}",
                        nodes.iter().position(|n| n.name == name).unwrap_or(0)
                    )
                }
            };
            out.push_str("flowchart LR\n");
            for n in &nodes {
                out.push_str(&format!("  {}[\"{}\"]\n", id(&n.name), label(n)));
            }
            if collapse {
                for n in &nodes {
                    for f in &n.from {
                        out.push_str(&format!("  {} --> {}\n", id(f), id(&n.name)));
                    }
                }
            } else {
                for (from, input, to) in edges(p, dag) {
                    match input {
                        "" => out.push_str(&format!("  {} --> {}\n", id(from), id(to))),
                        _ => out.push_str(&format!("  {} -->|{input}| {}\n", id(from), id(to))),
                    }
                }
            }
        }
    }
    out
}
