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
                .map(|(k, _)| format!("stages.{}.inputs.{k}", closing.name))
                .unwrap_or_else(|| format!("stages.{}", closing.name));
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
            if let Input::Stage { stage, .. } = src {
                out.push((stage.as_str(), input.as_str(), p.stages[i].name.as_str()));
            }
        }
    }
    out
}

pub fn render(p: &Pipeline, dag: &Dag, format: Format) -> String {
    let mut out = String::new();
    let name = |i: usize| p.stages[i].name.as_str();
    match format {
        Format::Text => {
            let width = p.stages.iter().map(|s| s.name.len()).max().unwrap_or(0);
            let kind_width = p
                .stages
                .iter()
                .map(|s| s.kind.name().len())
                .max()
                .unwrap_or(0);
            for &i in &dag.order {
                let s = &p.stages[i];
                let from: Vec<&str> = dag.deps[i].iter().map(|&j| name(j)).collect();
                let mut line = format!("{:width$}  {:kind_width$}", s.name, s.kind.name());
                if !from.is_empty() {
                    line.push_str(&format!("  ← {}", from.join(", ")));
                }
                if s.gpus > 0 {
                    line.push_str(&format!("  [gpu: {}]", s.gpus));
                }
                out.push_str(line.trim_end());
                out.push('\n');
            }
        }
        Format::Dot => {
            out.push_str(
                "digraph pipeline {\n  rankdir=LR;\n  node [shape=box, fontname=\"monospace\"];\n",
            );
            for &i in &dag.order {
                out.push_str(&format!(
                    "  \"{}\" [label=\"{}\\n({})\"];\n",
                    name(i),
                    name(i),
                    p.stages[i].kind.name()
                ));
            }
            for (from, input, to) in edges(p, dag) {
                out.push_str(&format!("  \"{from}\" -> \"{to}\" [label=\"{input}\"];\n"));
            }
            out.push_str("}\n");
        }
        Format::Mermaid => {
            out.push_str("flowchart LR\n");
            for &i in &dag.order {
                out.push_str(&format!(
                    "  {}[\"{} ({})\"]\n",
                    name(i),
                    name(i),
                    p.stages[i].kind.name()
                ));
            }
            for (from, input, to) in edges(p, dag) {
                out.push_str(&format!("  {from} -->|{input}| {to}\n"));
            }
        }
    }
    out
}
